// Per-element arithmetic of the point ops, shared by the CPU and CUDA kernels
// so that the CPU tests exercise the exact math the GPU runs.
//
// Coordinate convention (docs/method.md, "Coordinate convention"): points are
// continuous pixel coordinates with the origin at the image's top-left corner;
// feature cell (i, j) at stride s has its centre at ((j + 0.5) s, (i + 0.5) s);
// bilinear sampling of image point p reads feature position u = p / s - 0.5,
// clamped to [0, size - 1] (grid_sample, align_corners=False, border padding).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CPR_HD __host__ __device__ __forceinline__
#else
#define CPR_HD inline
#endif

namespace cpr_d2 {

// Number of points in a positive bag of radius R: rings k = 1..R hold 8k
// points each, plus the annotated point itself.
CPR_HD int64_t bag_size(int64_t radius) {
  return 4 * radius * (radius + 1) + 1;
}

// Position of bag slot `idx` (0 <= idx < bag_size - 1) on the rings: ring k
// (1-based) and index t within it. Slot bag_size - 1 is the annotated point.
CPR_HD void ring_slot(int64_t idx, int64_t* ring, int64_t* t) {
  // Ring k starts at slot 4k(k-1); solve for the largest such k, then fix
  // any off-by-one the floating square root may introduce.
  int64_t k = static_cast<int64_t>((1.0 + sqrt(1.0 + static_cast<double>(idx))) * 0.5);
  while (k > 1 && 4 * k * (k - 1) > idx) --k;
  while (4 * (k + 1) * k <= idx) ++k;
  *ring = k;
  *t = idx - 4 * k * (k - 1);
}

// Products and sums without fused multiply-add, so CPU and GPU round alike.
CPR_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

CPR_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// A bag coordinate: the annotated coordinate plus its ring offset, added in
// double and rounded once to the point dtype.
template <typename coord_t>
CPR_HD coord_t bag_coord(coord_t annotated, double offset) {
  return static_cast<coord_t>(add_rn(static_cast<double>(annotated), offset));
}

// A bag point is valid when it lies on the image: 0 <= x <= width and
// 0 <= y <= height (closed, so a point on the right or bottom edge, which
// coarse points clipped to a box touching the border can be, stays valid).
// NaN coordinates are invalid.
template <typename coord_t>
CPR_HD bool inside_image(coord_t x, coord_t y, int64_t height, int64_t width) {
  return x >= coord_t(0) && y >= coord_t(0) && x <= static_cast<coord_t>(width) &&
      y <= static_cast<coord_t>(height);
}

// Centre of feature cell index `j` along one axis, in image pixels.
CPR_HD double cell_centre(int64_t j, double stride) {
  return mul_rn(static_cast<double>(j) + 0.5, stride);
}

CPR_HD double squared_distance(double ax, double ay, double bx, double by) {
  const double dx = ax - bx;
  const double dy = ay - by;
  return add_rn(mul_rn(dx, dx), mul_rn(dy, dy));
}

// Inclusive range [lo, hi] of cell indices along an axis of `size` cells
// that holds every cell whose centre can lie closer than `radius` pixels to
// coordinate `p` (one cell of slack each side absorbs rounding; callers test
// the exact distance). Returns false when the range is empty. Clamping
// happens in double, so points far off the map (or NaN) cannot overflow the
// integer cast.
CPR_HD bool cell_window(double p, double radius, double stride, int64_t size,
                        int64_t* lo, int64_t* hi) {
  const double first = floor((p - radius) / stride - 0.5) - 1.0;
  const double last = ceil((p + radius) / stride - 0.5) + 1.0;
  const double flo = first > 0.0 ? first : 0.0;  // NaN -> 0
  const double fhi = last < static_cast<double>(size - 1) ? last : static_cast<double>(size - 1);
  if (!(flo <= fhi)) return false;
  *lo = static_cast<int64_t>(flo);
  *hi = static_cast<int64_t>(fhi);
  return true;
}

// The four taps of a bilinear read: corner indices along each axis and their
// weights. With border clamping the sampling position stays in
// [0, size - 1], so every tap is in range.
template <typename acc_t>
struct BilinearTaps {
  int64_t x0, x1, y0, y1;
  acc_t wx0, wx1, wy0, wy1;
};

template <typename acc_t>
CPR_HD acc_t clamp_position(acc_t u, int64_t size) {
  const acc_t hi = static_cast<acc_t>(size - 1);
  // fmax/fmin return the non-NaN operand, so NaN reads the first cell.
  return fmin(fmax(u, acc_t(0)), hi);
}

template <typename acc_t>
CPR_HD BilinearTaps<acc_t> bilinear_taps(acc_t px, acc_t py, acc_t stride,
                                         int64_t height, int64_t width) {
  const acc_t u = clamp_position<acc_t>(px / stride - acc_t(0.5), width);
  const acc_t v = clamp_position<acc_t>(py / stride - acc_t(0.5), height);
  BilinearTaps<acc_t> taps;
  taps.x0 = static_cast<int64_t>(floor(u));
  taps.y0 = static_cast<int64_t>(floor(v));
  taps.x1 = taps.x0 + 1 < width ? taps.x0 + 1 : width - 1;
  taps.y1 = taps.y0 + 1 < height ? taps.y0 + 1 : height - 1;
  taps.wx1 = u - static_cast<acc_t>(taps.x0);
  taps.wy1 = v - static_cast<acc_t>(taps.y0);
  taps.wx0 = acc_t(1) - taps.wx1;
  taps.wy0 = acc_t(1) - taps.wy1;
  return taps;
}

// Strides of a (B, C, H, W) tensor in elements, so kernels read NCHW and
// channels-last storage alike.
struct FeatureStrides {
  int64_t b, c, h, w;
};

// The interpolation itself, one formula for every kernel and layout.
template <typename acc_t>
CPR_HD acc_t bilinear_combine(const BilinearTaps<acc_t>& t, acc_t v00, acc_t v01, acc_t v10,
                              acc_t v11) {
  return t.wy0 * (t.wx0 * v00 + t.wx1 * v01) + t.wy1 * (t.wx0 * v10 + t.wx1 * v11);
}

// Offsets of the four taps within a (batch, channel) plane, in the order
// (y0, x0), (y0, x1), (y1, x0), (y1, x1), and the weight each gets in the
// transpose (the gradient).
template <typename acc_t>
CPR_HD void tap_offsets(const FeatureStrides& s, const BilinearTaps<acc_t>& t, int64_t off[4]) {
  off[0] = t.y0 * s.h + t.x0 * s.w;
  off[1] = t.y0 * s.h + t.x1 * s.w;
  off[2] = t.y1 * s.h + t.x0 * s.w;
  off[3] = t.y1 * s.h + t.x1 * s.w;
}

template <typename acc_t>
CPR_HD void tap_weights(const BilinearTaps<acc_t>& t, acc_t w[4]) {
  w[0] = t.wy0 * t.wx0;
  w[1] = t.wy0 * t.wx1;
  w[2] = t.wy1 * t.wx0;
  w[3] = t.wy1 * t.wx1;
}

template <typename scalar_t, typename acc_t>
CPR_HD acc_t bilinear_read(const scalar_t* base, const FeatureStrides& s,
                           const BilinearTaps<acc_t>& t) {
  // `base` already points at (batch, channel).
  int64_t off[4];
  tap_offsets(s, t, off);
  return bilinear_combine(t, static_cast<acc_t>(base[off[0]]), static_cast<acc_t>(base[off[1]]),
                          static_cast<acc_t>(base[off[2]]), static_cast<acc_t>(base[off[3]]));
}

// Transpose of bilinear_read: hands each of the four taps its share of `v`
// through add(offset, value), which adds into the (batch, channel) plane.
template <typename acc_t, typename AddFn>
CPR_HD void bilinear_scatter(const FeatureStrides& s, const BilinearTaps<acc_t>& t, acc_t v,
                             const AddFn& add) {
  int64_t off[4];
  acc_t w[4];
  tap_offsets(s, t, off);
  tap_weights(t, w);
  for (int k = 0; k < 4; ++k) add(off[k], w[k] * v);
}

// Row readers: where a gather or scatter reads row `row` from. Both kernels
// (CPU and CUDA) are written once over these.
// Offset of bag slot p of an object whose rings lie `spacing` pixels apart:
// (k * spacing) * (cos, sin), from the slot's row (k, cos, sin) of ring_table.
CPR_HD void spaced_offset(const double* table, int64_t p, double spacing, double* dx,
                          double* dy) {
  const double r = mul_rn(table[3 * p], spacing);
  *dx = mul_rn(r, table[3 * p + 1]);
  *dy = mul_rn(r, table[3 * p + 2]);
}

// Reads bag slot `row` (= n * P + p) of the bag of point n: its coordinates
// and the batch index of its image. Fixed rings read the slot's offset from
// `offsets` (ring_offsets); per-object regions (region != nullptr, pixels)
// put object n's rings region[n] / rings apart, from `offsets` holding
// ring_table.
template <typename coord_t>
struct BagRow {
  const coord_t* points;
  const int64_t* batch_idx;
  const double* offsets;
  int64_t bag;
  const double* region;
  double rings;

  // Coordinates of the slot; returns the index n of its bag.
  CPR_HD int64_t coords(int64_t row, coord_t* x, coord_t* y) const {
    const int64_t n = row / bag;
    const int64_t p = row - n * bag;
    if (region != nullptr) {
      double dx, dy;
      spaced_offset(offsets, p, region[n] / rings, &dx, &dy);
      *x = bag_coord(points[2 * n], dx);
      *y = bag_coord(points[2 * n + 1], dy);
    } else {
      *x = bag_coord(points[2 * n], offsets[2 * p]);
      *y = bag_coord(points[2 * n + 1], offsets[2 * p + 1]);
    }
    return n;
  }

  CPR_HD void operator()(int64_t row, coord_t* x, coord_t* y, int64_t* b) const {
    *b = batch_idx[coords(row, x, y)];
  }
};

// The distance within which point n keeps the cells from being negatives:
// R * s for every point, or its own region (pixels) when region != nullptr.
struct NegativeRadii {
  double fixed;
  const double* region;

  CPR_HD double operator()(int64_t n) const { return region != nullptr ? region[n] : fixed; }
};

// Reads plain point m (a bag of one, offset zero).
template <typename coord_t>
struct PlainRow {
  const coord_t* points;
  const int64_t* batch_idx;

  CPR_HD void operator()(int64_t row, coord_t* x, coord_t* y, int64_t* b) const {
    *x = points[2 * row];
    *y = points[2 * row + 1];
    *b = batch_idx[row];
  }
};

}  // namespace cpr_d2
