"""Positive-bag generation: the ring points around every annotated point.

Bag of point a with radius R and stride s: for ring k = 1..R, the 8k points
a + k*s*(cos 2*pi*t/(8k), sin 2*pi*t/(8k)), t = 0..8k-1, in ring order, then
a itself (last). A bag point is valid when 0 <= x <= width and
0 <= y <= height of its image.

Per-object regions: given `region` (N,), the radius in pixels of each object's
sampling region, object j's R rings lie `region[j] / R` pixels apart instead of
s, so every bag covers its own disc of radius region[j] with the same 4R(R+1)+1
points (a small object is sampled finely, a large one coarsely). Offsets are
then (k * (region[j] / R)) * (cos, sin), in float64; with region[j] = R*s and an
exact quotient that is the fixed bag bit for bit. R = 0 ignores the region.
"""
import functools
import math

import torch

from . import _checks
from ._ext import compiled_op

__all__ = ["bag_size", "ring_offsets", "ring_table", "bag_points", "bag_points_reference"]


def bag_size(radius):
    """Number of points in a bag of radius R: 4R(R+1) + 1 (R = 8 -> 289)."""
    return 4 * radius * (radius + 1) + 1


@functools.lru_cache(maxsize=64)
def _ring_table_cpu(radius):
    rows = []
    for k in range(1, radius + 1):
        for t in range(8 * k):
            # Same operation order as the kernels (csrc/point_ops/point_ops_common.cpp),
            # so the compiled op and the reference agree bit for bit.
            angle = math.pi * t / (4 * k)
            rows.append((float(k), math.cos(angle), math.sin(angle)))
    rows.append((0.0, 0.0, 0.0))
    return torch.tensor(rows, dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _ring_offsets_cpu(radius, stride):
    table = _ring_table_cpu(radius)
    return (table[:, :1] * stride) * table[:, 1:]  # (k s) cos, (k s) sin


def ring_table(radius, device=None):
    """(P, 3) float64: ring k (0 for the annotated point), cos and sin of every bag slot."""
    _checks.check_radius(radius)
    return _ring_table_cpu(int(radius)).to(device)


def ring_offsets(radius, stride, device=None):
    """(P, 2) float64 offsets of every bag slot from its annotated point."""
    _checks.check_radius(radius)
    _checks.check_stride(stride)
    return _ring_offsets_cpu(int(radius), float(stride)).to(device)


def bag_coordinates(points, radius, stride, region=None):
    """(N, P, 2) bag coordinates, added in float64 and rounded once to points.dtype;
    with `region` (N,) the rings of object j are region[j] / radius pixels apart."""
    if region is None or radius == 0:
        offsets = ring_offsets(radius, stride, points.device)[None]
    else:
        table = ring_table(radius, points.device)
        pixels = region.double()
        # An element-wise quotient, as the kernels compute it (a tensor / scalar
        # division may multiply by the reciprocal instead).
        spacing = pixels / torch.full_like(pixels, float(radius))
        ring = table[None, :, 0] * spacing[:, None]  # (N, P) pixels
        offsets = ring[..., None] * table[None, :, 1:]
    return (points.double()[:, None, :] + offsets).to(points.dtype)


def inside_image(coords, height, width):
    """Validity of (..., 2) coordinates: 0 <= x <= width and 0 <= y <= height (NaN: invalid)."""
    x, y = coords[..., 0], coords[..., 1]
    return (x >= 0) & (y >= 0) & (x <= width) & (y <= height)


def _check_call(points, radius, stride, image_size, region):
    """The checks of every call (see _checks); the kernel checks the tensors."""
    _checks.check_tensor(points, "points")
    _checks.check_radius(radius)
    _checks.check_stride(stride)
    _checks.check_size(image_size, "image_size (height, width)")
    _checks.check_region_type(region)


def _check_args(points, radius, stride, image_size, region):
    _checks.check_points(points)
    if points.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cpr_d2: points must be float32 or float64, got {points.dtype}")
    _checks.check_radius(radius)
    _checks.check_stride(stride)
    _checks.check_size(image_size, "image_size (height, width)")
    _checks.check_region(region, points.shape[0], points.device)


def bag_points_reference(points, radius, stride, image_size, region=None):
    """PyTorch reference of :func:`bag_points`."""
    _check_args(points, radius, stride, image_size, region)
    coords = bag_coordinates(points, radius, stride, region)
    return coords, inside_image(coords, image_size[0], image_size[1])


def bag_points(points, radius, stride, image_size, region=None):
    """Positive bags of `points` on one image.

    Args:
        points: (N, 2) float32/float64 annotated (x, y) pixel coordinates.
        radius: R, the number of rings (int >= 0).
        stride: s, pixels between rings (the feature stride).
        image_size: (height, width) of the image, in pixels.
        region: optional (N,) float tensor, each object's sampling radius in pixels
            (finite, >= 0); its rings are then region / R apart and `stride` is unused.

    Returns:
        coords (N, 4R(R+1)+1, 2) of points.dtype, and valid (N, 4R(R+1)+1) bool.
    """
    _check_call(points, radius, stride, image_size, region)
    op = compiled_op("bag_points", points, takes=(torch.float32, torch.float64))
    if op is None:
        return bag_points_reference(points, radius, stride, image_size, region)
    return op(points, int(radius), float(stride), int(image_size[0]), int(image_size[1]), region)
