// Declarations of the point ops (registered as torch.ops.cpr_d2.*).
//
//   bag_points               points (N,2), R, s, image (H, W) -> coords (N,P,2), valid (N,P)
//   negative_mask            points (N,2), labels (N,), grid (H, W), s, R, C -> (H*W, C) bool
//   bilinear_gather          features (B,C,H,W), points (M,2), batch_idx (M,), s -> (M, C)
//   bag_gather               features, points (N,2), batch_idx (N,), image_sizes (B,2), R, s
//                            -> features (N,P,C), valid (N,P); bag coordinates never stored
//
// P = 4R(R+1)+1: ring k = 1..R holds 8k points at radius k*s and angles
// 2*pi*t/(8k), in ring order; the annotated point is last. Every op takes an
// optional per-object `region` (N,) in pixels: bags then put their rings
// region / R apart, the negative mask keeps cells closer than region.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "point_math.h"

namespace cpr_d2 {

// ---- shared by every device (point_ops_common.cpp) ----
void check_points(const at::Tensor& points, const char* name);
void check_radius(int64_t radius);
void check_stride(double stride);
// Least and greatest value of an int64 index tensor ({0, -1} when empty): a loop
// on the CPU; on CUDA an aminmax read back to the host (one synchronisation).
struct IndexRange {
  int64_t lo, hi;
};
IndexRange index_range(const at::Tensor& index);
// Checks a (M,) int64 index tensor against batch size B (its range: index_range).
void check_batch_idx(const at::Tensor& batch_idx, int64_t num_points, int64_t batch_size);
void check_features(const at::Tensor& features);
void check_coord_dtype(const at::Tensor& points);
void check_bag_points_args(const at::Tensor& points, int64_t radius, double stride,
                           int64_t image_height, int64_t image_width);
void check_negative_mask_args(const at::Tensor& points, const at::Tensor& labels,
                              int64_t height, int64_t width, double stride, int64_t radius,
                              int64_t num_classes);
// The feature dtype's accumulation dtype: double for double, float otherwise.
at::ScalarType coord_dtype_for(at::ScalarType feature_dtype);
void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name);
void check_image_sizes(const at::Tensor& image_sizes, int64_t batch_size);
// Checks the arguments of a gather and returns the points, contiguous, in
// the coordinate dtype of the features.
at::Tensor prepare_gather(const at::Tensor& features, const at::Tensor& points,
                          const at::Tensor& batch_idx, double stride);
// The same for a backward pass; grad_out holds rows_per_point rows of C
// values per point (1 for the plain gather, P for the bag gather).
at::Tensor prepare_gather_backward(const at::Tensor& grad_out, const at::Tensor& points,
                                   const at::Tensor& batch_idx, double stride,
                                   at::IntArrayRef feature_size, int64_t rows_per_point);
// Output buffer of a gather: uninitialised when the kernel writes every
// element (a zero fill of a large bag tensor costs as much as the gather),
// zeros when the map is empty and nothing will be written.
at::Tensor new_output(at::IntArrayRef size, const at::Tensor& features);
// A zero gradient buffer of the given size in the requested memory format.
at::Tensor zeros_grad(at::IntArrayRef feature_size, const at::TensorOptions& options,
                      bool channels_last);
// (P, 2) float64 CPU tensor: offset of every bag slot from the annotated point.
at::Tensor ring_offsets(int64_t radius, double stride);
// (P, 3) float64 CPU tensor: ring k (0 for the annotated point), cos and sin of
// every bag slot, for bags with per-object ring spacing.
at::Tensor ring_table(int64_t radius);
// Checks an optional (num_points,) region tensor (floating, on `device`, finite
// and >= 0: one host synchronisation).
void check_region(const std::optional<at::Tensor>& region, int64_t num_points,
                  const at::Device& device);
// The region as contiguous float64 pixels; undefined when absent.
at::Tensor region_pixels(const std::optional<at::Tensor>& region);
// NegativeRadii over `pixels` (region_pixels), or R * s for every point.
inline NegativeRadii negative_radii(int64_t radius, double stride, const at::Tensor& pixels) {
  return {static_cast<double>(radius) * stride,
          pixels.defined() ? pixels.data_ptr<double>() : nullptr};
}
// What a BagRow reads, on the device of the kernel: the fixed rings'
// ring_offsets, or, with a region (and R > 0), ring_table and the region in
// float64 pixels.
struct BagTables {
  at::Tensor offsets;
  at::Tensor region;  // undefined for fixed rings
};
BagTables bag_tables(int64_t radius, double stride, const std::optional<at::Tensor>& region,
                     const at::Device& device);

template <typename coord_t>
BagRow<coord_t> bag_row(const coord_t* points, const int64_t* batch_idx, const BagTables& tables,
                        int64_t radius) {
  return {points, batch_idx, tables.offsets.data_ptr<double>(), bag_size(radius),
          tables.region.defined() ? tables.region.data_ptr<double>() : nullptr,
          static_cast<double>(radius)};
}

// ---- CPU ----
std::tuple<at::Tensor, at::Tensor> bag_points_cpu(const at::Tensor& points, int64_t radius,
                                                  double stride, int64_t image_height,
                                                  int64_t image_width,
                                                  const std::optional<at::Tensor>& region);
at::Tensor negative_mask_cpu(const at::Tensor& points, const at::Tensor& labels,
                             int64_t height, int64_t width, double stride, int64_t radius,
                             int64_t num_classes, const std::optional<at::Tensor>& region);
at::Tensor bilinear_gather_cpu(const at::Tensor& features, const at::Tensor& points,
                               const at::Tensor& batch_idx, double stride);
at::Tensor bilinear_gather_backward_cpu(const at::Tensor& grad_out, const at::Tensor& points,
                                        const at::Tensor& batch_idx, double stride,
                                        at::IntArrayRef feature_size, bool channels_last);
std::tuple<at::Tensor, at::Tensor> bag_gather_cpu(const at::Tensor& features,
                                                  const at::Tensor& points,
                                                  const at::Tensor& batch_idx,
                                                  const at::Tensor& image_sizes, int64_t radius,
                                                  double stride,
                                                  const std::optional<at::Tensor>& region);
at::Tensor bag_gather_backward_cpu(const at::Tensor& grad_out, const at::Tensor& points,
                                   const at::Tensor& batch_idx, int64_t radius, double stride,
                                   at::IntArrayRef feature_size, bool channels_last,
                                   const std::optional<at::Tensor>& region);

}  // namespace cpr_d2
