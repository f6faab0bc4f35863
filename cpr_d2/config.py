"""Config keys of cpr_d2, added to a detectron2 config (never to its global defaults)."""
from detectron2.config import CfgNode as CN
__all__ = ["add_cpr_config", "add_point_data_config", "add_single_level_fpn_config", "get_cpr_d2_cfg"]


def add_point_data_config(cfg):
    """Keys of the point data layer (idempotent)."""
    if "POINTS_OUTSIDE_IMAGE" in cfg.DATASETS:
        return cfg
    # What loading does with annotated points that lie off their image
    # (0 <= x <= width, 0 <= y <= height fails): "warn" counts and keeps them,
    # "error" refuses the dataset.
    cfg.DATASETS.POINTS_OUTSIDE_IMAGE = "warn"

    # The point-AP evaluator (the paper's metric; see the README, "Evaluation").
    cfg.TEST.POINT_AP = CN()
    # Distance thresholds on the box-normalised distance to the GT box centre.
    cfg.TEST.POINT_AP.TAUS = (0.5, 1.0, 2.0)
    # Size ranges by GT sqrt(w*h): "coco" or "tinyperson"; "" takes the
    # dataset's metadata `size_ranges`, else "coco".
    cfg.TEST.POINT_AP.SIZE_RANGES = ""
    # Detections kept per image and class; 0 takes the dataset's metadata
    # `max_dets`, else 100 (1000 suits dense datasets).
    cfg.TEST.POINT_AP.MAX_DETS = 0
    # False: the official evaluator's conventions, so numbers compare with the
    # paper's. True: drop its quirks (a perfect detector scores 1, classes
    # without GT leave the mean).
    cfg.TEST.POINT_AP.CLEAN = False
    # Counting MAE/RMSE count the detections scoring above this.
    cfg.TEST.POINT_AP.COUNT_SCORE_THRESH = 0.5
    return cfg


def add_single_level_fpn_config(cfg):
    """Keys of the single-level FPN backbone and the optimiser choice, shared by CPRNet
    and P2PNet (idempotent)."""
    if "SINGLE_LEVEL_FPN" in cfg.MODEL:
        return cfg
    cfg.MODEL.SINGLE_LEVEL_FPN = CN()
    # Stride of the one output level: 4, 8, 16 or 32 (ResNet res2..res5).
    cfg.MODEL.SINGLE_LEVEL_FPN.STRIDE = 8
    cfg.MODEL.SINGLE_LEVEL_FPN.OUT_CHANNELS = 256
    # Norm of the lateral and output convs ("GN" = GroupNorm(32), "" = none).
    cfg.MODEL.SINGLE_LEVEL_FPN.NORM = "GN"
    # Optimiser built by the tools: "SGD" (detectron2's, with SOLVER.MOMENTUM) or
    # "ADAM" (SOLVER.BASE_LR, SOLVER.WEIGHT_DECAY).
    cfg.SOLVER.OPTIMIZER = "SGD"
    return cfg


def add_cpr_config(cfg):
    """Keys of CPRNet (coarse point refinement); defaults are the paper's COCO settings."""
    add_point_data_config(cfg)
    add_single_level_fpn_config(cfg)
    cfg.MODEL.CPR = CN()
    cfg.MODEL.CPR.NUM_CLASSES = 80
    # Bag radius R in rings: ring k = 1..R has 8k points at k * stride pixels
    # (R = 8 COCO, 7 DOTA, 5 SeaPerson). R * stride should be about an object's radius.
    cfg.MODEL.CPR.RADIUS = 8
    # Head: NUM_CONVS x (3x3 conv, GroupNorm(32), ReLU) at CONV_CHANNELS.
    cfg.MODEL.CPR.NUM_CONVS = 4
    cfg.MODEL.CPR.CONV_CHANNELS = 256
    # Initial foreground probability of the class logits (bias = -log((1 - p) / p)).
    cfg.MODEL.CPR.PRIOR_PROB = 0.01
    # Focal exponent gamma of the quality-focal loss FL(p, q) = -|p - q|^gamma BCE(p, q).
    cfg.MODEL.CPR.FOCAL_GAMMA = 2.0
    # Loss weights: MIL over the bag, annotated point, negatives (TinyPerson: ANN 0.25).
    cfg.MODEL.CPR.MIL_WEIGHT = 0.25
    cfg.MODEL.CPR.ANN_WEIGHT = 0.125
    cfg.MODEL.CPR.NEG_WEIGHT = 0.75
    # Refinement: keep bag points scoring above REFINE_SCORE_THRESH and above
    # REFINE_RELATIVE_THRESH x the annotated point's score; keep the annotated
    # point if none is kept or their mean score is below REFINE_SCORE_THRESH.
    cfg.MODEL.CPR.REFINE_SCORE_THRESH = 0.1
    cfg.MODEL.CPR.REFINE_RELATIVE_THRESH = 0.5
    # Inference also returns each object's bag coordinates and scores (for
    # visualisation); off by default, it is N x (4R(R+1)+1) values per image.
    cfg.MODEL.CPR.RETURN_BAG_SCORES = False
    return cfg


def get_cpr_d2_cfg():
    """detectron2's default config extended with every cpr_d2 key."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_cpr_config(cfg)
    return cfg

