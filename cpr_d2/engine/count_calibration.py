"""A counting threshold for P2PNet chosen on its training images only.

Counting reports the detections that score above a threshold. A fixed 0.5 means
nothing for a model whose scores all stay below it, so after training
(MODEL.P2PNET.COUNT_CALIBRATION "train") the model predicts every training image
(full images, no augmentation) and keeps the threshold whose per-image counts are
closest to the annotated counts (smallest mean absolute error). The threshold is
stored in the model (the `count_threshold` buffer, so it travels in model_final.pth)
and the point-AP evaluator counts with it. The test set never reaches the choice.
"""
import logging

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm

from cpr_d2.data.mapper import count_objects

__all__ = ["CountCalibrationHook", "calibrate_count_threshold", "choose_count_threshold"]

logger = logging.getLogger(__name__)


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


@torch.no_grad()
def calibrate_count_threshold(model, data_loader, dataset_dicts):
    """Predict every image of `data_loader` (a test loader over `dataset_dicts`, sharded
    over the processes), choose the threshold (choose_count_threshold) on all of them,
    store it in model.count_threshold, and return (threshold, mae, number of images)."""
    counts = {d["image_id"]: count_objects(d.get("annotations")) for d in dataset_dicts}
    was_training = model.training
    model.eval()
    mine = []
    try:
        for inputs in data_loader:
            for inp, out in zip(inputs, model(inputs)):
                mine.append((inp["image_id"], out["instances"].scores.cpu().numpy()))
    finally:
        model.train(was_training)
    gathered = {}
    for part in comm.all_gather(mine):
        gathered.update(dict(part))
    ids = [i for i in counts if i in gathered]
    threshold, mae = choose_count_threshold([gathered[i] for i in ids], [counts[i] for i in ids])
    target = model.module if hasattr(model, "module") else model
    target.count_threshold.fill_(threshold)
    return threshold, mae, len(ids)


class CountCalibrationHook(HookBase):
    """After training: calibrate the counting threshold on the training datasets and save
    model_final again with it (before the final evaluation, which counts with it)."""

    def __init__(self, cfg, build_test_loader):
        self.dataset_names = tuple(cfg.DATASETS.TRAIN)
        self.build_test_loader = build_test_loader

    def after_train(self):
        trainer = self.trainer
        if trainer.iter + 1 < trainer.max_iter:
            return  # stopped early (an error): nothing final to calibrate
        dicts, loaders = [], []
        for name in self.dataset_names:
            dicts += DatasetCatalog.get(name)
            loaders.append(self.build_test_loader(name))
        batches = (batch for loader in loaders for batch in loader)
        threshold, mae, n = calibrate_count_threshold(trainer.model, batches, dicts)
        logger.info(f"Counting threshold chosen on the training set "
                    f"({', '.join(self.dataset_names)}, {n} images): {threshold:.4f} "
                    f"(training counting MAE {mae:.2f})")
        trainer.checkpointer.save("model_final")
