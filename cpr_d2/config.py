"""Config keys of cpr_d2, added to a detectron2 config (never to its global defaults)."""
__all__ = ["add_point_data_config", "get_cpr_d2_cfg"]


def add_point_data_config(cfg):
    """Keys of the point data layer."""
    # What loading does with annotated points that lie off their image
    # (0 <= x <= width, 0 <= y <= height fails): "warn" counts and keeps them,
    # "error" refuses the dataset.
    cfg.DATASETS.POINTS_OUTSIDE_IMAGE = "warn"
    return cfg


def get_cpr_d2_cfg():
    """detectron2's default config extended with every cpr_d2 key."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_point_data_config(cfg)
    return cfg

