"""tools/predict.py: points as data (point json or csv), resumable, bad images skipped."""
import csv
import json
import os
import shutil

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from cpr_d2.data import dataset_files, register_point_coco
from tests.model_helpers import untrained_checkpoint
from tests.tool_loader import load_tool

P2P = "configs/forest/p2p_R18_s8.yaml"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(untrained_checkpoint(P2P, tmp_path_factory.mktemp("predict") / "m.pth"))


@pytest.fixture
def images(tmp_path):
    """A folder of 2 forest tiles and a file that is no image."""
    _, root = dataset_files("forest_test")
    folder = tmp_path / "images"
    folder.mkdir()
    for name in sorted(os.listdir(root))[:2]:
        shutil.copy(os.path.join(root, name), folder / name)
    (folder / "broken.png").write_text("not an image")
    return folder


def predict(tmp_path, weights, *argv):
    tool = load_tool("predict")
    args = tool.parse_args([*argv, "--config-file", P2P, "--min-score", "0.001",
                            "MODEL.WEIGHTS", weights, "MODEL.P2PNET.SCORE_THRESH", "0.0",
                            "OUTPUT_DIR", str(tmp_path / "run")])
    return tool.main(args)


def test_json_output_loads_back_and_bad_images_are_skipped(tmp_path, weights, images, capsys):
    out = tmp_path / "points.json"
    rows, failed = predict(tmp_path, weights, "--input", str(images), "--output", str(out))
    assert [os.path.basename(p) for p, _ in failed] == ["broken.png"]
    assert "cannot read the image" in failed[0][1]
    assert len(rows) == 2 and all(len(r["points"]) > 0 for r in rows)
    assert not os.path.exists(str(out) + ".partial.jsonl")
    data = json.loads(out.read_text())
    assert data["categories"] == [{"id": 1, "name": "tree"}]
    assert data["info"]["settings"]["min_score"] == pytest.approx(0.001)
    assert all(a["score"] >= 0.001 for a in data["annotations"])
    # pycocotools and register_point_coco read it: the same points per image.
    from pycocotools.coco import COCO

    coco = COCO(str(out))
    assert len(coco.getAnnIds()) == sum(len(r["points"]) for r in rows)
    register_point_coco("predict_tool_out", str(out), "")
    try:
        records = DatasetCatalog.get("predict_tool_out")
        assert [len(r["annotations"]) for r in records] == [len(r["points"]) for r in rows]
        assert records[0]["annotations"][0]["point"] == pytest.approx(rows[0]["points"][0])
        assert (records[0]["height"], records[0]["width"]) == (rows[0]["height"], rows[0]["width"])
    finally:
        DatasetCatalog.remove("predict_tool_out")
        MetadataCatalog.remove("predict_tool_out")


def test_a_rerun_goes_on_where_the_last_one_stopped(tmp_path, weights, images, capsys):
    (images / "broken.png").unlink()
    out = tmp_path / "points.json"
    first = sorted(os.listdir(images))[0]
    predict(tmp_path, weights, "--input", str(images / first), "--output", str(out))
    whole = json.loads(out.read_text())
    # A run killed in the middle of the second image: its partial file ends in a cut line.
    partial = str(out) + ".partial.jsonl"
    settings = whole["info"]["settings"]
    row = {"file_name": str(images / first), "height": 1, "width": 1, "points": [],
           "scores": [], "classes": []}
    with open(partial, "w") as f:
        f.write(json.dumps({"settings": settings}) + "\n" + json.dumps(row) + "\n"
                + '{"file_name": "cut sh')
    out.unlink()
    capsys.readouterr()
    rows, failed = predict(tmp_path, weights, "--input", str(images), "--output", str(out))
    assert "2 images: 1 done before, 1 to predict" in capsys.readouterr().out
    assert not failed and len(rows) == 2
    assert rows[0] == row  # taken from the partial file, not predicted again
    # With the output complete, a rerun over a folder with one more image predicts that one.
    shutil.copy(images / first, images / "zz_new.png")
    capsys.readouterr()
    rows, _ = predict(tmp_path, weights, "--input", str(images), "--output", str(out))
    assert "3 images: 2 done before, 1 to predict" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [os.path.basename(im["file_name"]) for im in data["images"]] == sorted(
        os.listdir(images))
    # Another score threshold is another run: refused, the output kept.
    before = out.read_bytes()
    tool = load_tool("predict")
    args = tool.parse_args(["--input", str(images), "--output", str(out), "--config-file", P2P,
                            "--min-score", "0.5", "MODEL.WEIGHTS", weights,
                            "OUTPUT_DIR", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"points.json was written by a run with other "
                                         r"settings \(min_score"):
        tool.main(args)
    assert out.read_bytes() == before


def test_csv_output(tmp_path, weights, images):
    out = tmp_path / "points.csv"
    rows, _ = predict(tmp_path, weights, "--input", str(images / "*_c0.png"), str(images / "*.png"),
                      "--output", str(out))
    with open(out) as f:
        table = list(csv.reader(f))
    assert table[0] == ["image", "x", "y", "class", "score"]
    assert len(table) - 1 == sum(len(r["points"]) for r in rows)
    assert {t[3] for t in table[1:]} == {"tree"}
    with pytest.raises(ValueError, match="exists; a csv cannot be continued"):
        predict(tmp_path, weights, "--input", str(images), "--output", str(out))


@pytest.mark.parametrize("output, message", [
    ("points.txt", "ending in .json .*or .csv"),
    ("folder", "is a folder; pass the path of the file to write, e.g. --output .*points.json"),
    ("images/first", "is one of the input images"),
    ("blocker/points.json", "blocker is a file, so the folder .*blocker cannot be created"),
])
def test_bad_outputs_are_refused_before_any_work(tmp_path, weights, images, output, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "blocker").write_text("")
    first = sorted(os.listdir(images))[0]
    target = str(images / first) if output == "images/first" else str(tmp_path / output)
    with pytest.raises(ValueError, match=message):
        predict(tmp_path, weights, "--input", str(images), "--output", target)
    assert not (tmp_path / "run").exists()  # refused before the config and the model


def _two_class_checkpoint(path):
    import torch
    from detectron2.modeling import build_model

    from cpr_d2.config import get_cpr_d2_cfg

    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(P2P)
    cfg.MODEL.P2PNET.NUM_CLASSES = 2
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("cpr weights", r"does not fit this P2PNet"),
    ("other class count", r"does not fit this P2PNet: .*another shape"),
    ("corrupt weights", r"is not a checkpoint torch can read"),
    ("no images", r"the folder holds no image"),
])
def test_bad_models_and_inputs_leave_nothing_written(tmp_path, weights, images, case, message):
    out = tmp_path / "points.json"
    model, source = weights, str(images)
    if case == "cpr weights":
        model = str(untrained_checkpoint("configs/forest/cpr_R18_s8_r2.yaml", tmp_path / "c.pth"))
    elif case == "other class count":
        model = _two_class_checkpoint(tmp_path / "two.pth")
    elif case == "corrupt weights":
        model = str(tmp_path / "cut.pth")
        with open(weights, "rb") as f, open(model, "wb") as g:
            g.write(f.read()[:1000])
    else:
        (tmp_path / "empty").mkdir()
        source = str(tmp_path / "empty")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        predict(tmp_path, model, "--input", source, "--output", str(out))
    assert not out.exists() and not os.path.exists(str(out) + ".partial.jsonl")


def _centres_json(path, folder="elsewhere"):
    """A predictions json with a point at every forest_test tree's box centre (score 1), its
    images named as in the dataset but in another folder."""
    images, annotations = [], []
    for k, r in enumerate(DatasetCatalog.get("forest_test"), start=1):
        images.append({"id": k, "file_name": os.path.join(folder, os.path.basename(r["file_name"])),
                       "height": r["height"], "width": r["width"]})
        for a in r["annotations"]:
            x, y, w, h = a["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": k, "category_id": 1,
                                "point": [x + w / 2, y + h / 2], "score": 1.0})
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "tree"}]}))
    return path


def test_evaluate_points_scores_a_predictions_file(tmp_path):
    tool = load_tool("evaluate_points")
    preds = _centres_json(tmp_path / "centres.json")
    results = tool.main(tool.parse_args(["--predictions", str(preds), "--dataset", "forest_test",
                                         "--output-dir", str(tmp_path / "eval")]))
    metrics = results["point_ap"]
    # The metric computed directly on the dataset's records: the file's images were
    # matched to the right records by name.
    import numpy as np

    from cpr_d2.evaluation.evaluator import load_point_ground_truth
    from cpr_d2.evaluation.point_ap import evaluate_point_ap

    _, _, gts = load_point_ground_truth("forest_test")
    dets = []
    for r in DatasetCatalog.get("forest_test"):
        centres = [[a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2]
                   for a in r["annotations"]]
        dets.append({"points": np.asarray(centres, np.float64).reshape(-1, 2),
                     "scores": np.ones(len(centres), np.float32),
                     "classes": np.zeros(len(centres), np.int64)})
    direct = evaluate_point_ap(gts, dets, 1).metrics()
    assert metrics["AP@0.5"] == pytest.approx(100 * direct["AP@0.5"]) and metrics["AP@0.5"] > 98
    assert metrics["MAE"] == pytest.approx(direct["MAE"])
    saved = json.loads((tmp_path / "eval" / "point_ap_metrics.json").read_text())
    assert saved["AP@0.5"] == pytest.approx(metrics["AP@0.5"])
    assert "Point AP on 'forest_test'" in (tmp_path / "eval" / "log.txt").read_text()
    # Half the images predicted: the others count as empty.
    data = json.loads(preds.read_text())
    keep = {im["id"] for im in data["images"][::2]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    half = tmp_path / "half.json"
    half.write_text(json.dumps(data))
    partial = tool.main(tool.parse_args(["--predictions", str(half), "--dataset", "forest_test"]))
    assert 0 < partial["point_ap"]["AP@0.5"] < metrics["AP@0.5"] - 20


@pytest.mark.parametrize("change, message", [
    ("foreign image", r"1 predicted image\(s\) are not in dataset 'forest_test', e.g. .*x.png"),
    ("unknown class", r"category_id 9, which dataset 'forest_test' does not have"),
    ("not a point json", r"not a point json"),
])
def test_evaluate_points_refuses_what_it_cannot_match(tmp_path, change, message):
    tool = load_tool("evaluate_points")
    data = json.loads(_centres_json(tmp_path / "centres.json").read_text())
    if change == "foreign image":
        data["images"][0]["file_name"] = "x.png"
    elif change == "unknown class":
        data["annotations"][0]["category_id"] = 9
    else:
        data = [{"image_id": 1, "point": [1, 1]}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        tool.main(tool.parse_args(["--predictions", str(bad), "--dataset", "forest_test"]))


def test_predict_then_evaluate(tmp_path, weights):
    _, root = dataset_files("forest_test")
    out = tmp_path / "points.json"
    predict(tmp_path, weights, "--input", root, "--output", str(out))
    tool = load_tool("evaluate_points")
    results = tool.main(tool.parse_args(["--predictions", str(out), "--dataset", "forest_test",
                                         "--config-file", P2P]))
    assert {"AP@0.5", "AP@1", "AP@2", "mAP", "MAE"} <= set(results["point_ap"])
