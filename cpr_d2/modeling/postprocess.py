"""From the network's input pixels back to the original image's, for CPRNet's refinement
and P2PNet's inference alike (what detectron2's ``detector_postprocess`` does for boxes).

The network sees each image resized (its size in the ImageList, before padding); the
input dict's "height" and "width" give the original size. Points are scaled per axis by
original / input, x by width and y by height.

Flipped views (CPRNet's MODEL.CPR.REFINE_FLIPS, P2PNet's MODEL.P2PNET.TEST_FLIPS): a
flip maps x to width - x (y to height - y) in the input's pixels and in the original
image's alike, so a view's points are mapped back before or after the rescaling.

The soft count (P2PNet's MODEL.P2PNET.COUNT_RULE "soft") turns an image's kept scores and
its area into a count (cpr_d2/engine/count_calibration.py fits its coefficients).
"""
import numpy as np

__all__ = ["FLIPS", "check_flips", "flip_points", "flipped_image_input",
           "COUNT_RULES", "original_size_and_scale", "rescale_points", "soft_count"]

FLIPS = ("horizontal", "vertical", "both")
# MODEL.P2PNET.COUNT_RULE: the points above the counting threshold, or the soft count.
COUNT_RULES = ("threshold", "soft")
_FLIP_DIMS = {"horizontal": [-1], "vertical": [-2], "both": [-2, -1]}


def check_flips(flips, key):
    """`flips` (a config list) as a tuple of distinct names out of FLIPS; ValueError naming
    the config `key` otherwise (a bare string too, which would read as its letters)."""
    if isinstance(flips, str):
        raise ValueError(f"{key} is a list of flips, got the string {flips!r}; "
                         f"e.g. {key} \"['{flips}']\"")
    flips = tuple(flips)
    bad = [f for f in flips if f not in FLIPS]
    if bad or len(set(flips)) != len(flips):
        raise ValueError(f"{key} takes distinct flips out of {', '.join(FLIPS)} "
                         f"(empty: the image as it is), got {list(flips)}; "
                         f"e.g. {key} \"['horizontal', 'vertical', 'both']\"")
    return flips


def flip_points(points, width, height, flip):
    """Points (..., 2), (x, y), of an image of `width` x `height` mapped by `flip` ("none"
    or one of FLIPS), as a new tensor; a flip is its own inverse."""
    out = points.clone()
    if flip in ("horizontal", "both"):
        out[..., 0] = width - out[..., 0]
    if flip in ("vertical", "both"):
        out[..., 1] = height - out[..., 1]
    return out


def flipped_image_input(inp, flip):
    """The input dict `inp` with its "image" (C, H, W) flipped (other keys as they are);
    `inp` itself for "none"."""
    if flip == "none":
        return inp
    return {**inp, "image": inp["image"].flip(_FLIP_DIMS[flip])}


def original_size_and_scale(batched_input, image_size, like):
    """The original size (height, width) of one input and the (2,) factor (x, y) that takes
    its points from the network input's pixels to the original's.

    Args:
        batched_input: the input dict; its "height" and "width", where given, are the
            original size (default: the input size, factor 1).
        image_size: (height, width) of the image as the network saw it (unpadded).
        like: a tensor whose dtype and device the factor takes.
    """
    height, width = image_size
    out_h, out_w = batched_input.get("height", height), batched_input.get("width", width)
    return (out_h, out_w), like.new_tensor([out_w / width, out_h / height])


def rescale_points(points, scale, clip_size=None):
    """Points (..., 2), (x, y), times `scale` (original_size_and_scale), as a new tensor;
    with clip_size (height, width), then clamped to [0, width] x [0, height]."""
    points = points * scale
    if clip_size is not None:
        points[..., 0].clamp_(0, clip_size[1])
        points[..., 1].clamp_(0, clip_size[0])
    return points


def soft_count(score_sums, areas, coefficients):
    """The soft count (rounded, at least 0) of images with these sums of kept scores and
    areas (pixels), for coefficients (scale, per_pixel) from fit_soft_count; an array
    like the inputs (a Python int for scalars)."""
    scale, per_pixel = coefficients
    value = np.maximum(0, np.round(scale * np.asarray(score_sums, dtype=np.float64)
                                   + per_pixel * np.asarray(areas, dtype=np.float64)))
    return int(value) if value.ndim == 0 else value.astype(np.int64)
