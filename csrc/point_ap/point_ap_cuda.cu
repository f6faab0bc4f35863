// CUDA kernel of point_ap_match (see point_ap.h). The same results as the CPU
// kernel, found the GPU's way:
//   1. one thread per detection measures every GT of its key (brute force: the
//      GPU has the arithmetic to spare) and counts its candidates;
//   2. after a prefix sum, the same threads write them, in GT order;
//   3. one thread per tie block heap-sorts the block's pairs by (d2, det, gt);
//   4. one thread per (tau, size range, key) walks its key's blocks in order;
//   5. one thread per (size range, block) finds the least d2 to an ignored GT.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda_launch.cuh"
#include "point_ap/point_ap.h"

namespace cpr_d2 {

namespace {

// [lo, hi): the GTs whose key equals `key` (gt_key is sorted).
__device__ void key_range(const int64_t* gt_key, int64_t num_gts, int64_t key, int64_t* lo,
                          int64_t* hi) {
  int64_t a = 0, b = num_gts;
  while (a < b) {
    const int64_t m = a + (b - a) / 2;
    if (gt_key[m] < key) a = m + 1; else b = m;
  }
  *lo = a;
  b = num_gts;
  while (a < b) {
    const int64_t m = a + (b - a) / 2;
    if (gt_key[m] <= key) a = m + 1; else b = m;
  }
  *hi = a;
}

// Pass 0 counts each detection's candidates into count; pass 1 writes them from
// offset[d] on.
__global__ void candidates_kernel(const int64_t* det_key, const double* det_xy, int64_t num_dets,
                                  const int64_t* gt_key, const double* gt_xy, const double* gt_wh,
                                  int64_t num_gts, double max_tau2, bool write, int64_t* count,
                                  const int64_t* offset, int64_t* pair_det, int64_t* pair_gt,
                                  double* pair_d2) {
  CPR_GRID_STRIDE_LOOP(d, num_dets) {
    int64_t lo, hi;
    key_range(gt_key, num_gts, det_key[d], &lo, &hi);
    const double x = det_xy[2 * d], y = det_xy[2 * d + 1];
    int64_t n = 0;
    int64_t out = write ? offset[d] : 0;
    for (int64_t g = lo; g < hi; ++g) {
      const double d2 =
          ap_pair_d2(x, y, gt_xy[2 * g], gt_xy[2 * g + 1], gt_wh[2 * g], gt_wh[2 * g + 1]);
      if (!(d2 <= max_tau2)) continue;
      if (write) {
        pair_det[out] = d;
        pair_gt[out] = g;
        pair_d2[out] = d2;
        ++out;
      } else {
        ++n;
      }
    }
    if (!write) count[d] = n;
  }
}

// The pairs [base, base + n) of one block, for ap_heap_sort, by (d2, det, gt).
struct BlockPairs {
  int64_t* det;
  int64_t* gt;
  double* d2;
  int64_t base;
  __device__ bool less(int64_t a, int64_t b) const {
    a += base, b += base;
    return ap_pair_before(d2[a], det[a], gt[a], d2[b], det[b], gt[b]);
  }
  __device__ void swap(int64_t a, int64_t b) {
    a += base, b += base;
    const int64_t t_det = det[a], t_gt = gt[a];
    const double t_d2 = d2[a];
    det[a] = det[b], gt[a] = gt[b], d2[a] = d2[b];
    det[b] = t_det, gt[b] = t_gt, d2[b] = t_d2;
  }
};

__global__ void sort_blocks_kernel(const int64_t* block_start, const int64_t* offset,
                                   int64_t num_blocks, int64_t* det, int64_t* gt, double* d2) {
  CPR_GRID_STRIDE_LOOP(b, num_blocks) {
    BlockPairs items{det, gt, d2, offset[block_start[b]]};
    ap_heap_sort(items, offset[block_start[b + 1]] - items.base);
  }
}

// The walk's view of the pairs.
struct PairColumns {
  const int64_t* det_;
  const int64_t* gt_;
  const double* d2_;
  __device__ double d2(int64_t p) const { return d2_[p]; }
  __device__ int64_t det(int64_t p) const { return det_[p]; }
  __device__ int64_t gt(int64_t p) const { return gt_[p]; }
};

// One thread per (tau, size range, key): the key's blocks, walked in order.
__global__ void walk_kernel(const int64_t* block_start, const int64_t* group_start,
                            int64_t num_groups, const int64_t* offset, const int64_t* pair_det,
                            const int64_t* pair_gt, const double* pair_d2, const double* taus,
                            int64_t num_ranges, const bool* ignore, int64_t num_gts,
                            int64_t num_dets, bool* gt_taken, bool* tp, int64_t num_walks) {
  const PairColumns pairs{pair_det, pair_gt, pair_d2};
  CPR_GRID_STRIDE_LOOP(i, num_walks * num_groups) {
    const int64_t w = i / num_groups, k = i % num_groups;
    const double tau = taus[w / num_ranges];
    const bool* ignore_row = ignore + (w % num_ranges) * num_gts;
    for (int64_t b = group_start[k]; b < group_start[k + 1]; ++b) {
      ap_walk_block(offset[block_start[b]], offset[block_start[b + 1]],
                    block_start[b + 1] - block_start[b] == 1, mul_rn(tau, tau), pairs,
                    ignore_row, gt_taken + w * num_gts, tp + w * num_dets);
    }
  }
}

__global__ void ignore_d2_kernel(const int64_t* block_start, int64_t num_blocks,
                                 const int64_t* offset, const int64_t* pair_det,
                                 const int64_t* pair_gt, const double* pair_d2,
                                 const bool* ignore, int64_t num_ranges, int64_t num_gts,
                                 int64_t num_dets, double* ignore_d2) {
  CPR_GRID_STRIDE_LOOP(i, num_ranges * num_blocks) {
    const int64_t r = i / num_blocks, b = i % num_blocks;
    for (int64_t p = offset[block_start[b]]; p < offset[block_start[b + 1]]; ++p) {
      if (!ignore[r * num_gts + pair_gt[p]]) continue;
      double* slot = ignore_d2 + r * num_dets + pair_det[p];
      *slot = fmin(*slot, pair_d2[p]);
    }
  }
}

// Indices where a sorted int64 vector changes value, and its length: the starts
// of its runs, closed by the end.
at::Tensor run_starts(const at::Tensor& values) {
  const int64_t n = values.size(0);
  at::Tensor change = at::ones({n}, values.options().dtype(at::kBool));
  if (n > 1) change.slice(0, 1).copy_(values.slice(0, 1).ne(values.slice(0, 0, -1)));
  return at::cat({change.nonzero().view(-1), at::full({1}, n, values.options())});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> point_ap_match_cuda(
    const at::Tensor& det_key, const at::Tensor& det_xy, const at::Tensor& det_block,
    const at::Tensor& gt_key, const at::Tensor& gt_xy, const at::Tensor& gt_wh,
    const at::Tensor& ignore, at::ArrayRef<double> taus) {
  const c10::cuda::CUDAGuard guard(det_key.device());
  const APMatchInputs in =
      prepare_point_ap_match(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore, taus);
  const int64_t num_dets = in.det_key.size(0), num_gts = in.gt_key.size(0);
  const int64_t num_taus = static_cast<int64_t>(in.taus.size());
  const int64_t num_ranges = in.ignore.size(0);
  const at::TensorOptions long_opts = in.det_key.options();
  at::Tensor tp = at::zeros({num_taus, num_ranges, num_dets}, long_opts.dtype(at::kBool));
  at::Tensor ignore_d2 = at::full({num_ranges, num_dets}, std::numeric_limits<double>::infinity(),
                                  long_opts.dtype(at::kDouble));
  if (num_dets == 0 || num_gts == 0 || num_ranges == 0) return {tp, ignore_d2};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor count = at::empty({num_dets}, long_opts);
  candidates_kernel<<<blocks_for(num_dets), kThreads, 0, stream>>>(
      in.det_key.data_ptr<int64_t>(), in.det_xy.data_ptr<double>(), num_dets,
      in.gt_key.data_ptr<int64_t>(), in.gt_xy.data_ptr<double>(), in.gt_wh.data_ptr<double>(),
      num_gts, in.max_tau2, false, count.data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor offset = at::cat({at::zeros({1}, long_opts), count.cumsum(0)});
  const int64_t num_pairs = offset[num_dets].item<int64_t>();
  if (num_pairs == 0) return {tp, ignore_d2};
  at::Tensor pair_det = at::empty({num_pairs}, long_opts);
  at::Tensor pair_gt = at::empty({num_pairs}, long_opts);
  at::Tensor pair_d2 = at::empty({num_pairs}, long_opts.dtype(at::kDouble));
  candidates_kernel<<<blocks_for(num_dets), kThreads, 0, stream>>>(
      in.det_key.data_ptr<int64_t>(), in.det_xy.data_ptr<double>(), num_dets,
      in.gt_key.data_ptr<int64_t>(), in.gt_xy.data_ptr<double>(), in.gt_wh.data_ptr<double>(),
      num_gts, in.max_tau2, true, nullptr, offset.data_ptr<int64_t>(),
      pair_det.data_ptr<int64_t>(), pair_gt.data_ptr<int64_t>(), pair_d2.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor block_start = run_starts(in.det_block);
  const int64_t num_blocks = block_start.size(0) - 1;
  sort_blocks_kernel<<<blocks_for(num_blocks), kThreads, 0, stream>>>(
      block_start.data_ptr<int64_t>(), offset.data_ptr<int64_t>(), num_blocks,
      pair_det.data_ptr<int64_t>(), pair_gt.data_ptr<int64_t>(), pair_d2.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Blocks never span two keys, so the keys' runs over the blocks are the groups.
  const at::Tensor group_start =
      run_starts(in.det_key.index_select(0, block_start.slice(0, 0, num_blocks)));
  const int64_t num_groups = group_start.size(0) - 1;
  const int64_t num_walks = num_taus * num_ranges;
  const at::Tensor tau_values = at::tensor(in.taus, long_opts.dtype(at::kDouble).device(at::kCPU))
                                    .to(det_key.device());
  at::Tensor gt_taken = at::zeros({num_walks, num_gts}, long_opts.dtype(at::kBool));
  walk_kernel<<<blocks_for(num_walks * num_groups), kThreads, 0, stream>>>(
      block_start.data_ptr<int64_t>(), group_start.data_ptr<int64_t>(), num_groups,
      offset.data_ptr<int64_t>(), pair_det.data_ptr<int64_t>(), pair_gt.data_ptr<int64_t>(),
      pair_d2.data_ptr<double>(), tau_values.data_ptr<double>(), num_ranges,
      in.ignore.data_ptr<bool>(), num_gts, num_dets, gt_taken.data_ptr<bool>(),
      tp.data_ptr<bool>(), num_walks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ignore_d2_kernel<<<blocks_for(num_ranges * num_blocks), kThreads, 0, stream>>>(
      block_start.data_ptr<int64_t>(), num_blocks, offset.data_ptr<int64_t>(),
      pair_det.data_ptr<int64_t>(), pair_gt.data_ptr<int64_t>(), pair_d2.data_ptr<double>(),
      in.ignore.data_ptr<bool>(), num_ranges, num_gts, num_dets, ignore_d2.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tp, ignore_d2};
}

TORCH_LIBRARY_IMPL(cpr_d2, CUDA, m) { m.impl("point_ap_match", &point_ap_match_cuda); }

}  // namespace cpr_d2
