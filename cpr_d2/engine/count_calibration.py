"""A counting threshold for P2PNet chosen on its training data only.

Counting reports the detections that score above a threshold. A fixed 0.5 means
nothing for a model whose scores all stay below it, so after training the model
predicts a set of annotated images (full images, no augmentation) and keeps the
threshold whose per-image counts are closest to the annotated counts (smallest
mean absolute error). MODEL.P2PNET.COUNT_CALIBRATION says which images:

* "train": every training image. A model is more confident on images it was
  trained on than on new ones, so this threshold can count too few on new images.
* "holdout": a share MODEL.P2PNET.COUNT_HOLDOUT of the training images, kept out
  of training (:func:`held_out_files`: the same images for every seed and run).
  The model sees them for the first time, as it will see new images.

The threshold is stored in the model (the `count_threshold` buffer, so it travels
in model_final.pth) and the point-AP evaluator counts with it. The test set never
reaches the choice.

MODEL.P2PNET.COUNT_RULE "soft" counts without a threshold: an image's count is
``scale * S + per_pixel * A`` (rounded, at least 0), S the sum of the scores of its
kept points and A its area in pixels, with the two coefficients fitted by least
squares on the same calibration images (:func:`fit_soft_count`).
S follows the objects that score under any threshold; the area term removes the score
mass that background spreads over an image, in proportion to its size.
MODEL.P2PNET.COUNT_SOFT_FIT says which way the line is fitted. "inverse" (the
default) fits the score sum to the count, ``S = alpha * count + beta * A``, and
solves it for the count (scale = 1 / alpha, per_pixel = -beta / alpha); "direct"
fits the count to the score sum. S is the noisy side: fitting the count to it
shrinks the slope by the squared correlation of the two, so the direct fit pulls
every count toward the calibration images' mean and counts images more crowded
than those too few; the inverse fit does not (docs/p2pnet.md, "The inverse fit").
S sums the kept points, at most MODEL.P2PNET.DETECTIONS_PER_IMAGE of them, so the fit
holds for images like the calibration images (docs/p2pnet.md, "What the soft count is
fitted to"). The coefficients travel in the `count_soft` buffer; the threshold is still
chosen (it decides which points are drawn).
"""
import hashlib
import logging

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm

from cpr_d2.data.mapper import count_objects
from cpr_d2.modeling.postprocess import COUNT_RULES, soft_count

__all__ = ["COUNT_CALIBRATIONS", "COUNT_RULES", "SOFT_FITS", "CountCalibrationHook",
           "calibrate_count_threshold", "calibration_split", "check_count_calibration",
           "choose_count_threshold", "fit_soft_count", "held_out_files", "log_calibration",
           "soft_count"]

logger = logging.getLogger(__name__)

COUNT_CALIBRATIONS = ("", "train", "holdout")
# MODEL.P2PNET.COUNT_SOFT_FIT: which way the soft count's line is fitted (fit_soft_count).
SOFT_FITS = ("inverse", "direct")


def check_count_calibration(cfg):
    """MODEL.P2PNET.COUNT_CALIBRATION, checked (with COUNT_HOLDOUT for "holdout")."""
    calibration = cfg.MODEL.P2PNET.COUNT_CALIBRATION
    if calibration not in COUNT_CALIBRATIONS:
        raise ValueError(f"MODEL.P2PNET.COUNT_CALIBRATION must be one of "
                         f"{COUNT_CALIBRATIONS}, got {calibration!r}")
    rule = cfg.MODEL.P2PNET.get("COUNT_RULE", "threshold")
    if rule not in COUNT_RULES:
        raise ValueError(f"MODEL.P2PNET.COUNT_RULE must be one of {COUNT_RULES}, got {rule!r}")
    fit = cfg.MODEL.P2PNET.get("COUNT_SOFT_FIT", "inverse")
    if fit not in SOFT_FITS:
        raise ValueError(f"MODEL.P2PNET.COUNT_SOFT_FIT must be one of {SOFT_FITS}, got {fit!r}")
    if rule == "soft" and not calibration:
        raise ValueError("MODEL.P2PNET.COUNT_RULE 'soft' fits its coefficients on training "
                         "images: set MODEL.P2PNET.COUNT_CALIBRATION to 'train' or 'holdout'")
    share = cfg.MODEL.P2PNET.COUNT_HOLDOUT
    if calibration == "holdout" and not 0 < share < 1:
        raise ValueError(f"MODEL.P2PNET.COUNT_HOLDOUT must lie strictly between 0 and 1 (the "
                         f"share of the training images kept out of training to choose the "
                         f"counting threshold on), got {share}")
    return calibration


def held_out_files(records, share):
    """The file names of the images that COUNT_CALIBRATION "holdout" keeps out of
    training: round(share * n) of the n distinct images of `records` (at least one, and
    at least one left to train on), the first in the order of the SHA-1 of their file
    names. The same images for every seed, process and run, whatever the records' order.
    ValueError for fewer than 2 images."""
    names = sorted({r["file_name"] for r in records})
    if len(names) < 2:
        raise ValueError(f"MODEL.P2PNET.COUNT_CALIBRATION 'holdout' needs at least 2 training "
                         f"images (one to train on, one to choose the threshold on); the "
                         f"training set has {len(names)}. Use COUNT_CALIBRATION 'train'")
    count = min(len(names) - 1, max(1, int(round(share * len(names)))))
    order = sorted(names, key=lambda n: hashlib.sha1(n.encode("utf-8")).hexdigest())
    return frozenset(order[:count])


def calibration_split(cfg, records):
    """(records to train on, records to choose the threshold on) of the training `records`
    (all of cfg.DATASETS.TRAIN, as the DatasetCatalog gives them) by
    MODEL.P2PNET.COUNT_CALIBRATION: "holdout" splits them (held_out_files); otherwise
    all are trained on, and "train" chooses on all of them too ("": on none)."""
    records = list(records)
    calibration = check_count_calibration(cfg)
    if calibration != "holdout":
        return records, (records if calibration == "train" else [])
    held = held_out_files(records, cfg.MODEL.P2PNET.COUNT_HOLDOUT)
    return ([r for r in records if r["file_name"] not in held],
            [r for r in records if r["file_name"] in held])


def choose_count_threshold(scores_per_image, counts):
    """(threshold, mae): the score threshold t for which the per-image numbers of scores
    > t are closest to `counts` in mean absolute error. Candidates lie halfway between
    consecutive distinct scores (and below the lowest, above the highest), so a score
    is never on the threshold; of equally good ones the lowest wins."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    if len(scores_per_image) != len(counts):
        raise ValueError(f"choose_count_threshold: {len(scores_per_image)} images of scores "
                         f"but {len(counts)} counts")
    if not len(counts):
        raise ValueError("choose_count_threshold: no training images to choose a threshold on")
    scores = [np.sort(np.asarray(s, dtype=np.float64).reshape(-1)) for s in scores_per_image]
    distinct = np.unique(np.concatenate(scores + [np.zeros(0)]))
    if len(distinct) == 0:
        return 0.0, float(np.abs(counts).mean())
    candidates = np.concatenate([[distinct[0] / 2], (distinct[1:] + distinct[:-1]) / 2,
                                 [(distinct[-1] + 1.0) / 2 if distinct[-1] < 1 else distinct[-1] + 1]])
    # counts above each candidate, per image: (images, candidates)
    above = np.stack([len(s) - np.searchsorted(s, candidates, side="right") for s in scores])
    mae = np.abs(above - counts[:, None]).mean(axis=0)
    best = int(np.argmin(mae))  # first minimum = the lowest threshold
    return float(candidates[best]), float(mae[best])


def fit_soft_count(score_sums, areas, counts, direction="inverse"):
    """(scale, per_pixel, mae) of the soft count ``count = scale * score_sum + per_pixel *
    area`` fitted by least squares over images (no intercept), and the mean absolute
    error of the rounded counts it gives (soft_count) on the same images.

    direction "inverse" fits ``score_sum = alpha * count + beta * area`` and solves it
    for the count (scale = 1 / alpha, per_pixel = -beta / alpha): unbiased for images
    with more (or fewer) objects than the calibration images. "direct" fits the count
    to the score sums, the least-squares count on images like the calibration images,
    which shrinks toward their mean count elsewhere.

    None when it cannot count: fewer than 2 images, columns that do not determine the
    line (every image the same count and area), or a fit in which more score means
    fewer objects (scale <= 0)."""
    if direction not in SOFT_FITS:
        raise ValueError(f"fit_soft_count: direction must be one of {SOFT_FITS}, got "
                         f"{direction!r}")
    sums, areas, counts = (np.asarray(v, dtype=np.float64).reshape(-1)
                           for v in (score_sums, areas, counts))
    if not len(sums) == len(areas) == len(counts):
        raise ValueError(f"fit_soft_count: {len(sums)} score sums, {len(areas)} areas and "
                         f"{len(counts)} counts")
    if len(counts) < 2:
        return None
    explained, target = (counts, sums) if direction == "inverse" else (sums, counts)
    design = np.stack([explained, areas], axis=1)
    if np.linalg.matrix_rank(design) < 2:
        return None
    (slope, per_pixel), *_ = np.linalg.lstsq(design, target, rcond=None)
    if not slope > 0:
        return None
    scale = slope
    if direction == "inverse":
        scale, per_pixel = 1.0 / slope, -per_pixel / slope
    predicted = soft_count(sums, areas, (scale, per_pixel))
    return float(scale), float(per_pixel), float(np.abs(predicted - counts).mean())


@torch.no_grad()
def calibrate_count_threshold(model, data_loader, dataset_dicts, soft_fit="inverse"):
    """Predict every image of `data_loader` (a test loader over `dataset_dicts`, sharded
    over the processes), choose the threshold (choose_count_threshold) on all of them,
    store it in model.count_threshold, and return (threshold, mae, number of images).
    A model whose `count_rule` is "soft" also gets the soft count's coefficients
    (fit_soft_count in the direction `soft_fit`) in its `count_soft` buffer ((-1, 0),
    none, when they cannot be fitted)."""
    counts = {d["image_id"]: count_objects(d.get("annotations")) for d in dataset_dicts}
    was_training = model.training
    model.eval()
    mine = []
    try:
        for inputs in data_loader:
            for inp, out in zip(inputs, model(inputs)):
                inst = out["instances"]
                height, width = inst.image_size
                mine.append((inp["image_id"], (inst.scores.cpu().numpy(),
                                               float(height) * float(width))))
    finally:
        model.train(was_training)
    gathered = {}
    for part in comm.all_gather(mine):
        gathered.update(dict(part))
    ids = [i for i in counts if i in gathered]
    threshold, mae = choose_count_threshold([gathered[i][0] for i in ids],
                                            [counts[i] for i in ids])
    target = model.module if hasattr(model, "module") else model
    target.count_threshold.fill_(threshold)
    if getattr(target, "count_rule", "threshold") == "soft":
        fit = fit_soft_count([float(gathered[i][0].sum()) for i in ids],
                             [gathered[i][1] for i in ids], [counts[i] for i in ids],
                             direction=soft_fit)
        target.count_soft.copy_(torch.tensor(fit[:2] if fit else (-1.0, 0.0)))
    return threshold, mae, len(ids)


def log_calibration(model, where, threshold, mae, n, soft_fit):
    """Log what calibrate_count_threshold chose for `model` on `n` images (`where` says
    which): the threshold and, for a soft-count model, its coefficients or why there are
    none."""
    logger.info(f"Counting threshold chosen on {where}: {threshold:.4f} "
                f"(counting MAE there {mae:.2f})")
    model = model.module if hasattr(model, "module") else model
    if getattr(model, "count_rule", "threshold") == "soft":
        scale, per_pixel = (float(v) for v in model.count_soft)
        if scale > 0:
            logger.info(f"Soft count fitted ({soft_fit}) on the same images: {scale:.3f} x "
                        f"the sum of the kept scores {per_pixel * 1e6:+.1f} per megapixel")
        else:
            logger.warning("MODEL.P2PNET.COUNT_RULE 'soft': no soft count could be fitted "
                           f"on {n} image(s) (it needs at least 2 that differ in their "
                           "counts or sizes, on which more score means more objects); the "
                           "model counts with the threshold. If these images do differ in "
                           "their counts, the model's scores do not follow the objects even "
                           "on them, as after a training run that ended in a poor solution: "
                           "check its point AP, and train again with another SEED if it is "
                           "low")


class CountCalibrationHook(HookBase):
    """After training: choose the counting threshold on the images of
    MODEL.P2PNET.COUNT_CALIBRATION (calibration_split) and save model_final again with
    it (before the final evaluation, which counts with it). `build_loader(dicts)` builds
    an inference loader over a list of dataset dicts."""

    def __init__(self, cfg, build_loader):
        self.cfg = cfg
        self.dataset_names = tuple(cfg.DATASETS.TRAIN)
        self.build_loader = build_loader

    def after_train(self):
        trainer = self.trainer
        if trainer.iter + 1 < trainer.max_iter:
            return  # stopped early (an error): nothing final to calibrate
        records = [r for name in self.dataset_names for r in DatasetCatalog.get(name)]
        _, dicts = calibration_split(self.cfg, records)
        soft_fit = self.cfg.MODEL.P2PNET.get("COUNT_SOFT_FIT", "inverse")
        threshold, mae, n = calibrate_count_threshold(trainer.model, self.build_loader(dicts),
                                                      dicts, soft_fit=soft_fit)
        which = ("the training set" if self.cfg.MODEL.P2PNET.COUNT_CALIBRATION == "train" else
                 "the training images kept out of training (MODEL.P2PNET.COUNT_HOLDOUT "
                 f"{self.cfg.MODEL.P2PNET.COUNT_HOLDOUT:g})")
        log_calibration(trainer.model, f"{which} ({', '.join(self.dataset_names)}, {n} images)",
                        threshold, mae, n, soft_fit)
        trainer.checkpointer.save("model_final")
