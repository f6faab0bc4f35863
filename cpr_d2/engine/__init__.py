"""Training glue: the detectron2 trainer for cpr_d2's models."""
from .checkpoint import load_inference_weights
from .defaults import setup_cfg
from .trainer import Trainer

__all__ = ["Trainer", "load_inference_weights", "setup_cfg"]
