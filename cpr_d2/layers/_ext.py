"""Access to the compiled point ops, with a logged fallback when they are missing.

`import cpr_d2` must work without the compiled extension: every wrapper asks
`compiled_op(name, tensor)` for the kernel and runs the PyTorch reference when
it gets None. The reason is logged once per process (and per device/dtype).
"""
import logging

import torch

__all__ = ["compiled_op", "extension_status"]

logger = logging.getLogger(__name__)

# dtypes each device's kernels are compiled for (see csrc/point_ops).
_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _load_extension():
    try:
        from cpr_d2 import _C
    except (ImportError, OSError) as e:
        return None, f"{type(e).__name__}: {e}"
    return _C, None


_C, _LOAD_ERROR = _load_extension()
_logged = set()


def _log_once(key, message, *args):
    if key not in _logged:
        _logged.add(key)
        logger.warning(message, *args)


def has_kernel(name, device_type):
    """Whether torch.ops.cpr_d2.<name> has a kernel registered for this device type."""
    key = _DISPATCH_KEYS.get(device_type)
    return (
        _C is not None
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"cpr_d2::{name}", key)
    )


def compiled_op(name, tensor, takes=None):
    """torch.ops.cpr_d2.<name> if a compiled kernel serves `tensor`'s device and dtype, else None.

    `takes`: the dtypes the op accepts at all (default: every floating dtype). For
    any other dtype the answer is None without a log line: that is no fallback, the
    reference raises the TypeError.
    """
    accepted = tensor.dtype in takes if takes is not None else tensor.is_floating_point()
    if not accepted:
        return None
    if _C is None:
        _log_once(
            "missing",
            "cpr_d2._C is not available (%s); the point ops fall back to the slower PyTorch "
            "reference. Rebuild it with `CPR_D2_REBUILD=1 bash tools/setup_env.sh` and check "
            "`python -m cpr_d2.collect_env`.",
            _LOAD_ERROR,
        )
        return None
    device_type = tensor.device.type
    if not has_kernel(name, device_type):
        _log_once(
            ("device", name, device_type),
            "cpr_d2._C has no %s kernel for %s (built with CUDA: %s); using the PyTorch "
            "reference for it.",
            device_type,
            name,
            _C.with_cuda(),
        )
        return None
    if tensor.dtype not in _KERNEL_DTYPES.get(device_type, ()):
        _log_once(
            ("dtype", name, device_type, tensor.dtype),
            "cpr_d2 %s has no %s kernel for %s; using the PyTorch reference for it.",
            name,
            device_type,
            tensor.dtype,
        )
        return None
    return getattr(torch.ops.cpr_d2, name)


def extension_status():
    """A dict describing the compiled extension: built, load error, CUDA build, kernels."""
    ops = ("bag_points", "negative_mask", "bilinear_gather", "bag_gather", "point_ap_match")
    return {
        "built": _C is not None,
        "error": _LOAD_ERROR,
        "path": getattr(_C, "__file__", None),
        "with_cuda": bool(_C is not None and _C.with_cuda()),
        "cuda_version": int(_C.cuda_version()) if _C is not None else 0,
        "kernels": {
            device: [op for op in ops if has_kernel(op, device)] for device in _DISPATCH_KEYS
        },
    }
