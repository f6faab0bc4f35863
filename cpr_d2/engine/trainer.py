"""The detectron2 trainer for CPRNet and P2PNet: only the mapper, the optimiser and
the evaluator differ from DefaultTrainer's."""
import os

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper, set_outside_image_policy
from cpr_d2.evaluation import build_point_evaluator
from cpr_d2.evaluation.cpr_evaluator import CPREvaluator

__all__ = ["Trainer", "setup_cfg", "is_cpr"]

OPTIMIZERS = ("SGD", "ADAM")


def is_cpr(cfg):
    """CPRNet works on annotated points at test time too (it refines them)."""
    return cfg.MODEL.META_ARCHITECTURE == "CPRNet"


class Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=PointDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = PointDatasetMapper(cfg, is_train=False, with_annotations=is_cpr(cfg))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if is_cpr(cfg):
            return CPREvaluator(dataset_name)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_point_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            return super().build_optimizer(cfg, model)
        if name != "ADAM":
            raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got "
                             f"'{cfg.SOLVER.OPTIMIZER}'")
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM)
        return maybe_add_gradient_clipping(cfg, torch.optim.Adam)(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


def _merge(cfg, merge, source):
    try:
        merge()
    except (KeyError, AssertionError) as e:
        message = str(e).strip("'\"")
        if "Non-existent" not in message:
            raise
        raise KeyError(f"{source}: {message}. Check the spelling; cpr_d2's keys and their "
                       "meaning are in cpr_d2/config.py, detectron2's in its defaults.py") from None


def setup_cfg(args, output_subdir=None):
    """The config of a tools/ command line: cpr_d2's keys, the file, the overrides.
    `output_subdir` puts this command's logs and config under OUTPUT_DIR/<subdir>, so
    that it does not overwrite a training run's."""
    cfg = get_cpr_d2_cfg()
    if args.config_file:
        if not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"config file not found: {args.config_file}")
        _merge(cfg, lambda: cfg.merge_from_file(args.config_file), args.config_file)
    _merge(cfg, lambda: cfg.merge_from_list(args.opts), "command-line override")
    if output_subdir:
        cfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, output_subdir)
    cfg.freeze()
    set_outside_image_policy(cfg.DATASETS.POINTS_OUTSIDE_IMAGE)
    default_setup(cfg, args)
    return cfg
