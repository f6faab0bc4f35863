"""Build and install cpr_d2 and its compiled point ops (cpr_d2._C).

The CPU kernels are always built. The CUDA kernels are added when a CUDA
toolkit is found (or FORCE_CUDA=1), unless CPR_D2_NO_CUDA=1. Variables:

  CUDA_HOME / CUDA_PATH   toolkit root (else /usr/local/cuda, else the nvcc on PATH)
  FORCE_CUDA=1            build the CUDA kernels even if the check says no
  CPR_D2_NO_CUDA=1        never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0+PTX"; default: the
                          visible GPUs, or DEFAULT_CUDA_ARCHS without one
  NVCC_FLAGS              extra nvcc flags, space separated
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
# Architectures compiled when no GPU is visible at build time: Ampere and
# Hopper machine code plus Hopper PTX, which newer GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_cuda_home(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and any(
        glob.glob(os.path.join(path, libdir, "libcudart.so*")) for libdir in ("lib64", "lib")
    )


def find_cuda_home():
    """The CUDA toolkit root, or None.

    torch derives CUDA_HOME from the nvcc on PATH when the variable is unset,
    which breaks when that nvcc is a wrapper script (/usr/local/bin/nvcc ->
    CUDA_HOME=/usr/local, link error "cannot find -lcudart"): look for a root
    that really holds the runtime library.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if _looks_like_cuda_home(path):
            return os.path.realpath(path)
    if os.environ.get("CUDA_HOME"):
        print(f"cpr_d2 setup: CUDA_HOME={os.environ['CUDA_HOME']} has no bin/nvcc and "
              "lib64/libcudart.so; ignoring it", file=sys.stderr)
    return None


def _configure_cuda():
    """Decide whether to build CUDA kernels; export CUDA_HOME for torch."""
    if _flag("CPR_D2_NO_CUDA"):
        return False
    cuda_home = find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads
        # CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch

    if _flag("FORCE_CUDA"):
        if not cuda_home:
            sys.exit("cpr_d2 setup: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME "
                     "to the toolkit root (the folder holding bin/nvcc)")
        return True
    if not cuda_home or torch.version.cuda is None:
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return True


def get_extensions():
    with_cuda = _configure_cuda()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*", "*.cpp")))
    define_macros = []
    # No fused multiply-add: the point AP matcher must round every operation on its
    # own, as numpy does, to give the numpy evaluator's results bit for bit.
    extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"]}
    # at::parallel_for runs serially unless the extension itself is compiled
    # with OpenMP; libgomp resolves to the copy torch has already loaded.
    extra_link_args = ["-fopenmp"]
    extension = CppExtension
    if with_cuda:
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join(CSRC, "*", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        nvcc_flags = os.environ.get("NVCC_FLAGS", "").split()
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"] + nvcc_flags
    print(f"cpr_d2 setup: building cpr_d2._C with CPU kernels"
          f"{' and CUDA kernels (CUDA_HOME=' + os.environ['CUDA_HOME'] + ', archs=' + os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs') + ')' if with_cuda else ' only'}")
    return [
        extension(
            "cpr_d2._C",
            sources=[os.path.relpath(s, ROOT) for s in sources],
            include_dirs=[CSRC],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="cpr_d2",
    version="0.1.0",
    description="Coarse point refinement (CPR) and multi-class P2PNet for point-supervised "
    "object localization, as a detectron2 project with compiled point ops",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "benchmarks", "configs")),
    python_requires=">=3.9",
    ext_modules=get_extensions(),
    cmdclass={"build_ext": _build_ext_class()},
)
