// Argument checks and the ring-offset table, shared by the CPU and CUDA ops.
// The checks raise the Python error types of the wrappers' checks
// (cpr_d2/layers/_checks.py): TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE ->
// TypeError.
#include "point_ops.h"

#include <algorithm>
#include <cmath>

#include "point_math.h"

namespace cpr_d2 {

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "cpr_d2: ", a_name, " is on ", a.device(), " but ",
                    b_name, " is on ", b.device(), "; move them to the same device");
}

void check_points(const at::Tensor& points, const char* name) {
  TORCH_CHECK_VALUE(points.dim() == 2 && points.size(1) == 2, "cpr_d2: ", name,
                    " must have shape (N, 2) holding (x, y) pixel coordinates, got shape ",
                    points.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(points.scalar_type()), "cpr_d2: ", name,
                   " must be a floating tensor, got ", points.scalar_type());
}

void check_radius(int64_t radius) {
  TORCH_CHECK_VALUE(radius >= 0, "cpr_d2: the bag radius R must be >= 0, got ", radius);
  // A bag of radius R holds 4R(R+1)+1 points; far larger radii are a unit
  // mistake (pixels instead of rings), not a bag anyone can afford.
  TORCH_CHECK_VALUE(radius <= 4096, "cpr_d2: the bag radius R (in rings) must be <= 4096, got ",
                    radius);
}

void check_stride(double stride) {
  TORCH_CHECK_VALUE(std::isfinite(stride) && stride > 0,
                    "cpr_d2: the stride s must be a finite number > 0, got ", stride);
}

IndexRange index_range(const at::Tensor& index) {
  if (index.numel() == 0) return {0, -1};
  if (index.device().is_cpu()) {
    // On the host: one plain loop over the values, no reduction op.
    const at::Tensor values = index.contiguous();
    const int64_t* v = values.data_ptr<int64_t>();
    int64_t lo = v[0], hi = v[0];
    for (int64_t i = 1, n = values.numel(); i < n; ++i) {
      lo = std::min(lo, v[i]);
      hi = std::max(hi, v[i]);
    }
    return {lo, hi};
  }
  // A CUDA kernel cannot raise an error, so the range is read back here: one
  // reduction and one host synchronisation, the only range check of a CUDA call
  // (the Python wrappers leave it to the op).
  const auto range = at::aminmax(index);
  return {std::get<0>(range).item<int64_t>(), std::get<1>(range).item<int64_t>()};
}

void check_batch_idx(const at::Tensor& batch_idx, int64_t num_points, int64_t batch_size) {
  TORCH_CHECK_VALUE(batch_idx.dim() == 1 && batch_idx.size(0) == num_points,
                    "cpr_d2: batch_idx must have shape (", num_points,
                    ",), one image index per point, got shape ", batch_idx.sizes());
  TORCH_CHECK_TYPE(batch_idx.scalar_type() == at::kLong, "cpr_d2: batch_idx must be int64, got ",
                   batch_idx.scalar_type());
  const IndexRange range = index_range(batch_idx);
  TORCH_CHECK_VALUE(range.lo >= 0 && range.hi < batch_size,
                    "cpr_d2: batch_idx values must lie in [0, ", batch_size, ") for a batch of ",
                    batch_size, " feature maps, got [", range.lo, ", ", range.hi, "]");
}

void check_coord_dtype(const at::Tensor& points) {
  TORCH_CHECK_TYPE(points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble,
                   "cpr_d2: points must be float32 or float64, got ", points.scalar_type());
}

void check_bag_points_args(const at::Tensor& points, int64_t radius, double stride,
                           int64_t image_height, int64_t image_width) {
  check_points(points, "points");
  check_coord_dtype(points);
  check_radius(radius);
  check_stride(stride);
  TORCH_CHECK_VALUE(image_height >= 0 && image_width >= 0,
                    "cpr_d2: the image size must be non-negative, got (", image_height, ", ",
                    image_width, ")");
}

void check_negative_mask_args(const at::Tensor& points, const at::Tensor& labels,
                              int64_t height, int64_t width, double stride, int64_t radius,
                              int64_t num_classes) {
  check_points(points, "points");
  check_radius(radius);
  check_stride(stride);
  check_same_device(points, "points", labels, "labels");
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, "cpr_d2: the feature grid size must be "
                    "non-negative, got (", height, ", ", width, ")");
  TORCH_CHECK_VALUE(num_classes >= 0, "cpr_d2: num_classes must be >= 0, got ", num_classes);
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == points.size(0),
                    "cpr_d2: labels must have shape (", points.size(0),
                    ",), one class per point, got shape ", labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "cpr_d2: labels must be int64, got ",
                   labels.scalar_type());
  const IndexRange range = index_range(labels);
  TORCH_CHECK_VALUE(range.lo >= 0 && range.hi < num_classes, "cpr_d2: labels values must lie in "
                    "[0, ", num_classes, "), got [", range.lo, ", ", range.hi,
                    "] (contiguous class indices, not dataset category ids)");
}

void check_features(const at::Tensor& features) {
  TORCH_CHECK_VALUE(features.dim() == 4,
                    "cpr_d2: features must have shape (B, C, H, W), got shape ", features.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()),
                   "cpr_d2: features must be a floating tensor, got ", features.scalar_type());
}

at::ScalarType coord_dtype_for(at::ScalarType feature_dtype) {
  return feature_dtype == at::kDouble ? at::kDouble : at::kFloat;
}


void check_feature_size(at::IntArrayRef feature_size) {
  TORCH_CHECK_VALUE(feature_size.size() == 4, "cpr_d2: feature_size must be (B, C, H, W), got ",
                    feature_size);
  for (const int64_t v : feature_size) {
    TORCH_CHECK_VALUE(v >= 0, "cpr_d2: feature_size must be non-negative, got ", feature_size);
  }
}

void check_image_sizes(const at::Tensor& image_sizes, int64_t batch_size) {
  TORCH_CHECK_VALUE(image_sizes.dim() == 2 && image_sizes.size(0) == batch_size &&
                        image_sizes.size(1) == 2,
                    "cpr_d2: image_sizes must have shape (", batch_size,
                    ", 2) holding (height, width) of every image, got shape ",
                    image_sizes.sizes());
  TORCH_CHECK_TYPE(image_sizes.scalar_type() == at::kLong,
                   "cpr_d2: image_sizes must be int64, got ", image_sizes.scalar_type());
}

at::Tensor prepare_gather(const at::Tensor& features, const at::Tensor& points,
                          const at::Tensor& batch_idx, double stride) {
  check_features(features);
  check_points(points, "points");
  check_stride(stride);
  check_same_device(features, "features", points, "points");
  check_same_device(features, "features", batch_idx, "batch_idx");
  check_batch_idx(batch_idx, points.size(0), features.size(0));
  return points.to(coord_dtype_for(features.scalar_type())).contiguous();
}

at::Tensor prepare_gather_backward(const at::Tensor& grad_out, const at::Tensor& points,
                                   const at::Tensor& batch_idx, double stride,
                                   at::IntArrayRef feature_size, int64_t rows_per_point) {
  check_feature_size(feature_size);
  check_points(points, "points");
  check_stride(stride);
  check_same_device(grad_out, "grad_out", points, "points");
  check_same_device(grad_out, "grad_out", batch_idx, "batch_idx");
  check_batch_idx(batch_idx, points.size(0), feature_size[0]);
  TORCH_CHECK_VALUE(grad_out.numel() == points.size(0) * rows_per_point * feature_size[1],
                    "cpr_d2: grad_out holds ", grad_out.numel(), " values, expected ",
                    points.size(0), " x ", rows_per_point, " x ", feature_size[1]);
  return points.to(coord_dtype_for(grad_out.scalar_type())).contiguous();
}

at::Tensor new_output(at::IntArrayRef size, const at::Tensor& features) {
  const bool empty_map = features.size(2) == 0 || features.size(3) == 0;
  return empty_map ? at::zeros(size, features.options()) : at::empty(size, features.options());
}

at::Tensor zeros_grad(at::IntArrayRef feature_size, const at::TensorOptions& options,
                      bool channels_last) {
  return at::zeros(feature_size, options.memory_format(channels_last
                                                           ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
}

at::Tensor ring_table(int64_t radius) {
  const int64_t size = bag_size(radius);
  at::Tensor table = at::zeros({size, 3}, at::kDouble);
  double* out = table.data_ptr<double>();
  for (int64_t idx = 0; idx + 1 < size; ++idx) {
    int64_t ring, t;
    ring_slot(idx, &ring, &t);
    // Same operation order as the PyTorch reference, so the tables match bit
    // for bit: angle = pi * t / (4k) (= 2 pi t / 8k).
    const double angle = M_PI * static_cast<double>(t) / (4.0 * static_cast<double>(ring));
    out[3 * idx] = static_cast<double>(ring);
    out[3 * idx + 1] = std::cos(angle);
    out[3 * idx + 2] = std::sin(angle);
  }
  return table;  // the annotated point: ring 0, offset (0, 0)
}

at::Tensor ring_offsets(int64_t radius, double stride) {
  const at::Tensor table = ring_table(radius);
  const double* unit = table.data_ptr<double>();
  at::Tensor offsets = at::empty({table.size(0), 2}, at::kDouble);
  double* out = offsets.data_ptr<double>();
  for (int64_t idx = 0; idx < table.size(0); ++idx) {
    spaced_offset(unit, idx, stride, &out[2 * idx], &out[2 * idx + 1]);  // (k s) cos, (k s) sin
  }
  return offsets;
}

void check_region(const std::optional<at::Tensor>& region, int64_t num_points,
                  const at::Device& device) {
  if (!region.has_value() || !region->defined()) return;
  const at::Tensor& r = *region;
  TORCH_CHECK_VALUE(r.dim() == 1 && r.size(0) == num_points, "cpr_d2: region must have shape (",
                    num_points, ",), one radius in pixels per point, got shape ", r.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(r.scalar_type()),
                   "cpr_d2: region must be a floating tensor, got ", r.scalar_type());
  TORCH_CHECK_VALUE(r.device() == device, "cpr_d2: region is on ", r.device(),
                    " but the points are on ", device);
  if (num_points == 0) return;
  TORCH_CHECK_VALUE((at::isfinite(r) & (r >= 0)).all().item<bool>(),
                    "cpr_d2: region radii must be finite and >= 0 pixels");
}

at::Tensor region_pixels(const std::optional<at::Tensor>& region) {
  if (!region.has_value() || !region->defined()) return at::Tensor();
  return region->to(at::kDouble).contiguous();
}

BagTables bag_tables(int64_t radius, double stride, const std::optional<at::Tensor>& region,
                     const at::Device& device) {
  // R = 0: the bag is the annotated point alone, whatever its region.
  const at::Tensor pixels = radius == 0 ? at::Tensor() : region_pixels(region);
  if (!pixels.defined()) return {ring_offsets(radius, stride).to(device), pixels};
  return {ring_table(radius).to(device), pixels};
}

}  // namespace cpr_d2
