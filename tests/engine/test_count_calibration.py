"""The counting threshold: chosen on the training images only, stored in the model,
used by the evaluator."""
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Instances

from cpr_d2.engine.count_calibration import (CountCalibrationHook, calibrate_count_threshold,
                                             calibration_split, check_count_calibration,
                                             choose_count_threshold, fit_soft_count, soft_count,
                                             held_out_files)
from tests.tool_loader import load_benchmark


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
    """Returns fixed scores per image id, like P2PNet's inference; `sizes` gives an
    image's (height, width) (default 8 x 8)."""

    def __init__(self, scores, count_rule="threshold", sizes=None):
        super().__init__()
        self.scores = scores
        self.count_rule = count_rule
        self.sizes = sizes or {}
        self.register_buffer("count_threshold", torch.tensor(-1.0))
        self.register_buffer("count_soft", torch.tensor([-1.0, 0.0]))

    def forward(self, inputs):
        out = []
        for inp in inputs:
            inst = Instances(self.sizes.get(inp["image_id"], (8, 8)))
            inst.scores = torch.tensor(self.scores[inp["image_id"]])
            out.append({"instances": inst})
        return out


def _calibration_cfg(calibration, holdout=0.2, train=("calib_train",), rule="threshold"):
    from detectron2.config import CfgNode

    return CfgNode({"DATASETS": CfgNode({"TRAIN": train, "TEST": ("calib_test",)}),
                    "MODEL": CfgNode({"P2PNET": CfgNode({"COUNT_CALIBRATION": calibration,
                                                         "COUNT_HOLDOUT": holdout,
                                                         "COUNT_RULE": rule})})})


class _FakeTrainer:
    iter, max_iter = 9, 10

    def __init__(self, model, saved):
        self.model = model
        self.checkpointer = type("C", (), {"save": lambda _, name: saved.append(name)})()


def _loader(built):
    def build(dicts):
        built.append([d["image_id"] for d in dicts])
        return [[{"image_id": d["image_id"]}] for d in dicts]
    return build


def test_the_hook_reads_the_training_sets_only_and_resaves_the_model(tmp_path):
    train = [{"image_id": 1, "file_name": "a.png", "annotations": [{}, {}]},
             {"image_id": 2, "file_name": "b.png", "annotations": [{"iscrowd": 1}, {}]}]
    DatasetCatalog.register("calib_train", lambda: train)
    DatasetCatalog.register("calib_test", lambda: pytest.fail("the test set was read"))
    try:
        model = _ScoreModel({1: [0.9, 0.6, 0.2], 2: [0.7, 0.1]})
        built, saved = [], []
        hook = CountCalibrationHook(_calibration_cfg("train"), _loader(built))
        hook.trainer = _FakeTrainer(model, saved)
        hook.after_train()
        assert built == [[1, 2]]
        # 2 and 1 objects (the crowd one does not count): above 0.4 gives 2 and 1.
        assert float(model.count_threshold) == pytest.approx(0.4) and saved == ["model_final"]
        # A run that stopped early calibrates nothing.
        model.count_threshold.fill_(-1)
        hook.trainer.iter = 3
        hook.after_train()
        assert float(model.count_threshold) == -1 and saved == ["model_final"]
    finally:
        for name in ("calib_train", "calib_test"):
            DatasetCatalog.remove(name)


def test_holdout_images_are_fixed_by_name_and_never_trained_on():
    records = [{"image_id": k, "file_name": f"tile_{k}.png"} for k in range(36)]
    held = held_out_files(records, 0.2)
    assert len(held) == 7  # round(0.2 * 36)
    assert held_out_files(list(reversed(records)), 0.2) == held  # order does not matter
    assert held_out_files(records * 2, 0.2) == held  # an image listed twice counts once
    assert len(held_out_files(records[:2], 0.01)) == 1 and len(held_out_files(records[:2], 0.99)) == 1
    train, calib = calibration_split(_calibration_cfg("holdout"), records)
    assert {r["file_name"] for r in calib} == held
    assert not held & {r["file_name"] for r in train} and len(train) + len(calib) == 36
    # "train" chooses on every training image, and trains on all of them.
    train, calib = calibration_split(_calibration_cfg("train"), records)
    assert train == calib == records
    with pytest.raises(ValueError, match="needs at least 2 training images"):
        held_out_files(records[:1], 0.2)
    with pytest.raises(ValueError, match="COUNT_HOLDOUT must lie strictly between 0 and 1"):
        calibration_split(_calibration_cfg("holdout", holdout=1.0), records)
    with pytest.raises(ValueError, match="COUNT_CALIBRATION must be one of"):
        calibration_split(_calibration_cfg("test"), records)


def test_the_holdout_hook_chooses_on_the_held_out_images_only():
    train = [{"image_id": k, "file_name": f"tile_{k}.png", "annotations": [{}] * k}
             for k in range(1, 11)]
    DatasetCatalog.register("calib_train", lambda: train)
    DatasetCatalog.register("calib_test", lambda: pytest.fail("the test set was read"))
    try:
        held = held_out_files(train, 0.3)
        model = _ScoreModel({r["image_id"]: [0.5] * r["image_id"] for r in train})
        built, saved = [], []
        hook = CountCalibrationHook(_calibration_cfg("holdout", 0.3), _loader(built))
        hook.trainer = _FakeTrainer(model, saved)
        hook.after_train()
        assert built == [[r["image_id"] for r in train if r["file_name"] in held]]
        assert float(model.count_threshold) < 0.5 and saved == ["model_final"]
    finally:
        for name in ("calib_train", "calib_test"):
            DatasetCatalog.remove(name)


def test_the_training_loader_leaves_the_held_out_images_out():
    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.engine.trainer import _without_held_out

    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/p2p_R18_s8.yaml")
    cfg.MODEL.P2PNET.COUNT_CALIBRATION = "holdout"
    records = DatasetCatalog.get("forest")
    kept = _without_held_out(cfg, records)
    held = held_out_files(records, cfg.MODEL.P2PNET.COUNT_HOLDOUT)
    assert len(kept) == len(records) - len(held) and len(held) == 7
    assert not held & {r["file_name"] for r in kept}
    cfg.MODEL.P2PNET.COUNT_CALIBRATION = "train"
    assert _without_held_out(cfg, records) == records


def test_calibrate_restores_training_mode():
    model = _ScoreModel({1: [0.5]})
    model.train()
    t, mae, n = calibrate_count_threshold(model, [[{"image_id": 1}]], [{"image_id": 1, "annotations": [{}]}])
    assert model.training and n == 1 and mae == 0 and t < 0.5


def test_the_soft_count_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 60, size=20).astype(float)
    areas = rng.uniform(1e4, 4e5, size=20)
    scale, per_pixel = 1.7, -1.1e-4  # background mass: 1 / 1.7 * 1.1e-4 score per pixel
    sums = (counts - per_pixel * areas) / scale
    for direction in ("inverse", "direct"):  # exact data: both fits find the line
        fit = fit_soft_count(sums, areas, counts, direction=direction)
        assert fit[0] == pytest.approx(scale, rel=1e-9)
        assert fit[1] == pytest.approx(per_pixel, rel=1e-9) and fit[2] == 0
    # Noisy counts: "direct" is the least-squares count (residuals orthogonal to both
    # columns) ...
    noisy = counts + rng.normal(0, 2, size=20)
    a, c, mae = fit_soft_count(sums, areas, noisy, direction="direct")
    residual = noisy - (a * sums + c * areas)
    assert abs(residual @ sums) < 1e-6 * np.abs(noisy @ sums)
    assert abs(residual @ areas) < 1e-6 * np.abs(noisy @ areas) and mae > 0
    # ... and "inverse" the least-squares score sum, solved for the count.
    a, c, mae = fit_soft_count(sums, areas, noisy)
    alpha, beta = 1 / a, -c / a
    residual = sums - (alpha * noisy + beta * areas)
    assert abs(residual @ noisy) < 1e-6 * np.abs(sums @ noisy)
    assert abs(residual @ areas) < 1e-6 * np.abs(sums @ areas) and mae > 0
    # It cannot count from one image, from images that all hold as many objects on as
    # many pixels, or when more score means fewer objects.
    for direction in ("inverse", "direct"):
        assert fit_soft_count([3.0], [100.0], [2], direction=direction) is None
        assert fit_soft_count([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [3, 2, 1],
                              direction=direction) is None
    assert fit_soft_count([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [4, 4, 4]) is None
    with pytest.raises(ValueError, match="score sums"):
        fit_soft_count([1.0, 2.0], [1.0], [1, 2])
    with pytest.raises(ValueError, match="direction must be one of"):
        fit_soft_count([1.0, 2.0], [1.0, 1.0], [1, 2], direction="reverse")


def test_the_inverse_fit_counts_crowded_images_without_shrinking():
    # Score sums that grow with the count plus noise (correlation about 0.8, as a model's
    # on forest), on tiles of one size: calibrated on 36 tiles of 0-40 objects, then
    # counting 200 tiles of 40-80 objects and 200 like the calibration tiles. Repeated
    # over 200 draws of the calibration tiles: one draw's slope is itself noisy.
    per_object, background, area = 0.4, 2e-5, 400.0 * 400.0
    crowded_mae, crowded_bias, alike_mae = [], [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)

        def tiles(low, high, n):
            counts = rng.integers(low, high + 1, size=n).astype(float)
            sums = per_object * counts + background * area + rng.normal(0, 3.5, size=n)
            return sums, np.full(n, area), counts

        calibration, crowded, alike = tiles(0, 40, 36), tiles(40, 80, 200), tiles(0, 40, 200)
        errors = {}
        for direction in ("inverse", "direct"):
            scale, per_pixel, _ = fit_soft_count(*calibration, direction=direction)
            errors[direction] = [soft_count(sums, areas, (scale, per_pixel)) - counts
                                 for sums, areas, counts in (crowded, alike)]
        crowded_mae.append([np.abs(errors[d][0]).mean() for d in ("inverse", "direct")])
        crowded_bias.append([errors[d][0].mean() for d in ("inverse", "direct")])
        alike_mae.append([np.abs(errors[d][1]).mean() for d in ("inverse", "direct")])
    crowded_mae, crowded_bias, alike_mae = map(np.array, (crowded_mae, crowded_bias, alike_mae))
    # The direct fit counts the crowded tiles too few, by more than one tile's noise
    # (3.5 / 0.4, about 9 objects); the inverse fit is right on average ...
    assert crowded_bias[:, 1].mean() < -9 and abs(crowded_bias[:, 0].mean()) < 2
    # ... and counts them better in most draws and on the whole.
    assert np.mean(crowded_mae[:, 0] < crowded_mae[:, 1]) > 0.8
    assert crowded_mae[:, 0].mean() < 0.7 * crowded_mae[:, 1].mean()
    # The price: on tiles like the calibration tiles, where the direct fit is the
    # least-squares count, the inverse one counts a little worse (about 16% here).
    ratio = alike_mae[:, 0].mean() / alike_mae[:, 1].mean()
    assert 1.0 < ratio < 1.3


def test_the_soft_hook_fits_on_the_training_images_only():
    # Image k holds k objects and k scores of 0.5 plus background mass 0.01 per pixel.
    train = [{"image_id": k, "file_name": f"tile_{k}.png", "annotations": [{}] * k}
             for k in range(1, 7)]
    sizes = {k: (10 * (3 * k % 7 + 1), 20) for k in range(1, 7)}  # not in step with k
    scores = {k: [0.5] * k + [0.01 * sizes[k][0] * sizes[k][1]] for k in range(1, 7)}
    DatasetCatalog.register("calib_train", lambda: train)
    DatasetCatalog.register("calib_test", lambda: pytest.fail("the test set was read"))
    try:
        model = _ScoreModel(scores, count_rule="soft", sizes=sizes)
        saved = []
        hook = CountCalibrationHook(_calibration_cfg("train", rule="soft"), _loader([]))
        hook.trainer = _FakeTrainer(model, saved)
        hook.after_train()
        # count = 2 x sum - 0.02 per pixel, exactly.
        assert model.count_soft.tolist() == pytest.approx([2.0, -0.02])
        assert float(model.count_threshold) >= 0 and saved == ["model_final"]
        # A threshold-rule model gets no soft count.
        plain = _ScoreModel(scores, sizes=sizes)
        hook.trainer = _FakeTrainer(plain, saved)
        hook.after_train()
        assert plain.count_soft.tolist() == [-1.0, 0.0]
    finally:
        for name in ("calib_train", "calib_test"):
            DatasetCatalog.remove(name)


def test_a_model_whose_scores_fall_with_the_count_is_named_a_poor_run():
    # More objects, less score (image k: 7 - k scores of 0.5 for k objects): no soft count,
    # and the warning points at the training run, not only at the images.
    import logging

    train = [{"image_id": k, "file_name": f"tile_{k}.png", "annotations": [{}] * k}
             for k in range(1, 7)]
    sizes = {k: (20, 20) for k in range(1, 7)}
    scores = {k: [0.5] * (7 - k) for k in range(1, 7)}
    DatasetCatalog.register("calib_train", lambda: train)
    DatasetCatalog.register("calib_test", lambda: pytest.fail("the test set was read"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("cpr_d2.engine.count_calibration")
    logger.addHandler(handler)
    try:
        model = _ScoreModel(scores, count_rule="soft", sizes=sizes)
        hook = CountCalibrationHook(_calibration_cfg("train", rule="soft"), _loader([]))
        hook.trainer = _FakeTrainer(model, [])
        hook.after_train()
        assert model.count_soft.tolist() == [-1.0, 0.0]
        warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no soft count could be fitted on 6 image(s)" in warnings[0]
        assert "train again with another SEED" in warnings[0]
    finally:
        logger.removeHandler(handler)
        for name in ("calib_train", "calib_test"):
            DatasetCatalog.remove(name)


def test_the_count_rule_is_checked():
    with pytest.raises(ValueError, match="COUNT_RULE must be one of"):
        check_count_calibration(_calibration_cfg("train", rule="sum"))
    with pytest.raises(ValueError, match="set MODEL.P2PNET.COUNT_CALIBRATION"):
        check_count_calibration(_calibration_cfg("", rule="soft"))
    bad = _calibration_cfg("train", rule="soft")
    bad.MODEL.P2PNET.COUNT_SOFT_FIT = "reverse"
    with pytest.raises(ValueError, match="COUNT_SOFT_FIT must be one of"):
        check_count_calibration(bad)
    assert check_count_calibration(_calibration_cfg("holdout", rule="soft")) == "holdout"


def _count_rules():
    return load_benchmark("count_rules")


def test_count_rules_of_the_benchmark_on_a_confidence_drop(np_rng):
    # Training images: 10 objects scoring 0.8-0.9 and 40 detections of background at
    # 0.1-0.2. Test images: twice the objects, and every score five times lower (background
    # 0.01-0.02). The absolute threshold (just above the training background, about 0.2)
    # counts nothing there; thresholds relative to the image's top scores (just above
    # 0.2 / 0.9 of the top) count every object; the soft count scales with the scores and
    # counts far too few. Errors are in objects per image.
    def image(n_obj, bg, scale):
        return scale * np.concatenate([np_rng.uniform(0.8, 0.9, n_obj),
                                       np_rng.uniform(*bg, 40)])
    train = [image(10, (0.1, 0.2), 1.0) for _ in range(6)]
    test = [image(20, (0.05, 0.1), 0.2) for _ in range(4)]
    errors = _count_rules().rule_errors(train, [10] * 6, test, [20] * 4)
    assert errors["abs"] == (20.0, -20.0)
    assert errors["top1"] == (0.0, 0.0) and errors["top5"] == (0.0, 0.0)
    assert errors["q90"] == (0.0, 0.0)
    soft_mae, soft_bias = errors["soft"]
    assert soft_bias == pytest.approx(-soft_mae) and soft_mae > 10
    assert "soft+area" not in errors


def test_the_soft_area_rule_follows_a_denser_test_set(np_rng):
    # Every object scores 0.5 and the background adds 0.1 score per 1000 pixels. Training
    # images (4000 px) hold 2-10 objects, test images (3000 px) 30: fitted on the
    # training images, the soft count with the area term counts the denser, smaller test
    # images exactly.
    def image(n_obj, area):
        background = np_rng.uniform(0.01, 0.02, 40)
        return np.concatenate([np.full(n_obj, 0.5), background * 1e-4 * area
                               / background.sum()])
    train_counts = [2, 4, 6, 8, 10, 3]
    train = [image(n, 4000.0) for n in train_counts]
    test = [image(30, 3000.0) for _ in range(3)]
    errors = _count_rules().rule_errors(train, train_counts, test, [30] * 3,
                                        [4000.0] * 6, [3000.0] * 3)
    assert errors["soft+area"] == (0.0, 0.0) and errors["soft+area direct"] == (0.0, 0.0)


def test_the_power_rule_is_chosen_on_the_training_images_alone(np_rng):
    # Objects score 0.9; 40 background detections score anywhere in [0, 0.45], so their
    # sum (about 9 +- 0.8) blurs the plain score sum, while a higher power of the scores
    # leaves the objects and quiets the background: leave-one-out on the training
    # images picks a power above 1. The test images' scores never reach the choice.
    rules = _count_rules()

    def image(n_obj):
        return np.concatenate([np.full(n_obj, 0.9), np_rng.uniform(0.0, 0.45, 40)])
    train_counts = list(np_rng.integers(0, 20, size=30))
    train = [image(n) for n in train_counts]
    areas = [1000.0] * len(train)
    p = rules.choose_power(train, train_counts, areas)
    assert p > 1 and p in rules.POWERS
    errors = rules.rule_errors(train, train_counts, [image(25)] * 3, [25] * 3, areas,
                               [1000.0] * 3)
    assert errors["p"][0] == p
    assert errors["soft^p+area"][0] <= 1.0
    # When every power counts the training images exactly (each object and the
    # background one score of 0.5), the first of equals, the smallest power, is kept.
    exact = [np.full(n + 1, 0.5) for n in train_counts]
    assert rules.choose_power(exact, train_counts, areas) == rules.POWERS[0]
