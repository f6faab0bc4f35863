"""Training glue: the detectron2 trainer for cpr_d2's models."""
from .trainer import Trainer, setup_cfg

__all__ = ["Trainer", "setup_cfg"]
