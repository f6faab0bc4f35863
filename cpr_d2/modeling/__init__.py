"""Models: the single-level FPN backbone and the CPRNet meta-architecture."""
from .backbone import SingleLevelFPN, build_single_level_fpn_backbone, single_level_feature_name
from .cpr import CPRHead, CPRNet

__all__ = [
    "CPRHead",
    "CPRNet",
    "SingleLevelFPN",
    "build_single_level_fpn_backbone",
    "single_level_feature_name",
]
