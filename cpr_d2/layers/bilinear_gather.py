"""Bilinear feature gathering at image points, with a backward pass to the features.

Point p of image b is read from features[b] at feature position u = p / s - 0.5,
clamped to the border (what grid_sample computes with align_corners=False and
padding_mode="border"). No gradient flows to the points: they are annotations.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _checks
from ._ext import compiled_op

__all__ = ["bilinear_gather", "bilinear_gather_reference"]


def coord_dtype(features):
    """Coordinate dtype the kernels use for `features`: float64 for float64, else float32."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def is_channels_last(features):
    """Whether `features` is stored channels-last (the gradient then comes back the same way)."""
    return features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()


def _check_call(features, points, batch_idx, stride):
    """The checks of every call (see _checks); the kernel checks the tensors."""
    _checks.check_same_device(features=features, points=points, batch_idx=batch_idx)
    _checks.check_stride(stride)


def _check_args(features, points, batch_idx, stride):
    _checks.check_features(features)
    _checks.check_points(points)
    _checks.check_stride(stride)
    _checks.check_same_device(features=features, points=points, batch_idx=batch_idx)
    _checks.check_index(batch_idx, points.shape[0], features.shape[0], "batch_idx", "image index")


def gather_unchecked_reference(features, points, batch_idx, stride):
    """The reference gather on already-checked arguments: grid_sample per image."""
    _, channels, height, width = features.shape
    out = features.new_zeros((points.shape[0], channels))
    if out.numel() == 0 or height == 0 or width == 0:
        # Nothing to read, but stay on the autograd graph (zero gradient), as the kernel does.
        return out + features.sum() * 0
    pts = points.detach().to(coord_dtype(features))
    for b in torch.unique(batch_idx).tolist():
        rows = (batch_idx == b).nonzero().squeeze(1)
        p = pts[rows]
        # grid_sample maps normalised g to ((g + 1) * W - 1) / 2 = p / s - 0.5. It
        # unnormalises in the features' dtype, so float32 results differ from
        # the kernels' by rounding (about 1e-5 of a cell).
        grid = torch.stack([p[:, 0].double() * (2.0 / (stride * width)) - 1.0,
                            p[:, 1].double() * (2.0 / (stride * height)) - 1.0], dim=-1)
        sampled = F.grid_sample(features[b : b + 1], grid.to(features.dtype).view(1, 1, -1, 2),
                                mode="bilinear", padding_mode="border", align_corners=False)
        out = out.index_copy(0, rows, sampled[0, :, 0].t())
    return out


def bilinear_gather_reference(features, points, batch_idx, stride):
    """PyTorch reference of :func:`bilinear_gather` (grid_sample)."""
    _check_args(features, points, batch_idx, stride)
    return gather_unchecked_reference(features, points, batch_idx, stride)


class _BilinearGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, features, points, batch_idx, stride):
        ctx.save_for_backward(points, batch_idx)
        ctx.stride = stride
        ctx.feature_size = list(features.shape)
        ctx.channels_last = is_channels_last(features)
        return op(features, points, batch_idx, stride)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        points, batch_idx = ctx.saved_tensors
        grad = torch.ops.cpr_d2.bilinear_gather_backward(
            grad_out.contiguous(), points, batch_idx, ctx.stride, ctx.feature_size,
            ctx.channels_last)
        return None, grad, None, None, None


def bilinear_gather(features, points, batch_idx, stride):
    """Bilinearly sampled features at image points.

    Args:
        features: (B, C, H, W) feature maps at stride `stride` (any memory format).
        points: (M, 2) (x, y) pixel coordinates.
        batch_idx: (M,) int64 index of each point's image in [0, B).
        stride: s, pixels per feature cell.

    Returns:
        (M, C) tensor of features.dtype, differentiable w.r.t. `features`.
    """
    _check_call(features, points, batch_idx, stride)
    op = compiled_op("bilinear_gather", features)
    if op is None:
        return bilinear_gather_reference(features, points, batch_idx, stride)
    # The kernels take the points in any floating dtype (and reject the others).
    return _BilinearGather.apply(op, features, points.detach(), batch_idx, float(stride))
