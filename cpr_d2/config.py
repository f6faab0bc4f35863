"""Config keys of cpr_d2, added to a detectron2 config (never to its global defaults)."""
from detectron2.config import CfgNode as CN
__all__ = ["add_point_data_config", "get_cpr_d2_cfg"]


def add_point_data_config(cfg):
    """Keys of the point data layer."""
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


def get_cpr_d2_cfg():
    """detectron2's default config extended with every cpr_d2 key."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_point_data_config(cfg)
    return cfg

