"""Hostile inputs through every user entry point (train_net, refine_export, make_coarse,
demo, the evaluator): each fails with an error that names the file, key or record, and
leaves no partial output behind (no checkpoint, json, picture or temporary file)."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data.classes import resolve_num_classes
from cpr_d2.evaluation import evaluate_point_ap
from tests.tool_loader import load_tool

CPR = "configs/forest/cpr_R18_s8_r2.yaml"
P2P = "configs/forest/p2p_R18_s8.yaml"
FAST = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", "()"]
# Files a failed run may leave: detectron2's log, the config it was given, and the
# (empty) metrics its event writers flush on the way out.
ALLOWED = {"log.txt", "config.yaml", "metrics.json"}


def good_json():
    return {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 80}],
            "categories": [{"id": 1, "name": "tree"}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "point": [20.0, 30.0],
                             "bbox": [10.0, 20.0, 20.0, 20.0], "iscrowd": 0},
                            {"id": 6, "image_id": 1, "category_id": 1, "point": [60.0, 30.0],
                             "bbox": [50.0, 20.0, 20.0, 20.0], "iscrowd": 0}]}


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def dataset(tmp_path, data=None, image="ok"):
    """A one-image point dataset in tmp_path/data: (json path, image root)."""
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    img = root / "a.png"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    if image == "ok":
        Image.fromarray(pixels).save(img)
    elif image == "truncated":
        Image.fromarray(pixels).save(img)
        img.write_bytes(img.read_bytes()[:200])
    elif image == "text":
        img.write_text("this is not an image")
    path = write(root, "points.json", good_json() if data is None else data)
    return str(path), str(root)


def leftovers(folder):
    """Files under `folder` that a failed command must not have written."""
    found = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if (f in ALLOWED or f.startswith("events.out.tfevents.")
                    or dirpath.startswith(str(folder / "data"))):
                continue
            found.append(os.path.relpath(os.path.join(dirpath, f), folder))
    return found


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Untrained CPRNet and P2PNet checkpoints, and a text file posing as one."""
    out = tmp_path_factory.mktemp("weights")
    paths = {}
    for name, config in (("cpr", CPR), ("p2p", P2P)):
        cfg = get_cpr_d2_cfg()
        cfg.merge_from_file(config)
        resolve_num_classes(cfg, training=True)  # the forest configs take it from the data
        torch.manual_seed(0)
        paths[name] = str(out / f"{name}.pth")
        torch.save({"model": build_model(cfg).state_dict()}, paths[name])
    paths["text"] = str(write(out, "notes.pth", "not a checkpoint"))
    return paths


# ---- tools/train_net.py ----------------------------------------------------------------

def run_train_net(tmp_path, *opts, config=CPR, eval_only=False):
    train_net = load_tool("train_net")
    argv = ["--config-file", config] + (["--eval-only"] if eval_only else [])
    argv += ["OUTPUT_DIR", str(tmp_path / "out"), *FAST, *opts]
    return train_net.main(train_net.argument_parser().parse_args(argv))


def registered(json_file, root, name):
    return ["DATASETS.POINT_JSONS", repr(((name, json_file, root),)), "DATASETS.TRAIN", repr((name,))]


TRAIN_CASES = {
    # case: (json content or None for the good one, image kind, extra opts, error, message)
    "empty json": ("", "ok", [], ValueError, r"points.json.*(empty|not valid json|JSON)"),
    "malformed json": ('{"images": [', "ok", [], ValueError, r"points.json"),
    "json is a list": ([1, 2], "ok", [], ValueError, r"points.json"),
    "annotation without point": (
        {**good_json(), "annotations": [{"id": 9, "image_id": 1, "category_id": 1,
                                         "iscrowd": 0}]},
        "ok", [], ValueError, r"points.json: annotation id 9: has no 'point'"),
    # Found by the header check before training (cpr_d2.data.checks): a ValueError.
    "missing image": (None, "missing", [], ValueError, r"image of image id 1 not found: .*a.png"),
    "truncated image": (None, "truncated", [], ValueError, r"cannot read the image of image id 1: .*a.png"),
    "non-image file": (None, "text", [], ValueError, r"cannot read the image of image id 1: .*a.png"),
    "too many points": (None, "ok", ["DATASETS.MAX_POINTS_PER_IMAGE", "1"], ValueError,
                        r"a.png\): 2 annotated points is more than DATASETS.MAX_POINTS_PER_IMAGE = 1"),
    "image too large": (None, "ok", ["INPUT.MAX_IMAGE_PIXELS", "1000"], ValueError,
                        r"80 x 64 = 5,120 pixels is more than INPUT.MAX_IMAGE_PIXELS = 1,000"),
    "iscrowd as a string": (
        {**good_json(), "annotations": [{**good_json()["annotations"][0], "iscrowd": "no"}]},
        "ok", [], ValueError, r"points.json: annotation id 5 of image id 1: 'iscrowd' must be 0 "
                              r"or 1 \(or false or true\), got \"no\""),
    "every point off its image": (
        {**good_json(), "annotations": [{**a, "point": [a["point"][0] + 100, a["point"][1]]}
                                        for a in good_json()["annotations"]]},
        "ok", [], ValueError, r"points.json: all 2 object points lie outside their image"),
    "image size differs from the json": (
        {**good_json(), "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 80}]},
        "ok", [], ValueError, r"image id 1 \(.*a.png\): the file is 80 x 64 \(width x height\), "
                              r"the json says 80 x 40"),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_net_bad_data(tmp_path, case):
    data, image, opts, error, message = TRAIN_CASES[case]
    json_file, root = dataset(tmp_path, data, image)
    name = "hostile_" + case.replace(" ", "_").replace("-", "_")
    with pytest.raises(error, match=message):
        run_train_net(tmp_path, *registered(json_file, root, name), *opts)
    assert leftovers(tmp_path) == []


CONFIG_CASES = {
    "unknown key": (["MODEL.CPR.RADIUSS", "2"], KeyError, r"command-line override: Non-existent key: MODEL.CPR.RADIUSS"),
    "wrong type": (["SOLVER.MAX_ITER", "many"], ValueError, r"command-line override: .*SOLVER.MAX_ITER"),
    "bad value": (["MODEL.CPR.REFINE_RING_STEP", "0.3"], ValueError, r"REFINE_RING_STEP"),
    "missing json": (["DATASETS.POINT_JSONS", '(("x", "nowhere.json", "."),)'], FileNotFoundError,
                     r"POINT_JSONS\[0\] \('x'\): json file not found: nowhere.json"),
    "missing config file": (None, FileNotFoundError, r"config file not found: .*nowhere.yaml"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_train_net_bad_config(tmp_path, case):
    opts, error, message = CONFIG_CASES[case]
    with pytest.raises(error, match=message):
        if opts is None:
            run_train_net(tmp_path, config=str(tmp_path / "nowhere.yaml"))
        else:
            run_train_net(tmp_path, *opts)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("weights,message", [
    ("p2p", r"p2p.pth does not fit this CPRNet: .* weights are missing \(e.g. head\."),
    ("text", r"notes.pth is not a checkpoint torch can read"),
    ("missing", r"MODEL.WEIGHTS not found: .*missing.pth"),
])
def test_train_net_eval_only_with_the_wrong_weights(tmp_path, checkpoints, weights, message):
    path = checkpoints.get(weights, str(tmp_path / "missing.pth"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_train_net(tmp_path, "MODEL.WEIGHTS", path, eval_only=True)
    assert leftovers(tmp_path) == []


def test_mismatched_class_count_is_named(tmp_path, checkpoints):
    cfg_opts = ["MODEL.CPR.NUM_CLASSES", "3"]
    with pytest.raises(ValueError, match=r"have another shape \(e.g. head.cls_logits.weight"):
        run_train_net(tmp_path, "MODEL.WEIGHTS", checkpoints["cpr"], *cfg_opts, eval_only=True)


# ---- tools/refine_export.py ---------------------------------------------------------------

def run_refine(tmp_path, json_file, root, weights, output=None):
    refine_export = load_tool("refine_export")
    output = output or str(tmp_path / "out" / "refined.json")
    args = refine_export.parse_args(
        ["--config-file", CPR, "--json", json_file, "--image-root", root, "--output", output,
         "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "out"),
         "DATALOADER.NUM_WORKERS", "0"])
    return refine_export.main(args)


@pytest.mark.parametrize("case", ["empty json", "malformed json", "truncated image",
                                  "p2p weights", "text weights"])
def test_refine_export_hostile(tmp_path, checkpoints, case):
    data = {"empty json": "", "malformed json": '{"annotations": [{"id": 1,'}.get(case)
    image = "truncated" if case == "truncated image" else "ok"
    json_file, root = dataset(tmp_path, data, image)
    weights = {"p2p weights": checkpoints["p2p"], "text weights": checkpoints["text"]}.get(
        case, checkpoints["cpr"])
    message = {"empty json": r"points.json", "malformed json": r"points.json",
               "truncated image": r"cannot read the image of image id 1",
               "p2p weights": r"p2p.pth does not fit this CPRNet",
               "text weights": r"notes.pth is not a checkpoint"}[case]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_refine(tmp_path, json_file, root, weights)
    assert leftovers(tmp_path) == []


def test_refine_export_never_writes_over_its_input(tmp_path, checkpoints):
    json_file, root = dataset(tmp_path)
    before = open(json_file).read()
    with pytest.raises(ValueError, match="is the input json"):
        run_refine(tmp_path, json_file, root, checkpoints["cpr"], output=json_file)
    assert open(json_file).read() == before


# ---- tools/make_coarse.py -----------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    ("", r"input json .*in.json is not valid json \(line 1, column 1: Expecting value\); "
         r"pass a COCO json"),
    ('{"images": [', r"input json .*in.json is not valid json \(line 1, column 13"),
    ({"images": [{"id": 1}], "annotations": [{"id": 3, "image_id": 1, "category_id": 1}]},
     r"annotation id 3"),
    (None, r"missing.json"),
])
def test_make_coarse_hostile(tmp_path, capsys, content, message):
    make_coarse = load_tool("make_coarse")
    source = str(tmp_path / "missing.json") if content is None else str(write(tmp_path, "in.json", content))
    out = tmp_path / "out" / "points.json"
    assert make_coarse.main(["--input", source, "--output", str(out)]) == 1
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


# ---- tools/demo.py ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing image", "non-image file", "cpr weights"])
def test_demo_hostile(tmp_path, checkpoints, case):
    demo = load_tool("demo")
    _, root = dataset(tmp_path, image="text" if case == "non-image file" else "ok")
    image = str(tmp_path / "nowhere.png") if case == "missing image" else os.path.join(root, "a.png")
    weights = checkpoints["cpr"] if case == "cpr weights" else checkpoints["p2p"]
    message = {"missing image": r"nowhere.png", "non-image file": r"a.png",
               "cpr weights": r"cpr.pth does not fit this P2PNet"}[case]
    args = demo.parse_args(["--config-file", P2P, "--input", image, "--output",
                            str(tmp_path / "out"), "MODEL.WEIGHTS", weights,
                            "OUTPUT_DIR", str(tmp_path / "run")])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        demo.main(args)
    assert leftovers(tmp_path) == []


# ---- the evaluator --------------------------------------------------------------------------

def test_evaluator_hostile_inputs():
    gts = [{"boxes": np.array([[0, 0, 10, 10]]), "classes": np.array([0])}]
    good = {"points": np.array([[5.0, 5.0]]), "scores": np.array([0.9]), "classes": np.array([0])}
    assert evaluate_point_ap(gts, [good], 1).metrics()["AP@0.5"] > 0.9
    with pytest.raises(ValueError):
        evaluate_point_ap(gts, [good, good], 1)  # more images of detections than of GT
    with pytest.raises(ValueError):
        evaluate_point_ap(gts, [{**good, "classes": np.array([4])}], 1)  # unknown class
    with pytest.raises(ValueError):
        evaluate_point_ap(gts, [{**good, "scores": np.array([0.9, 0.8])}], 1)  # ragged


def test_evaluator_rejects_predictions_of_unknown_images(tmp_path):
    from detectron2.structures import Instances

    from cpr_d2.data import register_point_coco
    from cpr_d2.evaluation import PointAPEvaluator

    json_file, root = dataset(tmp_path)
    register_point_coco("hostile_eval", json_file, root)
    evaluator = PointAPEvaluator("hostile_eval", output_dir=str(tmp_path / "out"),
                                 distributed=False)
    evaluator.reset()
    inst = Instances((64, 80))
    inst.pred_points = torch.tensor([[1.0, 2.0]])
    inst.scores = torch.tensor([0.5])
    inst.pred_classes = torch.tensor([0])
    evaluator.process([{"image_id": 99}], [{"instances": inst}])
    with pytest.raises(ValueError, match="not in dataset 'hostile_eval', e.g. image_id 99"):
        evaluator.evaluate()
    assert leftovers(tmp_path) == []


# ---- tools/demo.py: an image that declares a huge size -------------------------------------

_PEAK_RSS = """import json, resource, subprocess, sys, time
start = time.monotonic()
run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": run.returncode, "stderr": run.stderr, "seconds": time.monotonic() - start,
                  "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def test_demo_refuses_a_huge_declared_image_from_its_header(tmp_path, checkpoints):
    """A PNG of a few dozen bytes that declares 30,000 x 30,000 px: the demo names the file
    and INPUT.MAX_IMAGE_PIXELS within seconds, never decoding it (which took 9.6 GB)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from tests.data.test_image_io import png_declaring

    (tmp_path / "data").mkdir()
    huge = png_declaring(tmp_path / "data" / "huge.png", 30000, 30000)
    demo = ["tools/demo.py", "--config-file", P2P, "--input", str(huge), "--output",
            str(tmp_path / "out"), "MODEL.WEIGHTS", checkpoints["p2p"],
            "OUTPUT_DIR", str(tmp_path / "run")]
    # A fresh parent whose only child is the demo: RUSAGE_CHILDREN is then the demo's peak.
    measured = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, *demo],
                              cwd=Path(__file__).resolve().parents[2], capture_output=True,
                              text=True, timeout=300)
    result = json.loads(measured.stdout)
    assert result["rc"] != 0
    assert re.search(r"huge.png: 30000 x 30000 = 900,000,000 pixels is more than "
                     r"INPUT.MAX_IMAGE_PIXELS = 100,000,000", result["stderr"]), result["stderr"]
    assert result["peak_kib"] < 1024 * 1024, f"peak RSS {result['peak_kib'] / 1024:.0f} MiB"
    print(f"demo: {result['seconds']:.1f} s, peak RSS {result['peak_kib'] / 1024:.0f} MiB")
    assert result["seconds"] < 120  # imports and the model take a few seconds; decoding, minutes
    assert leftovers(tmp_path) == []
