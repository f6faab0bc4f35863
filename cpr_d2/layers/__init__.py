"""Point ops of CPRNet: bag generation, negative mask, bilinear gather (plain and fused),
and the detection-to-GT matching of the point AP evaluator.

Each op has a compiled CPU/CUDA kernel (torch.ops.cpr_d2.*) and a PyTorch (for the
matcher: numpy) reference (`*_reference`) that serves as test oracle and as fallback
when the extension is missing.
"""
from ._ext import extension_status
from .bag_gather import bag_gather, bag_gather_reference
from .bag_points import (bag_coordinates, bag_points, bag_points_reference, bag_size, inside_image,
                         ring_offsets)
from .bilinear_gather import bilinear_gather, bilinear_gather_reference
from .negative_mask import negative_mask, negative_mask_reference
from .point_ap_match import point_ap_match, point_ap_match_reference

__all__ = [
    "bag_coordinates",
    "bag_gather",
    "bag_gather_reference",
    "bag_points",
    "bag_points_reference",
    "bag_size",
    "bilinear_gather",
    "bilinear_gather_reference",
    "extension_status",
    "inside_image",
    "negative_mask",
    "negative_mask_reference",
    "point_ap_match",
    "point_ap_match_reference",
    "ring_offsets",
]
