"""A point json of one's own with two classes (non-contiguous ids 3 and 7): the class
count comes from the data, a config that says otherwise is refused before a model is
built, the names travel in the checkpoints, the written predictions use the dataset's
ids (and load back with register_point_coco and pycocotools), the AP table reaches the
console and log.txt, and tools/run_pipeline.py runs the whole method on it with KEY VALUE
overrides and no yaml written."""
import copy
import json
import uuid

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import dataset_files, register_point_coco
from cpr_d2.data.classes import checkpoint_classes, resolve_num_classes, training_classes
from cpr_d2.evaluation import PointAPEvaluator
from cpr_d2.engine.predictor import model_metadata
from cpr_d2.evaluation.evaluator import prediction_class_indices
from tests.tool_loader import load_tool

CLASSES = [{"id": 3, "name": "pine"}, {"id": 7, "name": "oak"}]
FAST = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100"]



def two_class_json(split, images, path):
    """The first `images` forest tiles of `split`, every other tree an 'oak' (id 7), the
    rest 'pine' (id 3); returns (json, image root)."""
    json_file, root = dataset_files(split)
    with open(json_file) as f:
        data = json.load(f)
    keep = {img["id"] for img in data["images"][:images]}
    data["images"] = [img for img in data["images"] if img["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    for k, ann in enumerate(data["annotations"]):
        ann["category_id"] = CLASSES[k % 2]["id"]
    data["categories"] = copy.deepcopy(CLASSES)
    path.write_text(json.dumps(data))
    return str(path), root


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Two registered 2-class datasets (train: 2 tiles, test: 1 tile)."""
    tmp = tmp_path_factory.mktemp("own")
    tag = uuid.uuid4().hex[:6]
    train = two_class_json("forest", 2, tmp / "train.json")
    test = two_class_json("forest_test", 1, tmp / "test.json")
    names = {"train": f"own_train_{tag}", "test": f"own_test_{tag}"}
    register_point_coco(names["train"], *train)
    register_point_coco(names["test"], *test)
    return {"tmp": tmp, "names": names, "train": train, "test": test}


def p2p_cfg(train_name, count=None):
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/p2p_R18_s8.yaml")
    cfg.DATASETS.TRAIN = (train_name,)
    if count is not None:
        cfg.MODEL.P2PNET.NUM_CLASSES = count
    return cfg


def test_the_class_count_comes_from_the_training_data(own):
    cfg = p2p_cfg(own["names"]["train"])
    assert cfg.MODEL.P2PNET.NUM_CLASSES == 0
    classes = resolve_num_classes(cfg, training=True)
    assert cfg.MODEL.P2PNET.NUM_CLASSES == 2
    assert (classes.names, classes.category_ids) == (["pine", "oak"], [3, 7])


def test_a_config_with_another_count_is_refused(own):
    cfg = p2p_cfg(own["names"]["train"], count=1)
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 1, but the training dataset.*2 "
                                         r"class\(es\).*'pine' \(id 3\).*set MODEL.P2PNET"):
        resolve_num_classes(cfg, training=True)
    # Training datasets with other categories are refused too.
    with pytest.raises(ValueError, match="disagree on their classes"):
        training_classes((own["names"]["train"], "forest"))


def test_inference_with_an_unknown_count_says_what_to_do(tmp_path):
    cfg = p2p_cfg("not_registered_here")
    cfg.MODEL.WEIGHTS = str(tmp_path / "none.pth")
    with pytest.raises(ValueError, match="stores no class list.*not registered here"):
        resolve_num_classes(cfg, training=False)


def test_train_net_refuses_a_mismatch_before_building_a_model(own, tmp_path, monkeypatch):
    train_net = load_tool("train_net")
    built = []
    monkeypatch.setattr("cpr_d2.engine.trainer.Trainer.build_model",
                        classmethod(lambda cls, cfg: built.append(1)))
    args = train_net.argument_parser().parse_args([
        "--config-file", "configs/forest/p2p_R18_s8.yaml", "OUTPUT_DIR", str(tmp_path),
        "DATASETS.TRAIN", f"('{own['names']['train']}',)", "MODEL.P2PNET.NUM_CLASSES", "3"])
    with pytest.raises(ValueError, match="NUM_CLASSES is 3"):
        train_net.main(args)
    assert not built


@pytest.fixture(scope="module")
def trained(own, tmp_path_factory):
    """P2PNet trained 2 iterations on the 2-class json and evaluated on the other."""
    out = tmp_path_factory.mktemp("own_p2p")
    train_net = load_tool("train_net")
    args = train_net.argument_parser().parse_args([
        "--config-file", "configs/forest/p2p_R18_s8.yaml", "OUTPUT_DIR", str(out),
        "DATASETS.TRAIN", f"('{own['names']['train']}',)",
        "DATASETS.TEST", f"('{own['names']['test']}',)", *FAST,
        # After 2 steps (and their weight average) no score passes the default 0.05.
        "MODEL.P2PNET.SCORE_THRESH", "0.0"])
    results = train_net.main(args)
    return out, results


def test_checkpoints_carry_the_class_names(own, trained):
    out, _ = trained
    classes = checkpoint_classes(str(out / "model_final.pth"))
    assert (classes.names, classes.category_ids) == (["pine", "oak"], [3, 7])
    assert classes.datasets == [own["names"]["train"]]
    assert "NUM_CLASSES: 2" in (out / "config.yaml").read_text()
    # The predictor (and the demo) label with the names the model was trained on, whatever
    # DATASETS.TEST says.
    cfg = p2p_cfg("elsewhere", count=2)
    cfg.DATASETS.TEST = ("forest_test",)
    cfg.MODEL.WEIGHTS = str(out / "model_final.pth")
    assert model_metadata(cfg).thing_classes == ["pine", "oak"]


def test_predictions_use_the_dataset_ids_and_load_back(own, trained, tmp_path):
    out, _ = trained
    test_name = own["names"]["test"]
    rows = json.loads((out / "inference" / test_name / "point_predictions.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= {3, 7}
    image_ids = {r["image_id"] for r in DatasetCatalog.get(test_name)}
    assert {r["image_id"] for r in rows} <= image_ids

    # Exact mapping, on constructed predictions: class index 0 -> id 3, index 1 -> id 7.
    record = DatasetCatalog.get(test_name)[0]
    ev = PointAPEvaluator(test_name, distributed=False, output_dir=str(tmp_path))
    inst = Instances((record["height"], record["width"]))
    inst.pred_points = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    inst.scores = torch.tensor([0.9, 0.8, 0.7])
    inst.pred_classes = torch.tensor([1, 0, 1])
    ev.reset()
    ev.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    ev.evaluate()
    written = json.loads((tmp_path / "point_predictions.json").read_text())
    assert [(r["point"], r["category_id"]) for r in written] == [
        ([10.0, 20.0], 7), ([30.0, 40.0], 3), ([50.0, 60.0], 7)]
    assert prediction_class_indices(written, test_name) == [1, 0, 1]

    # pycocotools reads the file as detection results of the test json.
    from pycocotools.coco import COCO

    with open(own["test"][0]) as f:
        gt_json = json.load(f)
    gt = COCO()
    gt.dataset = copy.deepcopy(gt_json)
    for ann in gt.dataset["annotations"]:
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    gt.createIndex()
    res = gt.loadRes(written)
    assert sorted(a["category_id"] for a in res.loadAnns(res.getAnnIds())) == [3, 7, 7]
    assert {gt.loadCats(c)[0]["name"] for c in (3, 7)} == {"pine", "oak"}

    # The rows as the annotations of a point json: register_point_coco reads the classes.
    as_json = {"images": gt_json["images"], "categories": gt_json["categories"],
               "annotations": [dict(r, id=k + 1) for k, r in enumerate(written)]}
    path = tmp_path / "as_points.json"
    path.write_text(json.dumps(as_json))
    name = f"own_preds_{uuid.uuid4().hex[:6]}"
    register_point_coco(name, str(path), own["test"][1])
    anns = DatasetCatalog.get(name)[0]["annotations"]
    names = MetadataCatalog.get(name).thing_classes
    assert [names[a["category_id"]] for a in anns] == ["oak", "pine", "oak"]


def test_the_ap_table_reaches_the_console_and_log_txt(trained, capfd):
    out, results = trained
    log = (out / "log.txt").read_text()
    assert "Point AP on 'own_test_" in log and "| all [0, 100000)" in log
    # The model and the full config went to log.txt only.
    assert "Model:\nP2PNet(" in log and "Running with full config:" in log


def test_the_console_gets_the_table_but_not_the_model(own, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "tools/train_net.py", "--config-file",
           "configs/forest/p2p_R18_s8.yaml", "OUTPUT_DIR", str(tmp_path),
           "DATASETS.POINT_JSONS", repr(((own["names"]["train"], *own["train"]),
                                         (own["names"]["test"], *own["test"]))),
           "DATASETS.TRAIN", f"('{own['names']['train']}',)",
           "DATASETS.TEST", f"('{own['names']['test']}',)", *FAST[:2], *FAST[2:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "Point AP on 'own_test_" in console and "| all [0, 100000)" in console
    assert "MODEL.P2PNET.NUM_CLASSES = 2, from the training dataset" in console
    assert "Model:" not in console and "Running with full config" not in console
    log = (tmp_path / "log.txt").read_text()
    assert "Model:\nP2PNet(" in log and "| all [0, 100000)" in log


def test_run_pipeline_on_the_two_class_json(own, tmp_path, capsys):
    run_pipeline = load_tool("run_pipeline")
    train_json, train_root = own["train"]
    test_json, test_root = own["test"]
    out = tmp_path / "run"
    run_pipeline.main([
        "--output", str(out), "--point-json", "mine", train_json, train_root,
        "--point-json", "mine_test", test_json, test_root, "--train-dataset", "mine",
        "--test-dataset", "mine_test", "--cpr-iters", "2", "--p2p-iters", "2",
        "--num-workers", "0", "--vis-images", "1", "--p2p-opt", "MODEL.P2PNET.NMS_BOX_SIZE",
        "12.0", "SOLVER.BASE_LR", "0.0005"])
    printed = capsys.readouterr().out
    assert "## P2PNet on mine_test" in printed and "| coarse points |" in printed
    for stage in ("p2p_coarse", "p2p_refined", "p2p_centres"):
        config = (out / stage / "config.yaml").read_text()
        assert "NUM_CLASSES: 2" in config and "NMS_BOX_SIZE: 12.0" in config
        assert "BASE_LR: 0.0005" in config
        rows = json.loads((out / stage / "inference" / "mine_test" /
                           "point_predictions.json").read_text())
        assert {r["category_id"] for r in rows} <= {3, 7}
    cpr_config = (out / "cpr" / "config.yaml").read_text()
    assert "NUM_CLASSES: 2" in cpr_config and "BASE_LR: 0.0005" in cpr_config
    assert "NMS_BOX_SIZE: 12.0" not in cpr_config  # a P2PNet-only override
    refined = json.loads((out / "refined.json").read_text())
    assert {a["category_id"] for a in refined["annotations"]} == {3, 7}
    state = json.loads((out / "stages.json").read_text())
    assert state["settings"]["opts"] == ["SOLVER.BASE_LR", "0.0005"]
    # Other overrides in the same directory are other settings: refused.
    with pytest.raises(SystemExit, match="other settings"):
        run_pipeline.main([
            "--output", str(out), "--point-json", "mine", train_json, train_root,
            "--point-json", "mine_test", test_json, test_root, "--train-dataset", "mine",
            "--test-dataset", "mine_test", "--cpr-iters", "2", "--p2p-iters", "2",
            "--num-workers", "0", "--vis-images", "1", "SOLVER.BASE_LR", "0.001"])


@pytest.mark.parametrize("argv, message", [
    (["SOLVER.BASE_LR"], "KEY VALUE pairs"),
    (["OUTPUT_DIR", "x"], "set by the pipeline itself; use --output"),
    (["--p2p-opt", "SEED", "3"], "SEED is set by the pipeline"),
])
def test_run_pipeline_refuses_bad_overrides(argv, message, capsys):
    run_pipeline = load_tool("run_pipeline")
    with pytest.raises(SystemExit):
        run_pipeline.parse_args(argv)
    assert message in capsys.readouterr().err


def test_run_pipeline_names_a_misspelt_key_before_any_stage(tmp_path):
    run_pipeline = load_tool("run_pipeline")
    with pytest.raises(SystemExit, match="SOLVER.BASE_LRR"):
        run_pipeline.main(["--output", str(tmp_path / "x"), "SOLVER.BASE_LRR", "0.1"])
    assert not (tmp_path / "x").exists()
