"""The counting threshold: chosen on the training images only, stored in the model,
used by the evaluator."""
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Instances

from cpr_d2.engine.count_calibration import (CountCalibrationHook, calibrate_count_threshold,
                                             choose_count_threshold)


def test_choose_by_hand():
    # Image 1 has 2 objects, image 2 has 1. Above 0.65: 1 + 0 (MAE 1); above 0.45:
    # 2 + 1 (MAE 0); above 0.25: 3 + 1 (MAE 0.5).
    t, mae = choose_count_threshold([[0.9, 0.5, 0.3], [0.4]], [2, 1])
    assert t == pytest.approx(0.35) and mae == 0
    # Of equally good thresholds (0.3: counts 1 and 1; 0.9: 0 and 0) the lowest wins;
    # none lands on a score.
    t, mae = choose_count_threshold([[0.8], [0.6]], [0, 1])
    assert mae == 0.5 and t == pytest.approx(0.3)
    # No objects anywhere: a threshold above every score.
    t, mae = choose_count_threshold([[0.2, 0.1], []], [0, 0])
    assert t > 0.2 and mae == 0
    # More objects than detections: count them all.
    t, mae = choose_count_threshold([[0.3], [0.2]], [5, 5])
    assert t < 0.2 and mae == 4


def test_choose_minimises_the_mae_on_random_scores(np_rng):
    scores = [np_rng.random(np_rng.integers(0, 30)) for _ in range(12)]
    counts = np_rng.integers(0, 20, 12)
    t, mae = choose_count_threshold(scores, counts)
    def mae_at(x):
        return np.mean([abs((s > x).sum() - c) for s, c in zip(scores, counts)])
    assert mae == pytest.approx(mae_at(t))
    grid = np.linspace(-0.01, 1.01, 2001)
    assert mae <= min(mae_at(x) for x in grid) + 1e-12


def test_choose_checks_its_inputs():
    with pytest.raises(ValueError, match="2 images of scores but 1 counts"):
        choose_count_threshold([[0.1], [0.2]], [1])
    with pytest.raises(ValueError, match="no training images"):
        choose_count_threshold([], [])


class _ScoreModel(torch.nn.Module):
    """Returns fixed scores per image id, like P2PNet's inference."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores
        self.register_buffer("count_threshold", torch.tensor(-1.0))

    def forward(self, inputs):
        out = []
        for inp in inputs:
            inst = Instances((8, 8))
            inst.scores = torch.tensor(self.scores[inp["image_id"]])
            out.append({"instances": inst})
        return out


def test_the_hook_reads_the_training_sets_only_and_resaves_the_model(tmp_path):
    train = [{"image_id": 1, "annotations": [{}, {}]}, {"image_id": 2, "annotations": [{"iscrowd": 1}, {}]}]
    DatasetCatalog.register("calib_train", lambda: train)
    DatasetCatalog.register("calib_test", lambda: pytest.fail("the test set was read"))
    try:
        from detectron2.config import CfgNode

        cfg = CfgNode({"DATASETS": CfgNode({"TRAIN": ("calib_train",), "TEST": ("calib_test",)})})
        model = _ScoreModel({1: [0.9, 0.6, 0.2], 2: [0.7, 0.1]})
        built = []

        def loader(name):
            built.append(name)
            return [[{"image_id": d["image_id"]}] for d in DatasetCatalog.get(name)]

        saved = []

        class Trainer:
            iter, max_iter = 9, 10
            checkpointer = type("C", (), {"save": lambda self, name: saved.append(name)})()

        Trainer.model = model
        hook = CountCalibrationHook(cfg, loader)
        hook.trainer = Trainer()
        hook.after_train()
        assert built == ["calib_train"]
        # 2 and 1 objects (the crowd one does not count): above 0.4 gives 2 and 1.
        assert float(model.count_threshold) == pytest.approx(0.4) and saved == ["model_final"]
        # A run that stopped early calibrates nothing.
        model.count_threshold.fill_(-1)
        Trainer.iter = 3
        hook.after_train()
        assert float(model.count_threshold) == -1 and saved == ["model_final"]
    finally:
        for name in ("calib_train", "calib_test"):
            DatasetCatalog.remove(name)


def test_calibrate_restores_training_mode():
    model = _ScoreModel({1: [0.5]})
    model.train()
    t, mae, n = calibrate_count_threshold(model, [[{"image_id": 1}]], [{"image_id": 1, "annotations": [{}]}])
    assert model.training and n == 1 and mae == 0 and t < 0.5
