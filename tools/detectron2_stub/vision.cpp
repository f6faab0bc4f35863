// Minimal `detectron2._C` for building detectron2 0.6 from the PyPI sdist
// `pb1-detectron2==0.6`, which ships without `detectron2/layers/csrc`.
//
// tools/setup_env.sh copies this file to `detectron2/layers/csrc/vision.cpp`
// in the unpacked sdist before building it (CPU only). It provides the build
// information helpers that `detectron2.utils.collect_env` reads, so that
// `import detectron2.layers` / `detectron2.modeling` work. The compiled
// detectron2 ops (rotated boxes, deformable convolution, the C++ COCOeval
// behind `fast_eval_api`) are NOT provided; calling them raises
// AttributeError. This project does not use them.
//
// Only pybind11 is needed here (no ATen), which keeps the build short.
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

namespace {

std::string get_cuda_version() {
  // CPU-only build: no CUDA runtime is linked.
  return std::string("not available");
}

bool has_cuda() {
  return false;
}

std::string get_compiler_version() {
  std::ostringstream ss;
#if defined(__clang_major__)
  ss << "clang " << __clang_major__ << "." << __clang_minor__ << "."
     << __clang_patchlevel__;
#elif defined(__GNUC__)
  ss << "GCC " << __GNUC__ << "." << __GNUC_MINOR__;
#elif defined(_MSC_VER)
  ss << "MSVC " << _MSC_FULL_VER;
#else
  ss << "unknown";
#endif
  return ss.str();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "detectron2 build information only (CPU build from the pb1-detectron2 "
      "sdist; no compiled ops)";
  m.def("get_compiler_version", &get_compiler_version, "get_compiler_version");
  m.def("get_cuda_version", &get_cuda_version, "get_cuda_version");
  m.def("has_cuda", &has_cuda, "has_cuda");
}
