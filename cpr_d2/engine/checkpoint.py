"""Loading trained weights for inference (evaluation, refinement, the demo), strictly;
and finding the checkpoint that --resume continues from.

detectron2's checkpointer loads whatever matches and only logs the rest, which is
right when fine-tuning from ImageNet weights but turns a wrong MODEL.WEIGHTS at
inference into a silently untrained model. Here every weight of the model must
come from the file.

Resuming: detectron2 loads the checkpoint OUTPUT_DIR/last_checkpoint names and
fails with torch's own error when that file is damaged (cut short by a full disk
or a copy, empty, not a torch file). Here the damaged file is reported, kept as
it is, and the run goes on from the newest earlier model_<iteration>.pth that can
be read (:func:`resume_checkpoint_file`).
"""
import contextlib
import logging
import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer

from cpr_d2.utils.io import atomic_path, write_text_atomic

__all__ = ["AtomicCheckpointer", "DamagedCheckpointError", "load_evaluation_weights", "load_inference_weights",
           "resume_checkpoint_file", "resume_or_load_checkpoint"]

logger = logging.getLogger(__name__)


def _checkpoint_state(path):
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for non-checkpoint files
        raise ValueError(f"MODEL.WEIGHTS {path} is not a checkpoint torch can read "
                         f"({type(e).__name__}: {e}); pass a model_*.pth written by "
                         "tools/train_net.py") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return data["model"]
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    raise ValueError(f"MODEL.WEIGHTS {path} holds no model weights (expected a dict with a "
                     "'model' entry, as tools/train_net.py writes)")


OPTIONAL_WEIGHTS = ("count_threshold", "count_soft")


def load_inference_weights(model, path, arch=None):
    """Load `path` into `model` (eval, refinement, demo). Raises a ValueError naming the
    file when it is missing, unreadable, or does not hold every weight of the model with
    the right shape (a checkpoint of another model or config)."""
    arch = arch or type(model).__name__
    if not path:
        raise ValueError(f"MODEL.WEIGHTS is empty: pass the checkpoint of a trained {arch}, "
                         "e.g. MODEL.WEIGHTS output/.../model_final.pth")
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS not found: {path}")
    if "://" not in path:
        state = _checkpoint_state(path)
        expected = model.state_dict()
        # Checkpoints from before a model carried a counting threshold load without one.
        missing = [k for k in expected if k not in state and k not in OPTIONAL_WEIGHTS]
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or wrong:
            detail = []
            if missing:
                detail.append(f"{len(missing)} of its {len(expected)} weights are missing "
                              f"(e.g. {missing[0]})")
            if wrong:
                k = wrong[0]
                detail.append(f"{len(wrong)} have another shape (e.g. {k}: "
                              f"{tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} "
                              "in the model)")
            raise ValueError(
                f"MODEL.WEIGHTS {path} does not fit this {arch}: {'; '.join(detail)}. It is a "
                "checkpoint of another model or config; pass the checkpoint trained with this "
                "config (same META_ARCHITECTURE, NUM_CLASSES, backbone and head sizes)")
    DetectionCheckpointer(model).load(path)
    return model


# The periodic checkpoints of detectron2's PeriodicCheckpointer: model_0000123.pth.
_PERIODIC = re.compile(r"^model_(\d+)\.pth$")
_TAG = "last_checkpoint"


class DamagedCheckpointError(ValueError):
    """--resume found no readable checkpoint to continue from; the message names the
    damaged file and how to go on."""


def _read_problem(checkpointer, path):
    """None when `checkpointer` can read `path` as a checkpoint with model weights, else
    what is wrong with it. Reads the whole file (as loading it will)."""
    if not os.path.isfile(path):
        return "the file does not exist"
    if os.path.getsize(path) == 0:
        return "the file is empty (0 bytes)"
    try:
        data = checkpointer._load_file(path)  # the reader its load() uses
    except MemoryError:
        raise
    except Exception as e:  # torch raises several types for cut-short or foreign files
        return (f"torch cannot read it, it is cut short or no torch file: {type(e).__name__}: "
                f"{_first_sentence(e)}")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return "it holds no model weights"
    return None


def _first_sentence(error):
    text = (str(error).strip().splitlines() or [""])[0]
    return text.split(". ")[0][:200]


def _periodic_before(save_dir, tagged):
    """The model_<iteration>.pth of save_dir written before `tagged` (all of them when
    `tagged` is no periodic checkpoint, e.g. model_final.pth), newest first."""
    match = _PERIODIC.match(os.path.basename(tagged)) if tagged else None
    before = int(match.group(1)) if match else None
    found = []
    for name in os.listdir(save_dir):
        m = _PERIODIC.match(name)
        if m and (before is None or int(m.group(1)) < before):
            found.append((int(m.group(1)), os.path.join(save_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def keep_newest_periodic(save_dir, resumed, keep):
    """A run resumed from `resumed` with SOLVER.CHECKPOINT_MAX_KEEP `keep`: delete the
    periodic checkpoints of save_dir written before it but the newest `keep` of them
    (`resumed` counted when it is one); returns those kept, oldest first, for the
    periodic checkpointer to go on from."""
    kept = _periodic_before(save_dir, resumed)  # newest first
    if _PERIODIC.match(os.path.basename(resumed)):
        kept = [resumed] + kept
    for path in kept[keep:]:
        os.remove(path)
        logger.info("SOLVER.CHECKPOINT_MAX_KEEP %d: deleted %s", keep, path)
    return kept[:keep][::-1]


def resume_checkpoint_file(checkpointer):
    """The checkpoint --resume continues from: the one save_dir/last_checkpoint names,
    when it can be read; else, with a warning naming it, the newest model_<iteration>.pth
    written before it that can be read. The damaged file is left as it is. "" when
    save_dir has no last_checkpoint (nothing to resume).

    Raises DamagedCheckpointError when no checkpoint can be read; the message names the
    damaged file and says how to go on."""
    save_dir = checkpointer.save_dir
    if not checkpointer.has_checkpoint():
        return ""
    if "://" in save_dir:  # not a local folder: detectron2's behaviour
        return checkpointer.get_checkpoint_file()
    tag = os.path.join(save_dir, _TAG)
    try:
        with open(tag, encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if name and os.path.basename(name) == name:
        tagged = os.path.join(save_dir, name)
        problem = _read_problem(checkpointer, tagged)
        if problem is None:
            return tagged
    else:
        tagged, name = tag, None
        problem = "it names no checkpoint file"
    tried = []
    for path in _periodic_before(save_dir, name):
        why = _read_problem(checkpointer, path)
        if why is None:
            logger.warning(
                "--resume: the last checkpoint %s cannot be read (%s); resuming from %s, the "
                "newest earlier checkpoint that can (the iterations after it are trained "
                "again). %s is left as it is, until the run writes it again.", tagged, problem,
                path, tagged)
            return path
        tried.append(f"{os.path.basename(path)}: {why}")
        logger.warning("--resume: the earlier checkpoint %s cannot be read either (%s)", path, why)
    earlier = (f"nor can any earlier one ({'; '.join(tried)})" if tried else
               "and there is no earlier model_<iteration>.pth in the folder")
    damaged = tag if tagged == tag else f"{tagged} and {tag}"
    raise DamagedCheckpointError(
        f"cannot resume from {save_dir}: its last checkpoint {tagged} cannot be read "
        f"({problem}), {earlier}. To start over, run without --resume: training starts from "
        "MODEL.WEIGHTS (pass MODEL.WEIGHTS <file> for other weights, e.g. a copy of a good "
        f"checkpoint) and writes over the checkpoints in {save_dir}; or delete {damaged} "
        "first. The damaged file is left as it is")


def resume_or_load_checkpoint(checkpointer, weights, *, resume=True):
    """detectron2's Checkpointer.resume_or_load, resuming from
    :func:`resume_checkpoint_file`: with `resume` and a last checkpoint in save_dir,
    load it with every checkpointable (optimiser, scheduler, iteration); otherwise load
    the model weights of `weights` (MODEL.WEIGHTS) only. Returns the checkpoint resumed
    from, or None when it loaded `weights`."""
    path = resume_checkpoint_file(checkpointer) if resume else ""
    if path:
        checkpointer.load(path)
        return path
    checkpointer.load(weights, checkpointables=[])
    return None


def load_evaluation_weights(cfg, model, resume=False):
    """The weights `train_net.py --eval-only` evaluates, loaded strictly
    (:func:`load_inference_weights`): with `resume`, the last checkpoint of
    cfg.OUTPUT_DIR (a damaged one falls back as in :func:`resume_checkpoint_file`),
    else, or when OUTPUT_DIR has none, MODEL.WEIGHTS. Returns the file loaded."""
    path = ""
    if resume:
        path = resume_checkpoint_file(DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR))
        if not path:
            logger.info("--resume: %s has no last_checkpoint; evaluating MODEL.WEIGHTS",
                        cfg.OUTPUT_DIR)
    path = path or cfg.MODEL.WEIGHTS
    load_inference_weights(model, path)
    logger.info("Evaluating %s", path)
    return path


def _first_non_finite(state_dict):
    """The name of the first floating-point tensor of `state_dict` with a NaN or an
    infinity, or None."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(
                torch.isfinite(value).all()):
            return name
    return None


class AtomicCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer whose checkpoints and `last_checkpoint` tag are written
    atomically (a temporary file in the same folder, fsynced, then renamed), so that
    a kill while writing leaves the previous good file. It refuses to write a model
    with non-finite weights. `last_saved` is the path of the last checkpoint this
    object wrote."""

    # The temporaries atomic_path makes for a checkpoint or the tag: ".<name>.<8 random
    # characters of mkstemp>.tmp[.pth]".
    _TEMPORARY = re.compile(r"^\.(model_[^/]+|last_checkpoint)\.[a-z0-9_]{8}\.tmp(\.pth)?$")

    def __init__(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.last_saved = None

    def remove_stale_temporaries(self):
        """Delete the half-written temporaries a process killed while saving left in
        save_dir (they are never read). Only call it where no other process is saving
        into save_dir. Returns the removed paths."""
        if not self.save_dir or not self.save_to_disk or "://" in self.save_dir:
            return []
        try:
            names = os.listdir(self.save_dir)
        except FileNotFoundError:
            return []
        removed = []
        for name in sorted(names):
            path = os.path.join(self.save_dir, name)
            if self._TEMPORARY.match(name) and os.path.isfile(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
                    self.logger.info(f"Removed {path}, left by a process killed while saving")
        return removed

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # not a local folder: no rename there
            super().save(name, **kwargs)
            self.last_saved = os.path.join(self.save_dir, f"{name}.pth")
            return
        data = {"model": self.model.state_dict()}
        bad = _first_non_finite(data["model"])
        if bad is not None:
            raise FloatingPointError(
                f"not saving checkpoint '{name}': the model's weight '{bad}' is not finite; the "
                f"last good checkpoint is {self.last_saved or 'none yet'}")
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name must be a file name, got '{name}'")
        self.logger.info("Saving checkpoint to {}".format(save_file))
        with atomic_path(save_file) as tmp:
            torch.save(data, tmp)
        self.last_saved = save_file
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        if "://" in save_file:
            return super().tag_last_checkpoint(last_filename_basename)
        write_text_atomic(last_filename_basename, save_file)
