// Registers the cpr_d2 operator schemas (torch.ops.cpr_d2.*) and the small
// Python module cpr_d2._C that reports how the extension was built. The
// kernels register themselves per device in point_ops/point_ops_{cpu,cuda} and
// point_ap/point_ap_{cpu,cuda}.
// The backward ops return the features' gradient in channels-last memory
// format when `channels_last` is set (pass the forward input's format).
// `region` (optional, (N,) floating, pixels) gives every object its own
// sampling radius: its R rings lie region / R apart (bags), or it keeps the
// cells closer than region pixels (negative mask) instead of R * stride.
#include <torch/extension.h>
#include <torch/library.h>

namespace cpr_d2 {

#if defined(WITH_CUDA)
int64_t cuda_version();  // point_ops_cuda.cu
#endif

}  // namespace cpr_d2

TORCH_LIBRARY(cpr_d2, m) {
  m.def(
      "bag_points(Tensor points, int radius, float stride, int image_height, int image_width,"
      " Tensor? region=None) -> (Tensor coords, Tensor valid)");
  m.def(
      "negative_mask(Tensor points, Tensor labels, int height, int width, float stride,"
      " int radius, int num_classes, Tensor? region=None) -> Tensor");
  m.def("bilinear_gather(Tensor features, Tensor points, Tensor batch_idx, float stride) -> Tensor");
  m.def(
      "bilinear_gather_backward(Tensor grad_out, Tensor points, Tensor batch_idx, float stride,"
      " int[] feature_size, bool channels_last=False) -> Tensor");
  m.def(
      "bag_gather(Tensor features, Tensor points, Tensor batch_idx, Tensor image_sizes,"
      " int radius, float stride, Tensor? region=None) -> (Tensor features, Tensor valid)");
  m.def(
      "bag_gather_backward(Tensor grad_out, Tensor points, Tensor batch_idx, int radius,"
      " float stride, int[] feature_size, bool channels_last=False, Tensor? region=None)"
      " -> Tensor");
  // point_ap/point_ap.h: the greedy matching of the point AP evaluator.
  m.def(
      "point_ap_match(Tensor det_key, Tensor det_xy, Tensor det_block, Tensor gt_key,"
      " Tensor gt_xy, Tensor gt_wh, Tensor ignore, float[] taus) -> (Tensor tp, Tensor ignore_d2)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cpr_d2 compiled point ops (registered as torch.ops.cpr_d2.*)";
  m.def("with_cuda", []() {
#if defined(WITH_CUDA)
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  m.def("cuda_version", []() -> int64_t {
#if defined(WITH_CUDA)
    return cpr_d2::cuda_version();
#else
    return 0;
#endif
  }, "CUDA runtime version the kernels were compiled against (e.g. 13000), 0 without CUDA.");
}
