// CPU kernel of point_ap_match (see point_ap.h).
//
// Candidates: the detections are sorted by (key, strip, x), where a strip is a
// horizontal band about twice as high as a typical GT's reach; each GT looks,
// in every strip its +-max_tau box height reaches, at the detections of its key
// whose x lies within its +-max_tau box width, and keeps those within max_tau.
// The reaches carry a relative slack of 1e-9, far above the float rounding, so
// the search never misses a pair the exact test keeps; coordinates are clipped
// to +-2^40 px for the search only (clipping never moves two points apart), and
// reaches are capped at 2^42 px. The same search as the numpy reference's,
// without its x band narrowing: here measuring a pair is cheap.
// Then the pairs of every tie block are sorted by (d2, det, gt), and each (tau,
// size range) walks them once: a detection stops at its first free GT.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "point_ap/point_ap.h"

namespace cpr_d2 {

namespace {

constexpr double kCoordLimit = 1099511627776.0;  // 2^40
constexpr double kSlack = 1e-9;
constexpr double kMaxStrips = 1048576.0;  // 2^20

double clip(double v) { return std::min(std::max(v, -kCoordLimit), kCoordLimit); }

// How far from a GT centre c (clipped) a detection can be along an axis where the
// box has size `size`, with slack. Capped at 2^42 px: past 2^41 it covers every
// clipped coordinate already, and the cap keeps a huge box's reach finite.
double reach(double max_tau, double size, double c) {
  return std::min(max_tau * size * (1 + kSlack) + kSlack * (1 + std::abs(c)), 4 * kCoordLimit);
}

// 16 bytes: the pairs are most of the memory the kernel touches, and fresh pages
// cost more than the arithmetic. Indices fit int32 (checked).
struct Pair {
  double d2;
  int32_t det, gt;
};

bool operator<(const Pair& a, const Pair& b) {
  return ap_pair_before(a.d2, a.det, a.gt, b.d2, b.det, b.gt);
}

// The walk's view of the pairs.
struct PairArray {
  const Pair* pairs;
  double d2(int64_t p) const { return pairs[p].d2; }
  int64_t det(int64_t p) const { return pairs[p].det; }
  int64_t gt(int64_t p) const { return pairs[p].gt; }
};

// First index in [lo, hi) of sorted `x` whose value is >= v (branch-free steps).
int64_t first_at_least(const double* x, int64_t lo, int64_t hi, double v) {
  int64_t n = hi - lo;
  const double* base = x + lo;
  while (n > 1) {
    const int64_t half = n / 2;
    base = base[half - 1] < v ? base + half : base;
    n -= half;
  }
  return (base - x) + (n == 1 && *base < v);
}

// Every (det, gt) pair of equal key with d2 <= max_tau2, in no particular order.
std::vector<Pair> find_candidates(const APMatchInputs& in) {
  const double max_tau = in.max_tau;
  const int64_t num_dets = in.det_key.size(0), num_gts = in.gt_key.size(0);
  const int64_t* det_key = in.det_key.data_ptr<int64_t>();
  const double* det_xy = in.det_xy.data_ptr<double>();
  const int64_t* gt_key = in.gt_key.data_ptr<int64_t>();
  const double* gt_xy = in.gt_xy.data_ptr<double>();
  const double* gt_wh = in.gt_wh.data_ptr<double>();
  std::vector<Pair> out;
  if (num_dets == 0 || num_gts == 0) return out;

  // Strip height: twice the median of the GTs' reach in y, at least 2^-20 of the
  // detections' y range (so at most 2^20 + 1 strips).
  std::vector<double> reach_y(num_gts);
  for (int64_t g = 0; g < num_gts; ++g) {
    const double cy = clip(gt_xy[2 * g + 1]);
    reach_y[g] = reach(max_tau, gt_wh[2 * g + 1], cy);
  }
  double y0 = std::numeric_limits<double>::infinity(), y1 = -y0;
  for (int64_t d = 0; d < num_dets; ++d) {
    const double y = clip(det_xy[2 * d + 1]);
    y0 = std::min(y0, y);
    y1 = std::max(y1, y);
  }
  std::vector<double> median(reach_y);
  std::nth_element(median.begin(), median.begin() + num_gts / 2, median.end());
  const double strip = std::max(2 * median[num_gts / 2], (y1 - y0) / kMaxStrips);
  const double last_strip = std::floor((y1 - y0) / strip);

  // Detections sorted by (key, strip, x); their coordinates in that order.
  struct Entry {
    int64_t key, strip;
    double x;
    int64_t det;
  };
  std::vector<Entry> entries(num_dets);
  for (int64_t d = 0; d < num_dets; ++d) {
    const double s = std::floor((clip(det_xy[2 * d + 1]) - y0) / strip);
    entries[d] = {det_key[d], static_cast<int64_t>(s), clip(det_xy[2 * d]), d};
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    if (a.key != b.key) return a.key < b.key;
    if (a.strip != b.strip) return a.strip < b.strip;
    return a.x < b.x;
  });
  std::vector<double> sx(num_dets), px(num_dets), py(num_dets);
  // Buckets: the runs of equal (key, strip), in order; bucket_begin closes with
  // num_dets.
  std::vector<int64_t> bucket_key, bucket_strip, bucket_begin;
  for (int64_t i = 0; i < num_dets; ++i) {
    const Entry& e = entries[i];
    sx[i] = e.x;
    px[i] = det_xy[2 * e.det];
    py[i] = det_xy[2 * e.det + 1];
    if (i == 0 || e.key != entries[i - 1].key || e.strip != entries[i - 1].strip) {
      bucket_key.push_back(e.key);
      bucket_strip.push_back(e.strip);
      bucket_begin.push_back(i);
    }
  }
  const int64_t num_buckets = static_cast<int64_t>(bucket_key.size());
  bucket_begin.push_back(num_dets);

  // A cheap test first (multiplications, no branch), loose by 1e-9 relative, far
  // above its rounding; the exact d2 only for the detections that pass it. A NaN
  // (from a subnormal box size) passes too.
  const double loose = in.max_tau2 * (1 + kSlack);
  std::vector<int64_t> hits(64);
  // Reserved pages are only touched when written: reserve generously, so that the
  // vector rarely grows (a copy onto fresh pages).
  out.reserve(32 * static_cast<size_t>(num_gts) + 1024);
  // The GTs come sorted by key: [key_first, key_end) are the buckets of the current
  // GT's key, moved on when the key changes.
  int64_t key_first = 0, key_end = 0;
  for (int64_t g = 0; g < num_gts; ++g) {
    if (g == 0 || gt_key[g] != gt_key[g - 1]) {
      key_first = key_end;
      while (key_first < num_buckets && bucket_key[key_first] < gt_key[g]) ++key_first;
      key_end = key_first;
      while (key_end < num_buckets && bucket_key[key_end] == gt_key[g]) ++key_end;
    }
    const double cx = clip(gt_xy[2 * g]), cy = clip(gt_xy[2 * g + 1]);
    // Strips the GT reaches, clamped to those holding detections (in double first,
    // where a huge reach is still safe).
    const double lo = std::max(std::floor((cy - reach_y[g] - y0) / strip), 0.0);
    const double hi = std::min(std::floor((cy + reach_y[g] - y0) / strip), last_strip);
    if (!(lo <= hi)) continue;
    const double gx = gt_xy[2 * g], gy = gt_xy[2 * g + 1];
    const double w = gt_wh[2 * g], h = gt_wh[2 * g + 1];
    const double iw = 1.0 / w, ih = 1.0 / h;
    const double reach_x = reach(max_tau, w, cx);
    const double x_lo = cx - reach_x, x_hi = cx + reach_x;
    // This key's buckets from strip lo on.
    int64_t b = std::lower_bound(bucket_strip.begin() + key_first, bucket_strip.begin() + key_end,
                         static_cast<int64_t>(lo)) - bucket_strip.begin();
    for (; b < key_end && bucket_strip[b] <= static_cast<int64_t>(hi); ++b) {
      const int64_t end = bucket_begin[b + 1];
      int64_t n = 0;
      for (int64_t i = first_at_least(sx.data(), bucket_begin[b], end, x_lo);
           i < end && sx[i] <= x_hi; ++i) {
        const double dx = (px[i] - gx) * iw, dy = (py[i] - gy) * ih;
        if (n == static_cast<int64_t>(hits.size())) hits.resize(2 * n);
        hits[n] = i;
        n += !(dx * dx + dy * dy > loose);
      }
      for (int64_t k = 0; k < n; ++k) {
        const int64_t i = hits[k];
        const double d2 = ap_pair_d2(px[i], py[i], gx, gy, w, h);
        if (d2 <= in.max_tau2) {
          out.push_back({d2, static_cast<int32_t>(entries[i].det), static_cast<int32_t>(g)});
        }
      }
    }
  }
  return out;
}

// Pairs for ap_heap_sort.
struct PairItems {
  Pair* pairs;
  bool less(int64_t a, int64_t b) const { return pairs[a] < pairs[b]; }
  void swap(int64_t a, int64_t b) { std::swap(pairs[a], pairs[b]); }
};

// Sorts the pairs [p0, p1) by (d2, det, gt), in place: insertion sort for the
// few pairs of a typical block, beyond that the heap sort of the CUDA kernel.
void sort_pairs(Pair* p0, Pair* p1) {
  if (p1 - p0 > 32) {
    PairItems items{p0};
    ap_heap_sort(items, p1 - p0);
    return;
  }
  for (Pair* i = p0 + 1; i < p1; ++i) {
    const Pair v = *i;
    Pair* j = i;
    for (; j > p0 && v < *(j - 1); --j) *j = *(j - 1);
    *j = v;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> point_ap_match_cpu(
    const at::Tensor& det_key, const at::Tensor& det_xy, const at::Tensor& det_block,
    const at::Tensor& gt_key, const at::Tensor& gt_xy, const at::Tensor& gt_wh,
    const at::Tensor& ignore, at::ArrayRef<double> taus) {
  const APMatchInputs in =
      prepare_point_ap_match(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore, taus);
  const int64_t num_dets = in.det_key.size(0), num_gts = in.gt_key.size(0);
  const int64_t num_taus = static_cast<int64_t>(in.taus.size());
  const int64_t num_ranges = in.ignore.size(0);
  TORCH_CHECK_VALUE(num_dets < (int64_t{1} << 31) && num_gts < (int64_t{1} << 31),
                    "point_ap_match: at most 2^31 - 1 detections and GTs per call on CPU, got ",
                    num_dets, " and ", num_gts);
  at::Tensor tp = at::zeros({num_taus, num_ranges, num_dets}, in.det_key.options().dtype(at::kBool));
  at::Tensor ignore_d2 = at::full({num_ranges, num_dets}, std::numeric_limits<double>::infinity(),
                                  in.det_key.options().dtype(at::kDouble));
  const std::vector<Pair> found = find_candidates(in);
  const int64_t num_pairs = static_cast<int64_t>(found.size());
  if (num_pairs == 0) return {tp, ignore_d2};

  // Pairs grouped by detection (a counting sort), then every tie block's pairs
  // sorted by (d2, det, gt): the walk order.
  std::vector<int64_t> offset(num_dets + 1, 0);
  for (const Pair& q : found) ++offset[q.det + 1];
  std::partial_sum(offset.begin(), offset.end(), offset.begin());
  std::vector<Pair> pairs(num_pairs);
  {
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (const Pair& q : found) pairs[fill[q.det]++] = q;
  }
  std::vector<int64_t> block_start;  // first detection of every block, and num_dets
  const int64_t* block = in.det_block.data_ptr<int64_t>();
  for (int64_t d = 0; d < num_dets; ++d) {
    if (d == 0 || block[d] != block[d - 1]) block_start.push_back(d);
  }
  block_start.push_back(num_dets);
  const int64_t num_blocks = static_cast<int64_t>(block_start.size()) - 1;
  at::parallel_for(0, num_blocks, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      sort_pairs(pairs.data() + offset[block_start[b]], pairs.data() + offset[block_start[b + 1]]);
    }
  });
  const PairArray walk_pairs{pairs.data()};

  // One walk per (tau, size range), each with its own taken GTs.
  const bool* ignore_ptr = in.ignore.data_ptr<bool>();
  bool* tp_ptr = tp.data_ptr<bool>();
  at::parallel_for(0, num_taus * num_ranges, 1, [&](int64_t w0, int64_t w1) {
    std::unique_ptr<bool[]> taken(new bool[std::max<int64_t>(num_gts, 1)]);
    for (int64_t w = w0; w < w1; ++w) {
      const double tau = in.taus[w / num_ranges];
      const bool* ignore_row = ignore_ptr + (w % num_ranges) * num_gts;
      std::fill_n(taken.get(), num_gts, false);
      bool* tp_row = tp_ptr + w * num_dets;
      for (int64_t b = 0; b < num_blocks; ++b) {
        ap_walk_block(offset[block_start[b]], offset[block_start[b + 1]],
                      block_start[b + 1] - block_start[b] == 1, tau * tau, walk_pairs,
                      ignore_row, taken.get(), tp_row);
      }
    }
  });

  // Least d2 to an ignored GT, per size range and detection.
  double* ignore_d2_ptr = ignore_d2.data_ptr<double>();
  for (int64_t r = 0; r < num_ranges; ++r) {
    const bool* ignore_row = ignore_ptr + r * num_gts;
    double* row = ignore_d2_ptr + r * num_dets;
    for (int64_t p = 0; p < num_pairs; ++p) {
      const Pair& q = pairs[p];
      if (ignore_row[q.gt]) row[q.det] = std::min(row[q.det], q.d2);
    }
  }
  return {tp, ignore_d2};
}

TORCH_LIBRARY_IMPL(cpr_d2, CPU, m) { m.impl("point_ap_match", &point_ap_match_cpu); }

}  // namespace cpr_d2
