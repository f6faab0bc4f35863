"""PointAPEvaluator end to end on a tiny registered dataset (hand-computed values)."""
import json
import logging
import math
import os
import uuid

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode, Instances

from cpr_d2.evaluation.evaluator import (METRICS_FILE, PREDICTIONS_FILE, PointAPEvaluator,
                                         _merge_predictions)

CLASSES = ["cat", "dog", "bird"]


def records():
    return [
        {
            "file_name": "a.jpg", "image_id": 10, "height": 200, "width": 200,
            "annotations": [
                # cat, size 10, centre (5, 5)
                {"point": [4, 6], "category_id": 0, "bbox": [0, 0, 10, 10],
                 "bbox_mode": BoxMode.XYWH_ABS},
                # dog given as XYXY: XYWH (20, 20, 40, 40), size 40, centre (40, 40)
                {"point": [41, 39], "category_id": 1, "bbox": [20, 20, 60, 60],
                 "bbox_mode": BoxMode.XYXY_ABS},
                # crowd of cats, centre (125, 125)
                {"point": [125, 125], "category_id": 0, "bbox": [100, 100, 50, 50],
                 "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 1},
            ],
        },
        {
            "file_name": "b.jpg", "image_id": 11, "height": 200, "width": 200,
            # cat, size 20, centre (10, 10)
            "annotations": [{"point": [10, 10], "category_id": 0, "bbox": [0, 0, 20, 20],
                             "bbox_mode": BoxMode.XYWH_ABS}],
        },
        {"file_name": "c.jpg", "image_id": 12, "height": 200, "width": 200, "annotations": []},
    ]


@pytest.fixture
def dataset():
    name = f"test_point_ap_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, records)
    MetadataCatalog.get(name).set(thing_classes=CLASSES)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def register(recs, classes=CLASSES):
    name = f"test_point_ap_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: recs)
    MetadataCatalog.get(name).set(thing_classes=classes)
    return name


def unregister(name):
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def output(points, scores, classes):
    inst = Instances(
        (200, 200),
        pred_points=torch.tensor(points, dtype=torch.float32).reshape(-1, 2),
        scores=torch.tensor(scores, dtype=torch.float32),
        pred_classes=torch.tensor(classes, dtype=torch.int64),
    )
    return {"instances": inst}


def run_batches(evaluator):
    evaluator.reset()
    # batch 1: image 10: cat and dog at their centres, a cat on the crowd (dropped)
    evaluator.process(
        [{"image_id": 10}], [output([[5, 5], [40, 40], [125, 125]], [0.9, 0.8, 0.7], [0, 1, 0])]
    )
    # batch 2: image 11: a cat far away (FP, ranked first among cats), the cat itself;
    # image 12: nothing
    evaluator.process(
        [{"image_id": 11}, {"image_id": 12}],
        [output([[195, 10], [10, 10]], [0.95, 0.6], [0, 0]), output([], [], [])],
    )
    return evaluator.evaluate()


# cat: npos 2, ranked FP (0.95), TP (0.9), TP (0.6): j = 0 -> 0, j = 1..49 -> 1/2,
# j = 50..99 -> 2/3; dog: perfect, 100/101; bird: no GT and no detection, 1.
CAT = (49 * 0.5 + 50 * 2 / 3) / 101
DOG = 100 / 101
BIRD = 1.0


@pytest.mark.parametrize("distributed", [False, True])
def test_end_to_end(dataset, tmp_path, distributed):
    evaluator = PointAPEvaluator(dataset, distributed=distributed, output_dir=str(tmp_path))
    results = run_batches(evaluator)
    assert list(results) == ["point_ap"]
    m = results["point_ap"]
    for name in ("mAP", "AP@0.5", "AP@1", "AP@2"):
        assert m[name] == pytest.approx(100 * (CAT + DOG + BIRD) / 3, abs=1e-9)
    assert m["AP-cat"] == pytest.approx(100 * CAT, abs=1e-9)
    assert m["AP-dog"] == pytest.approx(100 * DOG, abs=1e-9)
    assert m["AP-bird"] == pytest.approx(100.0)
    # small: the dog (size 40) is ignore, its detection dropped -> no detection left: 1
    assert m["AP@1/small"] == pytest.approx(100 * (CAT + 1 + 1) / 3, abs=1e-9)
    # medium: only the dog is a positive; the cat detections are FPs (no cat positive)
    # except the ones on ignore GTs: cats at (5, 5), (10, 10) and on the crowd are dropped,
    # the far one remains -> cat 0
    assert m["AP@1/medium"] == pytest.approx(100 * (0 + DOG + 1) / 3, abs=1e-9)
    # counting (score > 0.5): +1, +1, 0
    assert m["MAE"] == pytest.approx(2 / 3)
    assert m["RMSE"] == pytest.approx(math.sqrt(2 / 3))

    path = tmp_path / PREDICTIONS_FILE
    rows = json.loads(path.read_text())
    assert [(r["image_id"], r["category_id"]) for r in rows] == [
        (10, 0), (10, 1), (10, 0), (11, 0), (11, 0)
    ]
    assert rows[1]["point"] == [40.0, 40.0]
    assert rows[3]["score"] == pytest.approx(0.95, abs=1e-6)
    # The metrics are written beside the predictions (strict json: NaN as null), and no
    # temporary file is left behind.
    assert sorted(os.listdir(tmp_path)) == sorted([PREDICTIONS_FILE, METRICS_FILE])
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["AP@0.5"] == pytest.approx(m["AP@0.5"]) and saved["MAE"] == pytest.approx(m["MAE"])


def test_clean_conventions(dataset):
    evaluator = PointAPEvaluator(dataset, distributed=False, clean=True)
    m = run_batches(evaluator)["point_ap"]
    cat = (50 * 0.5 + 50 * 2 / 3) / 101  # j = 1..50 -> 1/2, j = 51..100 -> 2/3
    assert m["AP-cat"] == pytest.approx(100 * cat, abs=1e-9)
    assert m["AP-dog"] == 100.0
    assert math.isnan(m["AP-bird"])
    assert m["mAP"] == pytest.approx(100 * (cat + 1) / 2, abs=1e-9)  # bird is left out


def test_options_reach_the_metric(dataset):
    evaluator = PointAPEvaluator(
        dataset, distributed=False, taus=(1,), size_ranges={"all": (0, 1e5)}, max_dets=1,
        count_score_thresh=0.0,
    )
    m = run_batches(evaluator)["point_ap"]
    assert [k for k in m if not k.startswith("AP-")] == ["mAP", "AP@1", "MAE", "RMSE",
                                                         "count_threshold"]
    assert m["count_threshold"] == 0.0
    # max_dets 1: image 11 keeps only its FP cat; image 10 keeps its top cat (TP).
    # cat: ranked FP (0.95), TP (0.9): j = 0 -> 0, j = 1..49 -> 1/2 (npos 2)
    assert m["AP-cat"] == pytest.approx(100 * 49 * 0.5 / 101, abs=1e-9)
    # counting every detection: +1 (3 vs 2), +1 (2 vs 1), 0
    assert m["MAE"] == pytest.approx(2 / 3)


def test_a_threshold_the_model_carries_replaces_the_configs(dataset, tmp_path):
    evaluator = PointAPEvaluator(dataset, distributed=False, output_dir=str(tmp_path),
                                 count_score_thresh=0.5)
    evaluator.reset()
    # Counted above 0.85: image 10 gets 1 of 2, image 11 1 of 1, image 12 0 of 0.
    first = output([[5, 5], [40, 40]], [0.9, 0.8], [0, 1])
    first["count_threshold"] = 0.85
    second = output([[195, 10], [10, 10]], [0.95, 0.6], [0, 0])
    second["count_threshold"] = 0.85
    evaluator.process([{"image_id": 10}, {"image_id": 11}], [first, second])
    m = evaluator.evaluate()["point_ap"]
    assert m["MAE"] == pytest.approx(1 / 3) and m["count_threshold"] == 0.85
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["count_threshold"] == 0.85
    assert saved["count_threshold_source"] == "the model's, chosen on its training images"
    # Without one, the config's, and the file says so.
    run_batches(evaluator)
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["count_threshold"] == 0.5
    assert saved["count_threshold_source"] == "TEST.POINT_AP.COUNT_SCORE_THRESH"


def test_a_soft_count_the_model_carries_replaces_counting_above_the_threshold(dataset,
                                                                              tmp_path):
    evaluator = PointAPEvaluator(dataset, distributed=False, output_dir=str(tmp_path),
                                 count_score_thresh=0.5)
    evaluator.reset()
    # Images 10, 11 and 12 hold 2, 1 and 0 objects; the model counts 5 and 1 (its points
    # above 0.85 would have counted 1 and 1), and image 12 gets no output (counts 0).
    first = output([[5, 5], [40, 40]], [0.9, 0.8], [0, 1])
    second = output([[195, 10], [10, 10]], [0.95, 0.6], [0, 0])
    for out, count in ((first, 5), (second, 1)):
        out.update(count_threshold=0.85, count=count, count_rule="soft")
    evaluator.process([{"image_id": 10}, {"image_id": 11}], [first, second])
    m = evaluator.evaluate()["point_ap"]
    assert m["MAE"] == pytest.approx(1.0) and m["RMSE"] == pytest.approx(math.sqrt(3))
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["count_rule"] == "soft" and saved["count_threshold"] == 0.85
    assert saved["count_threshold_source"] == "the model's soft count, fitted on its training images"
    # The same outputs counted by the threshold: 1 of 2, 1 of 1, 0 of 0.
    for out in (first, second):
        out["count_rule"] = "threshold"
    evaluator.reset()
    evaluator.process([{"image_id": 10}, {"image_id": 11}], [first, second])
    assert evaluator.evaluate()["point_ap"]["MAE"] == pytest.approx(1 / 3)
    assert json.loads((tmp_path / METRICS_FILE).read_text())["count_rule"] == "threshold"


def test_results_do_not_accumulate_across_reset(dataset):
    evaluator = PointAPEvaluator(dataset, distributed=False)
    first = run_batches(evaluator)
    second = run_batches(evaluator)  # resets, processes the same batches again
    assert first == second


def test_no_predictions_returns_empty(dataset, caplog):
    evaluator = PointAPEvaluator(dataset, distributed=False)
    with caplog.at_level(logging.WARNING):
        assert evaluator.evaluate() == {}
    assert "predictions" in caplog.text


def test_missing_images_count_as_empty(dataset):
    evaluator = PointAPEvaluator(dataset, distributed=False)
    evaluator.process([{"image_id": 10}], [output([[5, 5], [40, 40]], [0.9, 0.8], [0, 1])])
    m = evaluator.evaluate()["point_ap"]
    # cat: one of two positives found at rank 1: j = 0..49 -> 1
    assert m["AP-cat"] == pytest.approx(100 * 50 / 101, abs=1e-9)


def test_unknown_image_id(dataset):
    evaluator = PointAPEvaluator(dataset, distributed=False)
    evaluator.process([{"image_id": 99}], [output([[5, 5]], [0.9], [0])])
    with pytest.raises(ValueError, match="99"):
        evaluator.evaluate()


def test_missing_fields(dataset):
    evaluator = PointAPEvaluator(dataset, distributed=False)
    inst = Instances(
        (200, 200), scores=torch.ones(1), pred_classes=torch.zeros(1, dtype=torch.int64)
    )
    with pytest.raises(KeyError, match="pred_points"):
        evaluator.process([{"image_id": 10}], [{"instances": inst}])


def test_dataset_without_true_boxes_is_rejected():
    name = register([{"file_name": "a.jpg", "image_id": 1, "height": 10, "width": 10,
                      "annotations": [{"point": [3, 4], "category_id": 0}]}])
    try:
        with pytest.raises(ValueError, match=f"{name}.*true box"):
            PointAPEvaluator(name, distributed=False)
    finally:
        unregister(name)


def test_bad_category_and_duplicate_image():
    ann = {"category_id": 3, "bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS}
    rec = {"file_name": "a.jpg", "image_id": 1, "height": 10, "width": 10, "annotations": [ann]}
    name = register([rec])
    try:
        with pytest.raises(ValueError, match="category_id 3"):
            PointAPEvaluator(name, distributed=False)
    finally:
        unregister(name)
    rec = {"file_name": "a.jpg", "image_id": 1, "height": 10, "width": 10, "annotations": []}
    name = register([rec, dict(rec)])
    try:
        with pytest.raises(ValueError, match="more than once"):
            PointAPEvaluator(name, distributed=False)
    finally:
        unregister(name)


def test_merge_deduplicates_image_ids_across_ranks():
    def pred(image_id, score):
        return {
            "image_id": image_id,
            "points": np.zeros((1, 2)),
            "scores": np.array([score], np.float32),
            "classes": np.zeros(1, np.int64),
        }

    rank0 = [pred(10, 0.1), pred(11, 0.2)]
    rank1 = [pred(11, 0.3), pred(12, 0.4)]  # image 11 again (e.g. sampler padding)
    merged = _merge_predictions([rank0, rank1])
    assert list(merged) == [10, 11, 12]
    assert float(merged[11]["scores"][0]) == pytest.approx(0.2)  # the first one is kept


def test_build_point_evaluator_from_config_and_metadata(tmp_path):
    # A dataset registered from a point json gets its classes only when it is
    # loaded: the evaluator must load it before reading them.
    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.data import register_point_coco
    from cpr_d2.evaluation import build_point_evaluator
    from tests.data.helpers import write_dataset

    path, root = write_dataset(tmp_path)
    name = "test_build_point_evaluator"
    register_point_coco(name, path, root, size_ranges="tinyperson", max_dets=1000)
    try:
        cfg = get_cpr_d2_cfg()
        evaluator = build_point_evaluator(cfg, name, distributed=False)
        assert evaluator._class_names == ["car", "tree"]
        assert evaluator._eval_kwargs["size_ranges"] == "tinyperson"
        assert evaluator._eval_kwargs["max_dets"] == 1000
        cfg.TEST.POINT_AP.SIZE_RANGES = "coco"
        cfg.TEST.POINT_AP.MAX_DETS = 7
        cfg.TEST.POINT_AP.CLEAN = True
        evaluator = build_point_evaluator(cfg, name, distributed=False)
        assert evaluator._eval_kwargs["size_ranges"] == "coco"
        assert evaluator._eval_kwargs["max_dets"] == 7 and evaluator._eval_kwargs["clean"]
        # Perfect predictions at the true box centres (image 1: two objects, one ignored).
        evaluator.reset()
        evaluator.process(
            [{"image_id": 1}, {"image_id": 2}],
            [{"instances": Instances((40, 60), pred_points=torch.tensor([[15.0, 7.0], [40.0, 27.5]]),
                                     scores=torch.tensor([0.9, 0.8]),
                                     pred_classes=torch.tensor([1, 0]))},
             {"instances": Instances((30, 20), pred_points=torch.zeros(0, 2),
                                     scores=torch.zeros(0), pred_classes=torch.zeros(0, dtype=torch.long))}])
        result = evaluator.evaluate()["point_ap"]
        assert result["mAP"] == pytest.approx(100.0)  # clean: a perfect detector scores 1
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
