"""Negative sampling: which feature cells are negatives for which class.

Cell (i, j) at stride s has its centre at ((j + 0.5) s, (i + 0.5) s). It is a
negative for class c when its centre lies at distance >= R*s from every
annotated point of class c (so a class absent from the image makes every
cell a negative for it). Distances are computed in float64. With `region`
(N,), point j keeps the cells closer than region[j] pixels (its own sampling
region) instead of R*s.
"""
import torch

from . import _checks
from ._ext import compiled_op

__all__ = ["negative_mask", "negative_mask_reference"]


def _check_num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"cpr_d2: num_classes must be an int >= 0, got {num_classes!r}")


def _check_call(points, labels, grid_size, stride, radius, num_classes, region):
    """The checks of every call (see _checks); the kernel checks the tensors."""
    _checks.check_same_device(points=points, labels=labels)
    _checks.check_size(grid_size, "grid_size (height, width)")
    _checks.check_stride(stride)
    _checks.check_radius(radius)
    _check_num_classes(num_classes)
    _checks.check_region_type(region)


def _check_args(points, labels, grid_size, stride, radius, num_classes, region):
    _checks.check_points(points)
    _checks.check_size(grid_size, "grid_size (height, width)")
    _checks.check_stride(stride)
    _checks.check_radius(radius)
    _check_num_classes(num_classes)
    _checks.check_same_device(points=points, labels=labels)
    _checks.check_index(labels, points.shape[0], num_classes, "labels", "class index")
    _checks.check_region(region, points.shape[0], points.device)


def negative_mask_reference(points, labels, grid_size, stride, radius, num_classes, region=None):
    """PyTorch reference of :func:`negative_mask` (O(H*W*N) memory)."""
    _check_args(points, labels, grid_size, stride, radius, num_classes, region)
    height, width = grid_size
    device = points.device
    if points.shape[0] == 0:
        return torch.ones(height * width, num_classes, dtype=torch.bool, device=device)
    pts = points.double()
    ys = (torch.arange(height, dtype=torch.float64, device=device) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) * stride
    cy, cx = (g.reshape(-1) for g in torch.meshgrid(ys, xs, indexing="ij"))
    dx = cx[:, None] - pts[None, :, 0]
    dy = cy[:, None] - pts[None, :, 1]
    r = radius * stride if region is None else region.double()
    near = (dx * dx + dy * dy) < r * r  # (H*W, N)
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
    return (near.to(torch.float64) @ onehot) == 0


def negative_mask(points, labels, grid_size, stride, radius, num_classes, region=None):
    """(H*W, C) bool: True where cell (i, j) (row-major) is a negative for class c.

    Args:
        points: (N, 2) annotated (x, y) pixel coordinates of one image.
        labels: (N,) int64 class indices in [0, num_classes).
        grid_size: (H, W) of the feature map.
        stride: s, pixels per feature cell.
        radius: R; cells closer than R*s pixels to a point of class c are not
            negatives for c.
        num_classes: C.
        region: optional (N,) float tensor of per-point radii in pixels (finite, >= 0),
            used instead of R*s; `radius` is then unused.
    """
    _check_call(points, labels, grid_size, stride, radius, num_classes, region)
    op = compiled_op("negative_mask", points)
    if op is None:
        return negative_mask_reference(points, labels, grid_size, stride, radius, num_classes,
                                       region)
    return op(points, labels, int(grid_size[0]), int(grid_size[1]), float(stride), int(radius),
              int(num_classes), region)
