"""Fused bag generation and feature gathering.

Equivalent to gathering every point of `bag_points` with `bilinear_gather`,
but the kernels compute each bag point's coordinates on the fly (forward and
backward) instead of storing the (N, P, 2) coordinates. Invalid bag points
(off their image) are still read, clamped to the border; `valid` says which
to use. With `region`, each object's bag has its own ring spacing (see
bag_points), forward and backward alike.
"""
import torch
from torch.autograd.function import once_differentiable

from . import _checks
from ._ext import compiled_op
from .bag_points import bag_coordinates, bag_size, inside_image
from .bilinear_gather import coord_dtype, gather_unchecked_reference, is_channels_last

__all__ = ["bag_gather", "bag_gather_reference"]


def _check_call(features, points, batch_idx, image_sizes, radius, stride, region):
    """The checks of every call (see _checks); the kernel checks the tensors."""
    _checks.check_same_device(
        features=features, points=points, batch_idx=batch_idx, image_sizes=image_sizes)
    _checks.check_radius(radius)
    _checks.check_stride(stride)
    _checks.check_region_type(region)


def _check_args(features, points, batch_idx, image_sizes, radius, stride, region):
    _checks.check_features(features)
    _checks.check_points(points)
    _checks.check_radius(radius)
    _checks.check_stride(stride)
    _checks.check_same_device(
        features=features, points=points, batch_idx=batch_idx, image_sizes=image_sizes)
    _checks.check_index(batch_idx, points.shape[0], features.shape[0], "batch_idx", "image index")
    _checks.check_image_sizes(image_sizes, features.shape[0])
    _checks.check_region(region, points.shape[0], points.device)


def bag_gather_reference(features, points, batch_idx, image_sizes, radius, stride, region=None):
    """PyTorch reference of :func:`bag_gather`: bag coordinates, then grid_sample."""
    _check_args(features, points, batch_idx, image_sizes, radius, stride, region)
    num, bag = points.shape[0], bag_size(radius)
    coords = bag_coordinates(points.detach().to(coord_dtype(features)), radius, stride, region)
    hw = image_sizes[batch_idx]
    valid = inside_image(coords, hw[:, None, 0], hw[:, None, 1])
    feats = gather_unchecked_reference(
        features, coords.reshape(-1, 2), batch_idx.repeat_interleave(bag), stride)
    return feats.view(num, bag, features.shape[1]), valid


class _BagGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, features, points, batch_idx, image_sizes, radius, stride, region):
        feats, valid = op(features, points, batch_idx, image_sizes, radius, stride, region)
        ctx.mark_non_differentiable(valid)
        ctx.save_for_backward(points, batch_idx, region)
        ctx.radius, ctx.stride = radius, stride
        ctx.feature_size = list(features.shape)
        ctx.channels_last = is_channels_last(features)
        return feats, valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_feats, _grad_valid):
        points, batch_idx, region = ctx.saved_tensors
        grad = torch.ops.cpr_d2.bag_gather_backward(
            grad_feats.contiguous(), points, batch_idx, ctx.radius, ctx.stride, ctx.feature_size,
            ctx.channels_last, region)
        return None, grad, None, None, None, None, None, None


def bag_gather(features, points, batch_idx, image_sizes, radius, stride, region=None):
    """Features of every positive-bag point of every annotated point.

    Args:
        features: (B, C, H, W) feature maps at stride `stride`.
        points: (N, 2) annotated (x, y) pixel coordinates.
        batch_idx: (N,) int64 image index of each point.
        image_sizes: (B, 2) int64 (height, width) of each image, for validity.
        radius: R, rings per bag.
        stride: s, pixels per feature cell and between rings.
        region: optional (N,) float tensor, each object's sampling radius in pixels; its
            rings are then region / R apart (the features are still read at stride s).

    Returns:
        features (N, 4R(R+1)+1, C), differentiable w.r.t. `features`, and
        valid (N, 4R(R+1)+1) bool; bag slots in the order of `bag_points`.
    """
    _check_call(features, points, batch_idx, image_sizes, radius, stride, region)
    op = compiled_op("bag_gather", features)
    if op is None:
        return bag_gather_reference(features, points, batch_idx, image_sizes, radius, stride,
                                    region)
    # The kernels take the points in any floating dtype (and reject the others).
    region = None if region is None else region.detach()
    return _BagGather.apply(op, features, points.detach(), batch_idx, image_sizes, int(radius),
                            float(stride), region)
