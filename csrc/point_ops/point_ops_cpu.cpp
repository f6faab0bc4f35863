// CPU kernels of the point ops, parallel over points, cells or channels with
// at::parallel_for (the extension is compiled with OpenMP for that).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "point_math.h"
#include "point_ops.h"

namespace cpr_d2 {
namespace {

// Aim for about this many scalar operations per parallel chunk.
constexpr int64_t kChunkWork = 1 << 15;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kChunkWork / std::max<int64_t>(1, work_per_item));
}

FeatureStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// out[row, c] = bilinear read of features[b(row), c] at the row's point.
// Channels-last maps take a contiguous loop over channels that the compiler
// vectorises; it evaluates the same bilinear_combine as every other path.
template <typename scalar_t, typename acc_t, typename Rows>
void gather_rows(const scalar_t* features, const FeatureStrides& fs, int64_t channels,
                 int64_t height, int64_t width, acc_t stride, int64_t rows, const Rows& read_row,
                 scalar_t* out) {
  at::parallel_for(0, rows, grain_for(4 * channels), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t x, y;
      int64_t b;
      read_row(row, &x, &y, &b);
      const BilinearTaps<acc_t> taps = bilinear_taps<acc_t>(x, y, stride, height, width);
      const scalar_t* base = features + b * fs.b;
      scalar_t* __restrict__ dst = out + row * channels;
      if (fs.c == 1) {
        int64_t off[4];
        tap_offsets(fs, taps, off);
        const scalar_t* __restrict__ v00 = base + off[0];
        const scalar_t* __restrict__ v01 = base + off[1];
        const scalar_t* __restrict__ v10 = base + off[2];
        const scalar_t* __restrict__ v11 = base + off[3];
        for (int64_t c = 0; c < channels; ++c) {
          dst[c] = static_cast<scalar_t>(bilinear_combine<acc_t>(taps, v00[c], v01[c], v10[c], v11[c]));
        }
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          dst[c] = static_cast<scalar_t>(bilinear_read<scalar_t, acc_t>(base + c * fs.c, fs, taps));
        }
      }
    }
  });
}

// grad[b(row), c] += the bilinear read's transpose of grad_out[row, c].
// Parallel over channels, so no two threads ever add to the same element; on
// a channels-last buffer each tap's channel range is one contiguous run.
template <typename scalar_t, typename acc_t, typename Rows>
void scatter_rows(const scalar_t* grad_out, int64_t channels, int64_t height, int64_t width,
                  acc_t stride, int64_t rows, const Rows& read_row, scalar_t* grad,
                  const FeatureStrides& gs) {
  at::parallel_for(0, channels, grain_for(4 * rows), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t row = 0; row < rows; ++row) {
      acc_t x, y;
      int64_t b;
      read_row(row, &x, &y, &b);
      const BilinearTaps<acc_t> taps = bilinear_taps<acc_t>(x, y, stride, height, width);
      const scalar_t* __restrict__ g = grad_out + row * channels;
      scalar_t* base = grad + b * gs.b;
      if (gs.c == 1) {
        int64_t off[4];
        acc_t w[4];
        tap_offsets(gs, taps, off);
        tap_weights(taps, w);
        for (int k = 0; k < 4; ++k) {  // taps may coincide at the border: one at a time
          scalar_t* __restrict__ dst = base + off[k];
          for (int64_t c = c_begin; c < c_end; ++c) {
            dst[c] += static_cast<scalar_t>(w[k] * static_cast<acc_t>(g[c]));
          }
        }
      } else {
        for (int64_t c = c_begin; c < c_end; ++c) {
          scalar_t* plane = base + c * gs.c;
          bilinear_scatter(gs, taps, static_cast<acc_t>(g[c]),
                           [plane](int64_t offset, acc_t value) {
                             plane[offset] += static_cast<scalar_t>(value);
                           });
        }
      }
    }
  });
}

bool empty_map(at::IntArrayRef size) { return size[2] == 0 || size[3] == 0; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> bag_points_cpu(const at::Tensor& points, int64_t radius,
                                                  double stride, int64_t image_height,
                                                  int64_t image_width,
                                                  const std::optional<at::Tensor>& region) {
  check_bag_points_args(points, radius, stride, image_height, image_width);
  check_region(region, points.size(0), points.device());
  const at::Tensor pts = points.contiguous();
  const int64_t n_points = pts.size(0);
  const int64_t bag = bag_size(radius);
  at::Tensor coords = at::empty({n_points, bag, 2}, pts.options());
  at::Tensor valid = at::empty({n_points, bag}, pts.options().dtype(at::kBool));
  const BagTables tables = bag_tables(radius, stride, region, pts.device());
  bool* valid_ptr = valid.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(pts.scalar_type(), "cpr_d2::bag_points", [&] {
    const BagRow<scalar_t> bags = bag_row<scalar_t>(pts.data_ptr<scalar_t>(), nullptr, tables,
                                                    radius);
    scalar_t* out = coords.data_ptr<scalar_t>();
    at::parallel_for(0, n_points * bag, grain_for(8), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        scalar_t x, y;
        bags.coords(row, &x, &y);
        out[2 * row] = x;
        out[2 * row + 1] = y;
        valid_ptr[row] = inside_image(x, y, image_height, image_width);
      }
    });
  });
  return {coords, valid};
}

at::Tensor negative_mask_cpu(const at::Tensor& points, const at::Tensor& labels, int64_t height,
                             int64_t width, double stride, int64_t radius, int64_t num_classes,
                             const std::optional<at::Tensor>& region) {
  check_negative_mask_args(points, labels, height, width, stride, radius, num_classes);
  check_region(region, points.size(0), points.device());
  const at::Tensor pts = points.to(at::kDouble).contiguous();
  const at::Tensor lab = labels.contiguous();
  at::Tensor mask = at::ones({height * width, num_classes}, points.options().dtype(at::kBool));
  const int64_t n_points = pts.size(0);
  if (n_points == 0 || mask.numel() == 0) return mask;
  const double* p = pts.data_ptr<double>();
  const int64_t* l = lab.data_ptr<int64_t>();
  bool* m = mask.data_ptr<bool>();
  const at::Tensor region_px = region_pixels(region);
  const NegativeRadii radii = negative_radii(radius, stride, region_px);
  // The points of every row of cells whose window (cell_window, which errs on the
  // wide side) reaches it, in point order: a counting sort, so that the work is
  // the points' windows and not rows x points.
  std::vector<int64_t> row_start(height + 1, 0);
  for (int64_t n = 0; n < n_points; ++n) {
    int64_t i_lo, i_hi;
    if (!cell_window(p[2 * n + 1], radii(n), stride, height, &i_lo, &i_hi)) continue;
    for (int64_t i = i_lo; i <= i_hi; ++i) ++row_start[i + 1];
  }
  std::partial_sum(row_start.begin(), row_start.end(), row_start.begin());
  std::vector<int64_t> row_points(row_start[height]);
  {
    std::vector<int64_t> fill(row_start.begin(), row_start.end() - 1);
    for (int64_t n = 0; n < n_points; ++n) {
      int64_t i_lo, i_hi;
      if (!cell_window(p[2 * n + 1], radii(n), stride, height, &i_lo, &i_hi)) continue;
      for (int64_t i = i_lo; i <= i_hi; ++i) row_points[fill[i]++] = n;
    }
  }
  // Each thread owns whole rows of cells; per row it visits only the points
  // whose disc reaches the row, and of those only the cells in the window.
  const int64_t per_row = std::max<int64_t>(1, row_start[height] / std::max<int64_t>(1, height));
  at::parallel_for(0, height, grain_for(2 * per_row), [&](int64_t i_begin, int64_t i_end) {
    for (int64_t i = i_begin; i < i_end; ++i) {
      const double cy = cell_centre(i, stride);
      for (int64_t k = row_start[i]; k < row_start[i + 1]; ++k) {
        const int64_t n = row_points[k];
        const double px = p[2 * n], py = p[2 * n + 1];
        const double r = radii(n);
        const double r2 = mul_rn(r, r);
        const double dy = cy - py;
        if (!(mul_rn(dy, dy) < r2)) continue;  // the whole row is too far
        int64_t j_lo, j_hi;
        if (!cell_window(px, r, stride, width, &j_lo, &j_hi)) continue;
        for (int64_t j = j_lo; j <= j_hi; ++j) {
          if (squared_distance(cell_centre(j, stride), cy, px, py) < r2) {
            m[(i * width + j) * num_classes + l[n]] = false;
          }
        }
      }
    }
  });
  return mask;
}

at::Tensor bilinear_gather_cpu(const at::Tensor& features, const at::Tensor& points,
                               const at::Tensor& batch_idx, double stride) {
  const at::Tensor pts = prepare_gather(features, points, batch_idx, stride);
  const int64_t n_points = pts.size(0), channels = features.size(1);
  at::Tensor out = new_output({n_points, channels}, features);
  if (out.numel() == 0 || empty_map(features.sizes())) return out;
  const at::Tensor bidx = batch_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "cpr_d2::bilinear_gather", [&] {
    using acc_t = scalar_t;  // float or double on the CPU
    const PlainRow<acc_t> rows{pts.data_ptr<acc_t>(), bidx.data_ptr<int64_t>()};
    gather_rows<scalar_t, acc_t>(features.data_ptr<scalar_t>(), strides_of(features), channels,
                                 features.size(2), features.size(3), static_cast<acc_t>(stride),
                                 n_points, rows, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor bilinear_gather_backward_cpu(const at::Tensor& grad_out, const at::Tensor& points,
                                        const at::Tensor& batch_idx, double stride,
                                        at::IntArrayRef feature_size, bool channels_last) {
  const at::Tensor pts =
      prepare_gather_backward(grad_out, points, batch_idx, stride, feature_size, 1);
  at::Tensor grad = zeros_grad(feature_size, grad_out.options(), channels_last);
  if (grad_out.numel() == 0 || empty_map(feature_size)) return grad;
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor bidx = batch_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cpr_d2::bilinear_gather_backward", [&] {
    using acc_t = scalar_t;
    const PlainRow<acc_t> rows{pts.data_ptr<acc_t>(), bidx.data_ptr<int64_t>()};
    scatter_rows<scalar_t, acc_t>(g.data_ptr<scalar_t>(), feature_size[1], feature_size[2],
                                  feature_size[3], static_cast<acc_t>(stride), pts.size(0), rows,
                                  grad.data_ptr<scalar_t>(), strides_of(grad));
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> bag_gather_cpu(const at::Tensor& features,
                                                  const at::Tensor& points,
                                                  const at::Tensor& batch_idx,
                                                  const at::Tensor& image_sizes, int64_t radius,
                                                  double stride,
                                                  const std::optional<at::Tensor>& region) {
  const at::Tensor pts = prepare_gather(features, points, batch_idx, stride);
  check_radius(radius);
  check_image_sizes(image_sizes, features.size(0));
  check_region(region, pts.size(0), pts.device());
  const int64_t n_points = pts.size(0), channels = features.size(1);
  const int64_t bag = bag_size(radius);
  at::Tensor out = new_output({n_points, bag, channels}, features);
  at::Tensor valid = at::empty({n_points, bag}, features.options().dtype(at::kBool));
  if (n_points == 0) return {out, valid};
  const BagTables tables = bag_tables(radius, stride, region, pts.device());
  const at::Tensor sizes = image_sizes.contiguous();
  const at::Tensor bidx = batch_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "cpr_d2::bag_gather", [&] {
    using acc_t = scalar_t;
    const BagRow<acc_t> rows =
        bag_row<acc_t>(pts.data_ptr<acc_t>(), bidx.data_ptr<int64_t>(), tables, radius);
    const int64_t* hw = sizes.data_ptr<int64_t>();
    bool* v = valid.data_ptr<bool>();
    at::parallel_for(0, n_points * bag, grain_for(8), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        acc_t x, y;
        int64_t b;
        rows(row, &x, &y, &b);
        v[row] = inside_image(x, y, hw[2 * b], hw[2 * b + 1]);
      }
    });
    if (out.numel() == 0 || empty_map(features.sizes())) return;
    gather_rows<scalar_t, acc_t>(features.data_ptr<scalar_t>(), strides_of(features), channels,
                                 features.size(2), features.size(3), static_cast<acc_t>(stride),
                                 n_points * bag, rows, out.data_ptr<scalar_t>());
  });
  return {out, valid};
}

at::Tensor bag_gather_backward_cpu(const at::Tensor& grad_out, const at::Tensor& points,
                                   const at::Tensor& batch_idx, int64_t radius, double stride,
                                   at::IntArrayRef feature_size, bool channels_last,
                                   const std::optional<at::Tensor>& region) {
  check_radius(radius);
  const int64_t bag = bag_size(radius);
  const at::Tensor pts =
      prepare_gather_backward(grad_out, points, batch_idx, stride, feature_size, bag);
  check_region(region, pts.size(0), pts.device());
  at::Tensor grad = zeros_grad(feature_size, grad_out.options(), channels_last);
  if (grad_out.numel() == 0 || empty_map(feature_size)) return grad;
  const BagTables tables = bag_tables(radius, stride, region, pts.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor bidx = batch_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cpr_d2::bag_gather_backward", [&] {
    using acc_t = scalar_t;
    const BagRow<acc_t> rows =
        bag_row<acc_t>(pts.data_ptr<acc_t>(), bidx.data_ptr<int64_t>(), tables, radius);
    scatter_rows<scalar_t, acc_t>(g.data_ptr<scalar_t>(), feature_size[1], feature_size[2],
                                  feature_size[3], static_cast<acc_t>(stride),
                                  pts.size(0) * bag, rows, grad.data_ptr<scalar_t>(),
                                  strides_of(grad));
  });
  return grad;
}

TORCH_LIBRARY_IMPL(cpr_d2, CPU, m) {
  m.impl("bag_points", &bag_points_cpu);
  m.impl("negative_mask", &negative_mask_cpu);
  m.impl("bilinear_gather", &bilinear_gather_cpu);
  m.impl("bilinear_gather_backward", &bilinear_gather_backward_cpu);
  m.impl("bag_gather", &bag_gather_cpu);
  m.impl("bag_gather_backward", &bag_gather_backward_cpu);
}

}  // namespace cpr_d2
