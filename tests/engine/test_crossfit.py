"""Cross-fitted refinement (refine_export --folds K): the fold split, each image refined
by a model whose training set excludes it, the disagreement between fold models, a
rerun that reuses the fold models, and --folds 1 as before."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpr_d2.data import dataset_files
from cpr_d2.engine.crossfit import combine_fold_rows, fold_json, image_folds
from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/forest/cpr_R18_s8_r2.yaml"
FAST = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100",
        "SOLVER.IMS_PER_BATCH", "2"]


def images(n, start=0):
    return [{"id": 100 + k, "file_name": f"tile_{k}.png"} for k in range(start, start + n)]


def test_folds_are_balanced_and_do_not_depend_on_the_json_order():
    ims = images(11)
    folds = image_folds(ims, 3)
    assert sorted(folds) == [im["id"] for im in ims]
    sizes = sorted(list(folds.values()).count(k) for k in range(3))
    assert sizes == [3, 4, 4]
    assert image_folds(ims[::-1], 3) == folds
    assert set(image_folds(ims, 1).values()) == {0}


def test_too_few_images_for_the_folds_says_how_many():
    with pytest.raises(ValueError, match=r"points.json: --folds 3 needs at least 3 images.*has "
                                         r"2; use --folds 2 or fewer"):
        image_folds(images(2), 3, "points.json")
    with pytest.raises(ValueError, match="whole number >= 1"):
        image_folds(images(2), 0)


def test_a_fold_json_holds_every_other_fold():
    data = {"images": images(4), "categories": [{"id": 1, "name": "tree"}],
            "annotations": [{"id": k, "image_id": 100 + k % 4, "point": [1, 2]} for k in range(8)]}
    folds = image_folds(data["images"], 2)
    for k in range(2):
        out = fold_json(data, folds, k)
        assert {im["id"] for im in out["images"]} == {i for i, f in folds.items() if f != k}
        assert {a["image_id"] for a in out["annotations"]} == {im["id"] for im in out["images"]}
        assert len(out["annotations"]) == 4 and out["categories"] == data["categories"]
    assert len(data["images"]) == 4  # the input is not modified


def test_each_object_takes_its_own_folds_model_and_the_others_distance():
    folds = {1: 0, 2: 1}
    image_of = {10: 1, 11: 2, 12: 2}
    row = {"score": 0.5, "coarse_point": [0.0, 0.0], "refined": True}
    rows = [
        {10: {**row, "point": [3.0, 4.0]}, 11: {**row, "point": [9.0, 9.0]},
         12: {**row, "point": [1.0, 1.0]}},
        {10: {**row, "point": [0.0, 0.0]}, 11: {**row, "point": [9.0, 1.0]}},  # 12 not refined
    ]
    out = combine_fold_rows(rows, folds, image_of)
    assert set(out) == {10, 11}  # fold 1's model did not refine object 12
    assert out[10]["point"] == [3.0, 4.0] and out[10]["fold"] == 0
    assert out[10]["disagreement"] == pytest.approx(5.0)
    assert out[11]["point"] == [9.0, 1.0] and out[11]["fold"] == 1
    assert out[11]["disagreement"] == pytest.approx(8.0)


def small_json(path, count=4):
    json_file, root = dataset_files("forest")
    with open(json_file) as f:
        data = json.load(f)
    keep = {im["id"] for im in data["images"][:count]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path.write_text(json.dumps(data))
    return str(path), root, data


def run_refine(tmp_path, source, root, output, folds, *extra, flags=()):
    tool = load_tool("refine_export")
    args = tool.parse_args(["--config-file", CONFIG, "--json", source, "--image-root", root,
                            "--output", str(output), "--folds", str(folds), *flags,
                            "OUTPUT_DIR", str(tmp_path / "run"), *FAST, *extra])
    return tool.main(args)


def test_refine_export_cross_fits_and_reuses_its_fold_models(tmp_path, capsys):
    source, root, data = small_json(tmp_path / "points.json")
    output = tmp_path / "refined.json"
    rows = run_refine(tmp_path, source, root, output, 2)
    work = tmp_path / "run" / "refine_export" / "crossfit_2"
    fold_of = {}
    for k in range(2):
        assert (work / f"fold_{k}" / "model_final.pth").is_file()
        trained_on = {im["file_name"] for im in
                      json.loads((work / f"fold_{k}" / "train.json").read_text())["images"]}
        assert trained_on and len(trained_on) == 2
        fold_of.update({im["file_name"]: k for im in data["images"]
                        if im["file_name"] not in trained_on})
    assert sorted(fold_of) == sorted(im["file_name"] for im in data["images"])
    file_of = {im["id"]: im["file_name"] for im in data["images"]}
    out = json.loads(output.read_text())
    refined = [a for a in out["annotations"] if "refine_fold" in a]
    assert len(refined) == len(rows) == sum(1 for a in data["annotations"] if not a["iscrowd"])
    for ann in refined:
        # Refined by the model whose training set excludes the annotation's image.
        assert ann["refine_fold"] == fold_of[file_of[ann["image_id"]]]
        assert ann["refine_disagreement"] >= 0
        row = rows[ann["id"]]
        assert 0.0 <= ann["refine_agreement"] == row["agreement"] <= 1.0
        assert ann["refine_reliable"] == (ann["refine_reliability"] >= 0.5)
        # Two tiles per fold model: far too few trees, so safe mode (agreed, the default)
        # keeps every coarse point, with the refined one beside it where it moved.
        assert ann["refine_distrusted"] is True
        assert ann["point"] == pytest.approx(ann["coarse_point"]) == row["point"]
        assert ("refine_point" in ann) == bool(row.get("kept_coarse"))
    trust = json.loads((tmp_path / "refined.trust.json").read_text())
    assert trust["folds"] == 2 and trust["objects"] == len(refined)
    assert trust["keep unreliable"] == "agreed" and trust["distrusted"] == len(refined)
    assert trust["kept coarse"] == sum("refine_point" in a for a in refined)
    printed = capsys.readouterr().out
    assert "refined" in printed and "trust in the refinement" in printed
    # The tool says why, last.
    assert trust["fewest training objects"] < 200
    assert "WARNING: too little data: fold model" in printed
    assert f"safe mode left the {len(refined)} objects of the classes" in printed

    # --keep-unreliable refined writes the refined points the safe mode kept aside.
    written = run_refine(tmp_path, source, root, tmp_path / "all.json", 2,
                         flags=("--keep-unreliable", "refined"))
    every = {a["id"]: a for a in json.loads((tmp_path / "all.json").read_text())["annotations"]}
    for ann in refined:
        assert every[ann["id"]]["point"] == ann.get("refine_point", ann["point"])
        assert "refine_distrusted" not in every[ann["id"]]
        assert written[ann["id"]]["point"] == every[ann["id"]]["point"]

    # A rerun trains nothing: the fold models are reused.
    stamps = [os.path.getmtime(work / f"fold_{k}" / "model_final.pth") for k in range(2)]
    again = run_refine(tmp_path, source, root, tmp_path / "again.json", 2)
    assert [os.path.getmtime(work / f"fold_{k}" / "model_final.pth") for k in range(2)] == stamps
    assert json.loads((tmp_path / "again.json").read_text()) == out and again == rows

    # Other training settings in the same folder are refused, not mixed; the message
    # names the keys and their values.
    with pytest.raises(ValueError, match=r"crossfit_2 holds fold models trained with other "
                                         r"settings \(max_iter; config: SOLVER.MAX_ITER: 2 -> 3\)"):
        run_refine(tmp_path, source, root, tmp_path / "third.json", 2, "SOLVER.MAX_ITER", "3")
    assert not (tmp_path / "third.json").exists()
    with pytest.raises(ValueError, match=r"\(config: MODEL.CPR.RADIUS: 2 -> 3\); give another "
                                         r"OUTPUT_DIR, or remove .*crossfit_2"):
        run_refine(tmp_path, source, root, tmp_path / "third.json", 2, "MODEL.CPR.RADIUS", "3")
    assert not (tmp_path / "third.json").exists()
    # Keys of the refinement only reuse the fold models (trained once, refined again).
    flipped = run_refine(tmp_path, source, root, tmp_path / "flipped.json", 2,
                         "MODEL.CPR.REFINE_FLIPS", '["horizontal"]')
    assert [os.path.getmtime(work / f"fold_{k}" / "model_final.pth") for k in range(2)] == stamps
    assert flipped.keys() == rows.keys()
    # A folds.json from before the training config was recorded: reused, with a warning.
    manifest = json.loads((work / "folds.json").read_text())
    del manifest["training_config"]
    (work / "folds.json").write_text(json.dumps(manifest))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("cpr_d2.engine.crossfit").addHandler(handler)
    try:
        assert run_refine(tmp_path, source, root, tmp_path / "older.json", 2) == rows
    finally:
        logging.getLogger("cpr_d2.engine.crossfit").removeHandler(handler)
    assert any("does not record the config its fold models were trained with" in r.getMessage()
               for r in records)


def test_one_fold_refines_with_the_given_model_as_before(tmp_path):
    source, root, _ = small_json(tmp_path / "points.json", count=2)
    train_net = load_tool("train_net")
    train_net.main(train_net.argument_parser().parse_args(
        ["--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path / "model"), *FAST,
         "DATASETS.TEST", "()"]))
    weights = ["MODEL.WEIGHTS", str(tmp_path / "model" / "model_final.pth")]
    tool = load_tool("refine_export")
    common = ["--config-file", CONFIG, "--json", source, "--image-root", root]
    opts = ["OUTPUT_DIR", str(tmp_path / "run"), *FAST, *weights]
    tool.main(tool.parse_args([*common, "--output", str(tmp_path / "plain.json"), *opts]))
    tool.main(tool.parse_args([*common, "--output", str(tmp_path / "one.json"), "--folds", "1",
                               *opts]))
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert json.loads((tmp_path / "one.json").read_text()) == plain
    assert not any("refine_fold" in a for a in plain["annotations"])
    assert not (tmp_path / "run" / "refine_export" / "crossfit_1").exists()


def test_two_processes_train_the_folds_and_write_one_json(tmp_path):
    """Under launch (2 gloo processes) the fold jsons are written once, both processes
    train each fold model together and the main process writes the json."""
    source, root, data = small_json(tmp_path / "points.json")
    output = tmp_path / "refined.json"
    subprocess.run(
        [sys.executable, "tools/refine_export.py", "--config-file", CONFIG, "--json", source,
         "--image-root", root, "--output", str(output), "--folds", "2", "--num-gpus", "0",
         "--num-workers", "2", "--dist-url", "auto", "OUTPUT_DIR", str(tmp_path / "run"), *FAST],
        cwd=ROOT, check=True, env=os.environ.copy(), timeout=900)
    work = tmp_path / "run" / "refine_export" / "crossfit_2"
    assert all((work / f"fold_{k}" / "model_final.pth").is_file() for k in range(2))
    refined = [a for a in json.loads(output.read_text())["annotations"] if "refine_fold" in a]
    assert len(refined) == sum(1 for a in data["annotations"] if not a["iscrowd"])
    assert {a["refine_fold"] for a in refined} == {0, 1}


def test_a_fold_with_nothing_to_train_on_keeps_its_coarse_points(tmp_path, capsys):
    # One tile with trees and one without: the fold model that would train on the empty
    # tile is not trained, the trees (whose fold it is) keep their coarse points, and the
    # report says why, last.
    json_file, root = dataset_files("forest")
    data = json.loads(Path(json_file).read_text())
    has = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    full = next(im for im in data["images"] if im["id"] in has)
    empty = next(im for im in data["images"] if not any(a["image_id"] == im["id"]
                                                         for a in data["annotations"]))
    data["images"] = [full, empty]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == full["id"]]
    source = tmp_path / "points.json"
    source.write_text(json.dumps(data))
    output = tmp_path / "refined.json"
    rows = run_refine(tmp_path, str(source), root, output, 2)
    folds = image_folds(data["images"], 2)
    idle, busy = folds[full["id"]], folds[empty["id"]]
    work = tmp_path / "run" / "refine_export" / "crossfit_2"
    assert not (work / f"fold_{idle}" / "model_final.pth").exists()
    assert (work / f"fold_{busy}" / "model_final.pth").is_file()
    objects = [a for a in data["annotations"] if not a["iscrowd"]]
    assert sorted(rows) == sorted(a["id"] for a in objects)
    out = {a["id"]: a for a in json.loads(output.read_text())["annotations"]}
    for ann in objects:
        row, written = rows[ann["id"]], out[ann["id"]]
        assert row["point"] == row["coarse_point"] == [float(v) for v in ann["point"]]
        assert row["refined"] is False and row["fold"] == idle
        assert written["point"] == ann["point"] and written["refine_fold"] == idle
        # The trained fold model (it saw these trees) gives the disagreement.
        assert row["disagreement"] is not None and row["disagreement"] >= 0
    printed = capsys.readouterr()
    assert f"fold model {idle} had no objects to train on" in printed.out
    trust = json.loads((tmp_path / "refined.trust.json").read_text())
    assert trust["fewest training objects"] == 0 and trust["moved"] == 0


def test_the_report_counts_a_fold_without_objects_as_none():
    from cpr_d2.engine.trust import trust_report
    rows = {1: {"point": [5.0, 5.0], "coarse_point": [5.0, 5.0], "refined": False,
                "num_kept": 0, "size": 0.0, "score": 0.0}}
    report = trust_report(rows, folds=2, train_objects={0: {}, 1: {1: 500}})
    assert report["fewest training objects"] == 0
    assert any("fold model 0 had no objects to train on" in w for w in report["warnings"])
    report = trust_report(rows, folds=2, train_objects={0: {1: 300}, 1: {1: 500}})
    assert report["fewest training objects"] == 300 and not report["warnings"]
