"""Models: the single-level FPN backbone and the CPRNet and P2PNet meta-architectures."""
from .backbone import SingleLevelFPN, build_single_level_fpn_backbone, single_level_feature_name
from .cpr import CPRHead, CPRNet
from .p2p_matcher import PointMatcher, match_cost_matrix
from .p2pnet import P2PHead, P2PNet, anchor_points, fuse_views, point_nms, point_vote

__all__ = [
    "CPRHead",
    "CPRNet",
    "P2PHead",
    "P2PNet",
    "PointMatcher",
    "SingleLevelFPN",
    "anchor_points",
    "build_single_level_fpn_backbone",
    "fuse_views",
    "match_cost_matrix",
    "point_nms",
    "point_vote",
    "single_level_feature_name",
]
