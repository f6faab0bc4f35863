// CUDA kernels of the point ops. The per-element math lives in point_math.h,
// shared with the CPU kernels; this file only maps it onto threads.
//
// Gathers and scatters run one thread per (row, channel) with the channel
// fastest, on channels-last feature maps, so that neighbouring threads read
// (and atomically add to) neighbouring addresses.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda_launch.cuh"
#include "point_math.h"
#include "point_ops.h"

// Only c10 headers for streams: ATen/cuda/CUDAContext.h needs the cuBLAS and
// cuSPARSE headers, which minimal CUDA toolkits do not ship.

namespace cpr_d2 {

int64_t cuda_version() { return CUDART_VERSION; }

namespace {

FeatureStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

bool empty_map(at::IntArrayRef size) { return size[2] == 0 || size[3] == 0; }

template <typename coord_t>
__global__ void bag_points_kernel(BagRow<coord_t> bags, int64_t rows, int64_t height,
                                  int64_t width, coord_t* coords, bool* valid) {
  CPR_GRID_STRIDE_LOOP(row, rows) {
    coord_t x, y;
    bags.coords(row, &x, &y);
    coords[2 * row] = x;
    coords[2 * row + 1] = y;
    valid[row] = inside_image(x, y, height, width);
  }
}

// One thread per (point, cell of the point's window). Every write stores
// `false`, so concurrent writes to one cell need no atomics.
__global__ void negative_mask_kernel(const double* points, const int64_t* labels,
                                     int64_t n_points, int64_t side, int64_t height,
                                     int64_t width, double stride, NegativeRadii radii,
                                     int64_t num_classes, bool* mask) {
  const int64_t window = side * side;
  CPR_GRID_STRIDE_LOOP(idx, n_points * window) {
    const int64_t n = idx / window;
    const int64_t k = idx - n * window;
    const double px = points[2 * n], py = points[2 * n + 1];
    const double radius = radii(n);
    const double r2 = mul_rn(radius, radius);
    int64_t i_lo, i_hi, j_lo, j_hi;
    if (!cell_window(py, radius, stride, height, &i_lo, &i_hi)) continue;
    if (!cell_window(px, radius, stride, width, &j_lo, &j_hi)) continue;
    const int64_t i = i_lo + k / side;
    const int64_t j = j_lo + k % side;
    if (i > i_hi || j > j_hi) continue;
    if (squared_distance(cell_centre(j, stride), cell_centre(i, stride), px, py) < r2) {
      mask[(i * width + j) * num_classes + labels[n]] = false;
    }
  }
}

template <typename scalar_t, typename acc_t, typename Rows>
__global__ void gather_kernel(const scalar_t* features, FeatureStrides fs, int64_t channels,
                              int64_t height, int64_t width, acc_t stride, int64_t rows,
                              Rows read_row, scalar_t* out) {
  CPR_GRID_STRIDE_LOOP(idx, rows * channels) {
    const int64_t row = idx / channels;
    const int64_t c = idx - row * channels;
    acc_t x, y;
    int64_t b;
    read_row(row, &x, &y, &b);
    const BilinearTaps<acc_t> taps = bilinear_taps<acc_t>(x, y, stride, height, width);
    out[idx] = static_cast<scalar_t>(
        bilinear_read<scalar_t, acc_t>(features + b * fs.b + c * fs.c, fs, taps));
  }
}

template <typename scalar_t, typename acc_t, typename Rows>
__global__ void scatter_kernel(const scalar_t* grad_out, int64_t channels, int64_t height,
                               int64_t width, acc_t stride, int64_t rows, Rows read_row,
                               scalar_t* grad, FeatureStrides gs) {
  CPR_GRID_STRIDE_LOOP(idx, rows * channels) {
    const int64_t row = idx / channels;
    const int64_t c = idx - row * channels;
    acc_t x, y;
    int64_t b;
    read_row(row, &x, &y, &b);
    const BilinearTaps<acc_t> taps = bilinear_taps<acc_t>(x, y, stride, height, width);
    scalar_t* plane = grad + b * gs.b + c * gs.c;
    bilinear_scatter(gs, taps, static_cast<acc_t>(grad_out[idx]),
                     [plane](int64_t offset, acc_t value) {
                       gpuAtomicAdd(plane + offset, static_cast<scalar_t>(value));
                     });
  }
}

template <typename coord_t>
__global__ void bag_valid_kernel(BagRow<coord_t> read_row, const int64_t* image_sizes,
                                 int64_t rows, bool* valid) {
  CPR_GRID_STRIDE_LOOP(row, rows) {
    coord_t x, y;
    int64_t b;
    read_row(row, &x, &y, &b);
    valid[row] = inside_image(x, y, image_sizes[2 * b], image_sizes[2 * b + 1]);
  }
}

template <typename scalar_t, typename Rows>
void launch_gather(const at::Tensor& features, double stride, int64_t rows, const Rows& read_row,
                   at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = features.size(1);
  gather_kernel<scalar_t, acc_t, Rows>
      <<<blocks_for(rows * channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          features.data_ptr<scalar_t>(), strides_of(features), channels, features.size(2),
          features.size(3), static_cast<acc_t>(stride), rows, read_row,
          out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename Rows>
void launch_scatter(const at::Tensor& grad_out, double stride, int64_t rows,
                    const Rows& read_row, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  scatter_kernel<scalar_t, acc_t, Rows>
      <<<blocks_for(rows * grad.size(1)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_out.data_ptr<scalar_t>(), grad.size(1), grad.size(2), grad.size(3),
          static_cast<acc_t>(stride), rows, read_row, grad.data_ptr<scalar_t>(),
          strides_of(grad));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Gradients accumulate in channels-last buffers, so the channel-fastest
// atomics coalesce, and are handed back in the format asked for.
at::Tensor in_format(const at::Tensor& grad, bool channels_last) {
  return channels_last ? grad : grad.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bag_points_cuda(const at::Tensor& points, int64_t radius,
                                                   double stride, int64_t image_height,
                                                   int64_t image_width,
                                                   const std::optional<at::Tensor>& region) {
  check_bag_points_args(points, radius, stride, image_height, image_width);
  const c10::cuda::CUDAGuard guard(points.device());
  check_region(region, points.size(0), points.device());
  const at::Tensor pts = points.contiguous();
  const int64_t n_points = pts.size(0);
  const int64_t bag = bag_size(radius);
  at::Tensor coords = at::empty({n_points, bag, 2}, pts.options());
  at::Tensor valid = at::empty({n_points, bag}, pts.options().dtype(at::kBool));
  if (n_points == 0) return {coords, valid};
  const BagTables tables = bag_tables(radius, stride, region, pts.device());
  AT_DISPATCH_FLOATING_TYPES(pts.scalar_type(), "cpr_d2::bag_points_cuda", [&] {
    bag_points_kernel<scalar_t>
        <<<blocks_for(n_points * bag), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            bag_row<scalar_t>(pts.data_ptr<scalar_t>(), nullptr, tables, radius), n_points * bag,
            image_height, image_width, coords.data_ptr<scalar_t>(), valid.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {coords, valid};
}

at::Tensor negative_mask_cuda(const at::Tensor& points, const at::Tensor& labels, int64_t height,
                              int64_t width, double stride, int64_t radius,
                              int64_t num_classes, const std::optional<at::Tensor>& region) {
  check_negative_mask_args(points, labels, height, width, stride, radius, num_classes);
  const c10::cuda::CUDAGuard guard(points.device());
  check_region(region, points.size(0), points.device());
  at::Tensor mask = at::ones({height * width, num_classes}, points.options().dtype(at::kBool));
  const int64_t n_points = points.size(0);
  if (n_points == 0 || mask.numel() == 0) return mask;
  const at::Tensor pts = points.to(at::kDouble).contiguous();
  const at::Tensor lab = labels.contiguous();
  const at::Tensor region_px = region_pixels(region);
  // cell_window spans at most 2r/s + 4 cells per axis (the disc, rounding and
  // one cell of slack on each side), and never more than the grid.
  const double widest = region_px.defined() ? region_px.max().item<double>()
                                            : static_cast<double>(radius) * stride;
  const double cells = std::ceil(2.0 * widest / stride) + 5.0;
  const int64_t side = static_cast<int64_t>(
      std::min(cells, static_cast<double>(std::max(height, width))));
  negative_mask_kernel<<<blocks_for(n_points * side * side), kThreads, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(
      pts.data_ptr<double>(), lab.data_ptr<int64_t>(), n_points, side, height, width, stride,
      negative_radii(radius, stride, region_px), num_classes, mask.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

at::Tensor bilinear_gather_cuda(const at::Tensor& features, const at::Tensor& points,
                                const at::Tensor& batch_idx, double stride) {
  const at::Tensor pts = prepare_gather(features, points, batch_idx, stride);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor out = new_output({pts.size(0), features.size(1)}, features);
  if (out.numel() == 0 || empty_map(features.sizes())) return out;
  const at::Tensor feats = features.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor bidx = batch_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "cpr_d2::bilinear_gather_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PlainRow<acc_t> rows{pts.data_ptr<acc_t>(), bidx.data_ptr<int64_t>()};
    launch_gather<scalar_t>(feats, stride, pts.size(0), rows, out);
  });
  return out;
}

at::Tensor bilinear_gather_backward_cuda(const at::Tensor& grad_out, const at::Tensor& points,
                                         const at::Tensor& batch_idx, double stride,
                                         at::IntArrayRef feature_size, bool channels_last) {
  const at::Tensor pts =
      prepare_gather_backward(grad_out, points, batch_idx, stride, feature_size, 1);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor grad = zeros_grad(feature_size, grad_out.options(), true);
  if (grad_out.numel() == 0 || empty_map(feature_size)) return in_format(grad, channels_last);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor bidx = batch_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "cpr_d2::bilinear_gather_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PlainRow<acc_t> rows{pts.data_ptr<acc_t>(), bidx.data_ptr<int64_t>()};
    launch_scatter<scalar_t>(g, stride, pts.size(0), rows, grad);
  });
  return in_format(grad, channels_last);
}

std::tuple<at::Tensor, at::Tensor> bag_gather_cuda(const at::Tensor& features,
                                                   const at::Tensor& points,
                                                   const at::Tensor& batch_idx,
                                                   const at::Tensor& image_sizes, int64_t radius,
                                                   double stride,
                                                   const std::optional<at::Tensor>& region) {
  const at::Tensor pts = prepare_gather(features, points, batch_idx, stride);
  check_radius(radius);
  check_image_sizes(image_sizes, features.size(0));
  check_same_device(features, "features", image_sizes, "image_sizes");
  const c10::cuda::CUDAGuard guard(features.device());
  check_region(region, pts.size(0), pts.device());
  const int64_t n_points = pts.size(0), bag = bag_size(radius);
  at::Tensor out = new_output({n_points, bag, features.size(1)}, features);
  at::Tensor valid = at::empty({n_points, bag}, features.options().dtype(at::kBool));
  if (n_points == 0) return {out, valid};
  const BagTables tables = bag_tables(radius, stride, region, features.device());
  const at::Tensor sizes = image_sizes.contiguous();
  const at::Tensor bidx = batch_idx.contiguous();
  const at::Tensor feats = features.contiguous(at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "cpr_d2::bag_gather_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BagRow<acc_t> rows =
        bag_row<acc_t>(pts.data_ptr<acc_t>(), bidx.data_ptr<int64_t>(), tables, radius);
    bag_valid_kernel<acc_t>
        <<<blocks_for(n_points * bag), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            rows, sizes.data_ptr<int64_t>(), n_points * bag, valid.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (out.numel() == 0 || empty_map(feats.sizes())) return;
    launch_gather<scalar_t>(feats, stride, n_points * bag, rows, out);
  });
  return {out, valid};
}

at::Tensor bag_gather_backward_cuda(const at::Tensor& grad_out, const at::Tensor& points,
                                    const at::Tensor& batch_idx, int64_t radius, double stride,
                                    at::IntArrayRef feature_size, bool channels_last,
                                    const std::optional<at::Tensor>& region) {
  check_radius(radius);
  const int64_t bag = bag_size(radius);
  const at::Tensor pts =
      prepare_gather_backward(grad_out, points, batch_idx, stride, feature_size, bag);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  check_region(region, pts.size(0), pts.device());
  at::Tensor grad = zeros_grad(feature_size, grad_out.options(), true);
  if (grad_out.numel() == 0 || empty_map(feature_size)) return in_format(grad, channels_last);
  const BagTables tables = bag_tables(radius, stride, region, grad_out.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor bidx = batch_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "cpr_d2::bag_gather_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BagRow<acc_t> rows =
        bag_row<acc_t>(pts.data_ptr<acc_t>(), bidx.data_ptr<int64_t>(), tables, radius);
    launch_scatter<scalar_t>(g, stride, pts.size(0) * bag, rows, grad);
  });
  return in_format(grad, channels_last);
}

TORCH_LIBRARY_IMPL(cpr_d2, CUDA, m) {
  m.impl("bag_points", &bag_points_cuda);
  m.impl("negative_mask", &negative_mask_cuda);
  m.impl("bilinear_gather", &bilinear_gather_cuda);
  m.impl("bilinear_gather_backward", &bilinear_gather_backward_cuda);
  m.impl("bag_gather", &bag_gather_cuda);
  m.impl("bag_gather_backward", &bag_gather_backward_cuda);
}

}  // namespace cpr_d2
