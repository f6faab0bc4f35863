"""From the network's input pixels back to the original image's, for CPRNet's refinement
and P2PNet's inference alike (what detectron2's ``detector_postprocess`` does for boxes).

The network sees each image resized (its size in the ImageList, before padding); the
input dict's "height" and "width" give the original size. Points are scaled per axis by
original / input, x by width and y by height.
"""

__all__ = ["original_size_and_scale", "rescale_points"]


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
