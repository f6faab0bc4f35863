"""Argument checks shared by the point-op wrappers (ValueError/TypeError).

Each check lives once per path. Every call checks its Python side: which
arguments are tensors, the scalar arguments (types and ranges, before they are
converted for the op) and that the tensors share the device that picks the
kernel. The compiled kernels check the tensors (shapes, dtypes, index ranges,
region radii) themselves and raise the same error types (csrc/point_ops,
TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), so the wrappers do not repeat those
checks before a kernel call: on CUDA each of them would cost a host
synchronisation. The PyTorch references, which run when no kernel serves a call,
check everything here.
"""
import math
import numbers

import torch


def check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cpr_d2: {name} must be a torch.Tensor, got {type(x).__name__}")


def check_points(points, name="points"):
    check_tensor(points, name)
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(
            f"cpr_d2: {name} must have shape (N, 2) holding (x, y) pixel coordinates, "
            f"got {tuple(points.shape)}"
        )
    if not points.is_floating_point():
        raise TypeError(f"cpr_d2: {name} must be a floating tensor, got {points.dtype}")


def check_radius(radius):
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral):
        raise TypeError(f"cpr_d2: the bag radius R must be an int (rings), got {radius!r}")
    if not 0 <= radius <= 4096:
        raise ValueError(f"cpr_d2: the bag radius R must be in [0, 4096] rings, got {radius}")


def check_stride(stride):
    if isinstance(stride, bool) or not isinstance(stride, numbers.Real):
        raise TypeError(f"cpr_d2: the stride s must be a number, got {stride!r}")
    if not (math.isfinite(stride) and stride > 0):
        raise ValueError(f"cpr_d2: the stride s must be a finite number > 0, got {stride}")


def check_size(size, name, length=2):
    if (
        not isinstance(size, (tuple, list))
        or len(size) != length
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)
        or min(size) < 0
    ):
        raise ValueError(f"cpr_d2: {name} must be {length} non-negative ints, got {size!r}")


def check_features(features):
    check_tensor(features, "features")
    if features.dim() != 4:
        raise ValueError(
            f"cpr_d2: features must have shape (B, C, H, W), got {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise TypeError(f"cpr_d2: features must be a floating tensor, got {features.dtype}")


def check_same_device(**tensors):
    """Tensors (TypeError otherwise), all on one device."""
    for name, t in tensors.items():
        check_tensor(t, name)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"cpr_d2: tensors must share one device, got {listing}")


def check_index(index, length, upper, name, what):
    """A (length,) int64 tensor with values in [0, upper). For the references only:
    the range is read back with an aminmax (a host synchronisation on CUDA), which
    the kernels' own range check makes unnecessary before a kernel call."""
    check_tensor(index, name)
    if index.dim() != 1 or index.shape[0] != length:
        raise ValueError(
            f"cpr_d2: {name} must have shape ({length},), one {what} per point, "
            f"got {tuple(index.shape)}"
        )
    if index.dtype != torch.int64:
        raise TypeError(f"cpr_d2: {name} must be int64, got {index.dtype}")
    if length:
        lo, hi = (int(v) for v in torch.aminmax(index))
        if lo < 0 or hi >= upper:
            raise ValueError(f"cpr_d2: {name} values must lie in [0, {upper}), got [{lo}, {hi}]")


def check_region_type(region):
    """None or a tensor (what the kernels check of it is left to them)."""
    if region is not None:
        check_tensor(region, "region")


def check_region(region, num_points, device):
    """None, or a (num_points,) floating tensor of finite per-object radii >= 0 (pixels)."""
    if region is None:
        return
    check_tensor(region, "region")
    if region.dim() != 1 or region.shape[0] != num_points:
        raise ValueError(
            f"cpr_d2: region must have shape ({num_points},), one radius in pixels per point, "
            f"got {tuple(region.shape)}"
        )
    if not region.is_floating_point():
        raise TypeError(f"cpr_d2: region must be a floating tensor, got {region.dtype}")
    if region.device != device:
        raise ValueError(f"cpr_d2: region is on {region.device} but the points are on {device}")
    if num_points and not bool(torch.isfinite(region).all() & (region >= 0).all()):
        bad = region[~(torch.isfinite(region) & (region >= 0))][0].item()
        raise ValueError(f"cpr_d2: region radii must be finite and >= 0 pixels, got {bad}")


def check_image_sizes(image_sizes, batch_size):
    check_tensor(image_sizes, "image_sizes")
    if image_sizes.shape != (batch_size, 2):
        raise ValueError(
            f"cpr_d2: image_sizes must have shape ({batch_size}, 2) holding (height, width) "
            f"of every image, got {tuple(image_sizes.shape)}"
        )
    if image_sizes.dtype != torch.int64:
        raise TypeError(f"cpr_d2: image_sizes must be int64, got {image_sizes.dtype}")
