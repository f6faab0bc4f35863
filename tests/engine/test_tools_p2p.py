"""tools/train_net.py trains and evaluates P2PNet (a few iterations on the forest data),
on coarse points, on a refined json registered through DATASETS.POINT_JSONS, and on
the true box centres."""
import json

import pytest
from detectron2.data import DatasetCatalog

from cpr_d2.data import dataset_files
from tests.tool_loader import load_tool

CONFIG = "configs/forest/p2p_R18_s8.yaml"
FAST = ["SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100"]


def run_train_net(*opts):
    train_net = load_tool("train_net")
    return train_net.main(train_net.argument_parser().parse_args(
        ["--config-file", CONFIG, *opts]))


def test_train_net_trains_and_evaluates_p2pnet(tmp_path):
    results = run_train_net("OUTPUT_DIR", str(tmp_path), *FAST)
    assert (tmp_path / "model_final.pth").is_file()
    metrics = results["point_ap"]
    for key in ("mAP", "AP@0.5", "AP@1", "AP@2", "MAE", "RMSE"):
        assert key in metrics and metrics[key] == metrics[key]  # present, not NaN
    assert 0 <= metrics["AP@0.5"] <= 100
    # The predictions were written for every test image.
    preds = json.loads((tmp_path / "inference" / "forest_test" / "point_predictions.json").read_text())
    assert {p["image_id"] for p in preds} <= {r["image_id"] for r in DatasetCatalog.get("forest_test")}

    # --eval-only on the checkpoint gives the same numbers.
    again = run_train_net("--eval-only", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
                          "OUTPUT_DIR", str(tmp_path / "eval"), "DATALOADER.NUM_WORKERS", "0")
    assert again["point_ap"]["AP@0.5"] == pytest.approx(metrics["AP@0.5"])


def test_point_jsons_register_a_training_set(tmp_path):
    json_file, image_root = dataset_files("forest")
    opts = ["DATASETS.POINT_JSONS", f'(("forest_copy_p2p", "{json_file}", "{image_root}"),)',
            "DATASETS.TRAIN", '("forest_copy_p2p",)', "OUTPUT_DIR", str(tmp_path), *FAST,
            "DATASETS.TEST", "()"]
    run_train_net(*opts)
    assert len(DatasetCatalog.get("forest_copy_p2p")) == len(DatasetCatalog.get("forest"))
    # Registering again with the same files is fine; other files are refused.
    run_train_net(*opts[:-2], "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1")
    with pytest.raises(ValueError, match="already registered with other files"):
        run_train_net("DATASETS.POINT_JSONS", f'(("forest_copy_p2p", "{json_file}", "{tmp_path}"),)',
                      "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"POINT_JSONS\[0\] \('x'\): json file not found"):
        run_train_net("DATASETS.POINT_JSONS", f'(("x", "{tmp_path}/none.json", "{image_root}"),)',
                      "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"POINT_JSONS\[0\] is"):
        run_train_net("DATASETS.POINT_JSONS", '(("x", "y"),)', "OUTPUT_DIR", str(tmp_path))


def test_forest_centres_are_the_true_box_centres():
    coarse = DatasetCatalog.get("forest")
    centres = DatasetCatalog.get("forest_centres")
    assert [r["image_id"] for r in coarse] == [r["image_id"] for r in centres]
    moved = 0
    for rc, rt in zip(coarse, centres):
        for a, b in zip(rc["annotations"], rt["annotations"]):
            x, y, w, h = b["bbox"]
            assert b["point"] == pytest.approx([x + w / 2, y + h / 2])
            moved += a["point"] != b["point"]
    assert moved > 500


def test_ema_augmentation_and_a_counting_threshold_from_the_training_set(tmp_path):
    import torch

    results = run_train_net(
        "OUTPUT_DIR", str(tmp_path), *FAST, "SOLVER.EMA.ENABLED", "True",
        "MODEL.P2PNET.COUNT_CALIBRATION", "train", "INPUT.POINT_AUG.ROT90", "True",
        "INPUT.POINT_AUG.VFLIP", "True", "INPUT.POINT_AUG.SCALE", "(0.8, 1.25)",
        "INPUT.POINT_AUG.BRIGHTNESS", "0.2")
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    threshold = float(final["model"]["count_threshold"])
    assert 0 <= threshold <= 1  # chosen and saved with the model
    assert "EMAHook" in final["trainer"]["hooks"]
    assert results["point_ap"]["count_threshold"] == pytest.approx(threshold)
    saved = json.loads((tmp_path / "inference" / "forest_test" / "point_ap_metrics.json").read_text())
    assert saved["count_threshold_source"] == "the model's, chosen on its training images"
    log = (tmp_path / "log.txt").read_text()
    assert "Counting threshold chosen on the training set (forest, 36 images)" in log
    assert "RandomRot90" in log and "RandomScale" in log  # the package's lines reach log.txt
    # --eval-only counts with the model's threshold.
    again = run_train_net("--eval-only", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
                          "OUTPUT_DIR", str(tmp_path / "eval"), "DATALOADER.NUM_WORKERS", "0")
    assert again["point_ap"]["count_threshold"] == pytest.approx(threshold)
    assert again["point_ap"]["MAE"] == pytest.approx(results["point_ap"]["MAE"])


def test_a_counting_threshold_from_held_out_training_images(tmp_path):
    import torch

    results = run_train_net("OUTPUT_DIR", str(tmp_path), *FAST,
                            "MODEL.P2PNET.COUNT_CALIBRATION", "holdout")
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert 0 <= float(final["model"]["count_threshold"]) <= 1
    assert results["point_ap"]["count_threshold"] == pytest.approx(
        float(final["model"]["count_threshold"]))
    log = (tmp_path / "log.txt").read_text()
    assert ("Counting calibration: 7 of the 36 training images kept out of training "
            "(MODEL.P2PNET.COUNT_HOLDOUT 0.2)") in log
    assert ("Counting threshold chosen on the training images kept out of training "
            "(MODEL.P2PNET.COUNT_HOLDOUT 0.2) (forest, 7 images)") in log


def test_unknown_count_calibration_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="MODEL.P2PNET.COUNT_CALIBRATION must be one of"):
        run_train_net("OUTPUT_DIR", str(tmp_path), *FAST, "MODEL.P2PNET.COUNT_CALIBRATION", "test")
