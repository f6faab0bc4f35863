"""The detectron2 trainer for CPRNet and P2PNet: the mapper, the optimiser and the
evaluator differ from DefaultTrainer's, and training can be killed and resumed.

Resuming: checkpoints hold the optimiser's state too and are written atomically
(:class:`AtomicCheckpointer`); the data stream and the augmentations are a pure
function of cfg.SEED and the sample's position in the stream
(:mod:`cpr_d2.data.samplers`), and the trainer starts the stream at the resumed
iteration. So a run killed and resumed with --resume ends with the weights of an
uninterrupted run. A non-finite loss term stops training with the iteration, the
term and the last good checkpoint.
"""
import logging
import os
import weakref
from collections.abc import Mapping

import torch
from detectron2.data import (build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.engine import DefaultTrainer, hooks
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from cpr_d2.data import PointDatasetMapper
from cpr_d2.data.classes import (ClassListCheckpointable, check_evaluation_classes,
                                 training_classes)
from cpr_d2.data.samplers import ResumableTrainingSampler, build_resumable_train_loader
from cpr_d2.evaluation import build_point_evaluator
from cpr_d2.evaluation.cpr_evaluator import CPREvaluator
from cpr_d2.utils.threads import machine_share

from .checkpoint import AtomicCheckpointer
from .count_calibration import CountCalibrationHook, calibration_split, check_count_calibration
from .ema import EMAHook

__all__ = ["Trainer", "is_cpr"]

OPTIMIZERS = ("SGD", "ADAM")

logger = logging.getLogger(__name__)


def is_cpr(cfg):
    """CPRNet works on annotated points at test time too (it refines them)."""
    return cfg.MODEL.META_ARCHITECTURE == "CPRNet"


def data_seed(cfg):
    """The seed of the training data stream: cfg.SEED, or one drawn at random (the same
    in every process) when it is negative."""
    return cfg.SEED if cfg.SEED >= 0 else int(comm.shared_random_seed())


def checkpoint_max_keep(cfg):
    """SOLVER.CHECKPOINT_MAX_KEEP checked: the number of periodic checkpoints a run keeps,
    or None to keep all of them."""
    keep = cfg.SOLVER.CHECKPOINT_MAX_KEEP
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(
            f"SOLVER.CHECKPOINT_MAX_KEEP is {keep!r}: it must be a whole number >= 0, the "
            "count of the newest periodic checkpoints to keep (0 keeps all of them)")
    return keep or None


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        # DefaultTrainer's checkpointer writes in place; the periodic checkpointer hook
        # (built in super().__init__) gets the atomic one too.
        old = self.checkpointer
        self.checkpointer = AtomicCheckpointer(
            self.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables)
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer) and hook.checkpointer is old:
                hook.checkpointer = self.checkpointer
        # Every checkpoint names the classes the model learns (the demo labels with them).
        if cfg.DATASETS.TRAIN:
            self.checkpointer.checkpointables["classes"] = ClassListCheckpointable(
                training_classes(tuple(cfg.DATASETS.TRAIN)))
        if comm.is_main_process():  # the only process that saves
            self.checkpointer.remove_stale_temporaries()
        self._resumed_from = None
        # A non-finite loss term stops training before its backward pass.
        trainer = weakref.ref(self)

        def check_losses(module, inputs, outputs):
            if module.training and trainer() is not None:
                trainer()._check_losses(outputs)

        self._loss_check = self._trainer.model.register_forward_hook(check_losses)

    @property
    def train_sampler(self):
        """The ResumableTrainingSampler of the training loader (None with another sampler)."""
        return getattr(self.data_loader, "resumable_sampler", None)

    def resume_or_load(self, resume=True):
        # DefaultTrainer's, except that a damaged last checkpoint falls back to the one
        # before it (cpr_d2.engine.checkpoint.resume_checkpoint_file).
        from .checkpoint import resume_or_load_checkpoint

        self._resumed_from = resume_or_load_checkpoint(
            self.checkpointer, self.cfg.MODEL.WEIGHTS, resume=resume)
        if self._resumed_from:  # it holds the iteration that had just finished
            self.start_iter = self.iter + 1
            self._trim_checkpoints(self._resumed_from)
        sampler = self.train_sampler
        if sampler is None:
            if self.start_iter:
                logger.warning("DATALOADER.SAMPLER_TRAIN is %s: the resumed run does not see the "
                               "data of an uninterrupted one", self.cfg.DATALOADER.SAMPLER_TRAIN)
            return
        # Continue the data stream where the checkpoint left it. The loader starts its
        # workers (which copy the sampler) on the first batch; a new iterator makes sure
        # none started before.
        sampler.set_start(self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH)
        self._trainer._data_loader_iter = iter(self.data_loader)
        logger.info("Training data: seed %d, starting at sample %d (iteration %d)",
                    sampler.seed, sampler.start, self.start_iter)

    def _trim_checkpoints(self, resumed):
        """With SOLVER.CHECKPOINT_MAX_KEEP (the periodic checkpointer's max_to_keep, set
        in build_hooks), the periodic checkpointer of a resumed run also counts (and
        deletes in turn) the checkpoints the run wrote before."""
        if not comm.is_main_process():
            return
        from .checkpoint import keep_newest_periodic

        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer) and hook.max_to_keep:
                hook.recent_checkpoints = keep_newest_periodic(
                    self.checkpointer.save_dir, resumed, hook.max_to_keep)

    def state_dict(self):
        # DefaultTrainer saves the iteration and the hooks' state (the LR scheduler);
        # the optimiser's state (e.g. Adam's moments) is needed to resume exactly.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        if self.train_sampler is not None:
            ret["data_seed"] = self.train_sampler.seed
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("the checkpoint has no optimiser state; the optimiser starts afresh")
        seed = state_dict.get("data_seed")
        if self.cfg.SEED < 0 and seed is not None and self.train_sampler is not None:
            self.train_sampler.set_seed(seed)  # a random seed: continue the checkpoint's

    def last_good_checkpoint(self):
        """The checkpoint written last by this run, or the one it resumed from; None if
        neither."""
        if self.checkpointer.last_saved:
            return self.checkpointer.last_saved
        if self._resumed_from:
            return self._resumed_from
        if not comm.is_main_process() and self.checkpointer.has_checkpoint():
            return self.checkpointer.get_checkpoint_file()  # the main process writes them
        return None

    def _check_losses(self, outputs):
        if torch.is_tensor(outputs):
            terms = {"total_loss": outputs}
        elif isinstance(outputs, Mapping):
            terms = {k: v for k, v in outputs.items() if torch.is_tensor(v)}
        else:
            return
        if not terms:
            return
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in terms.values()])
        everywhere = finite.all().to(torch.int32).reshape(1)
        if comm.get_world_size() > 1:  # stop every process at the same iteration
            torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
        if bool(everywhere.item()):
            return
        bad = [f"{name} = {_describe(value)}"
               for (name, value), ok in zip(terms.items(), finite.tolist()) if not ok]
        raise FloatingPointError(
            f"non-finite loss at iteration {self.iter}: "
            f"{', '.join(bad) if bad else 'a loss term of another process'}; the last good "
            f"checkpoint is {self.last_good_checkpoint() or 'none yet'}; lower SOLVER.BASE_LR, "
            "enable SOLVER.CLIP_GRADIENTS, or check the data")

    def build_hooks(self):
        """DefaultTrainer's hooks, plus SOLVER.EMA before the checkpointer (so model_final
        holds the average) and, for P2PNet with MODEL.P2PNET.COUNT_CALIBRATION "train",
        the counting threshold's calibration ("train" or "holdout") before the final
        evaluation; first of all,
        the share of the machine's cores (cpr_d2.utils.threads)."""
        ret = [MachineShareHook()] + super().build_hooks()
        cfg = self.cfg
        keep = checkpoint_max_keep(cfg)
        if keep:
            for hook in ret:
                if isinstance(hook, hooks.PeriodicCheckpointer):
                    hook.max_to_keep = keep
        if cfg.SOLVER.EMA.ENABLED:
            before = next((k for k, h in enumerate(ret) if isinstance(
                h, (hooks.PeriodicCheckpointer, hooks.EvalHook))), len(ret))
            ret.insert(before, EMAHook(self.model, cfg.SOLVER.EMA.DECAY))
        if not is_cpr(cfg) and check_count_calibration(cfg):
            evaluator = next((k for k, h in enumerate(ret) if isinstance(h, hooks.EvalHook)),
                             len(ret))
            mapper = PointDatasetMapper(cfg, is_train=False)
            ret.insert(evaluator, CountCalibrationHook(
                cfg, lambda dicts: build_detection_test_loader(
                    dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)))
        return ret

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        with machine_share():
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        """The training loader: the order of the images and their augmentations are a
        pure function of cfg.SEED and the stream position (see cpr_d2.data.samplers).
        Every training image's header is checked first (cpr_d2.data.checks)."""
        from cpr_d2.data.checks import check_training_images

        mapper = PointDatasetMapper(cfg, is_train=True)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning("DATALOADER.SAMPLER_TRAIN is %s: detectron2's loader, whose data a "
                           "resumed run does not reproduce", cfg.DATALOADER.SAMPLER_TRAIN)
            check_training_images(cfg)
            return build_detection_train_loader(cfg, mapper=mapper)
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        check_training_images(cfg, dataset)
        dataset = _without_held_out(cfg, dataset)
        sampler = ResumableTrainingSampler(len(dataset), seed=data_seed(cfg))
        return build_resumable_train_loader(
            dataset, mapper, sampler, cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = PointDatasetMapper(cfg, is_train=False, with_annotations=is_cpr(cfg))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        check_evaluation_classes(cfg, dataset_name)
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


def _without_held_out(cfg, dataset):
    """The training records less those P2PNet's MODEL.P2PNET.COUNT_CALIBRATION "holdout"
    keeps out of training to choose its counting threshold on."""
    if is_cpr(cfg) or check_count_calibration(cfg) != "holdout":
        return dataset
    from detectron2.data import DatasetCatalog

    catalog = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
    held = {r["file_name"] for r in calibration_split(cfg, catalog)[1]}
    kept = [r for r in dataset if r["file_name"] not in held]
    logger.info("Counting calibration: %d of the %d training images kept out of training "
                "(MODEL.P2PNET.COUNT_HOLDOUT %g), to choose the counting threshold on",
                len(dataset) - len(kept), len(dataset), cfg.MODEL.P2PNET.COUNT_HOLDOUT)
    return kept


class MachineShareHook(hooks.HookBase):
    """Training uses its share of the cores (cpr_d2.utils.threads), rechecked as other
    cpr_d2 jobs start and end."""

    _share = None

    def before_train(self):
        self._share = machine_share().__enter__()

    def before_step(self):
        self._share.recheck()

    def after_train(self):
        if self._share is not None:  # None: before_train failed
            self._share.__exit__(None, None, None)
            self._share = None


def _describe(value):
    value = value.detach()
    if value.numel() == 1:
        return f"{value.item()}"
    return f"a tensor of shape {tuple(value.shape)} with non-finite entries"
