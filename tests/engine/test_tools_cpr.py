"""tools/train_net.py and tools/refine_export.py end to end on the forest data (a few iterations)."""
import json
from pathlib import Path

import pytest

from tests.tool_loader import load_tool

CONFIG = "configs/forest/cpr_R18_s8_r2.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpr_train")
    train_net = load_tool("train_net")
    args = train_net.argument_parser().parse_args(
        ["--config-file", CONFIG, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "4",
         "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
         "SOLVER.CHECKPOINT_PERIOD", "2"])
    results = train_net.main(args)
    return out, results


def test_train_net_trains_and_evaluates_cpr(trained):
    out, results = trained
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    cpr = results["cpr"]
    assert cpr["rsv_coarse"] == pytest.approx(0.0456, abs=1e-4)  # the forest coarse points
    assert 0 <= cpr["refined_%"] <= 100 and cpr["rsv_refined"] > 0


def test_refine_export_writes_a_loadable_json(trained, tmp_path, capsys):
    out, _ = trained
    refine_export = load_tool("refine_export")
    output = tmp_path / "refined.json"
    args = refine_export.parse_args(
        ["--config-file", CONFIG, "--dataset", "forest", "--output", str(output),
         "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path),
         "DATALOADER.NUM_WORKERS", "0"])
    refined = refine_export.main(args)
    data = json.loads(output.read_text())
    trees = [a for a in data["annotations"] if not a["iscrowd"]]
    assert len(refined) == len(trees) == 574
    assert all("coarse_point" in a and "refine_score" in a for a in trees)
    assert "refined 574 of 689 annotations" in capsys.readouterr().out


def test_train_net_rejects_unknown_config_keys(tmp_path):
    train_net = load_tool("train_net")
    args = train_net.argument_parser().parse_args(
        ["--config-file", CONFIG, "MODEL.CPR.RADIUSS", "3", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(KeyError, match="command-line override: Non-existent key: MODEL.CPR.RADIUSS"):
        train_net.main(args)
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  CPR:\n    RADIUS_RINGS: 3\n")
    args = train_net.argument_parser().parse_args(["--config-file", str(bad)])
    with pytest.raises(KeyError, match=r"bad.yaml: Non-existent config key: MODEL.CPR.RADIUS_RINGS"):
        train_net.main(args)


def test_visualize_cpr_draws_pngs_and_a_trace_gif(trained, tmp_path):
    import numpy as np
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    from cpr_d2.utils.visualizer import PointVisualizer

    out, _ = trained
    visualize = load_tool("visualize_cpr")
    args = visualize.parse_args(
        ["--config-file", CONFIG, "--dataset", "forest", "--output", str(tmp_path / "vis"),
         "--images", "1", "--checkpoint", str(out / "model_0000001.pth"),
         "--checkpoint", str(out / "model_final.pth"),
         "OUTPUT_DIR", str(tmp_path)])
    written = visualize.main(args)
    record = next(r for r in DatasetCatalog.get("forest") if r["annotations"])  # image 1 has none
    png, gif = (tmp_path / "vis" / f"{record['image_id']}_{kind}" for kind in ("refine.png", "trace.gif"))
    assert sorted(written) == sorted([str(png), str(gif)])
    drawn = np.asarray(Image.open(png).convert("RGB"))
    source = np.asarray(Image.open(record["file_name"]).convert("RGB"))
    assert drawn.shape[:2] == (2 * source.shape[0], 2 * source.shape[1])
    blank = PointVisualizer(source, MetadataCatalog.get("forest"), scale=2.0).output.get_image()
    assert (drawn != blank).mean() > 0.01  # arrows and bag scores were drawn over the image
    assert Image.open(gif).n_frames == 2


def test_visualize_cpr_says_when_no_image_has_objects(trained, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    out, _ = trained
    name = "forest_without_trees_for_visualize_cpr"
    records = [dict(r, annotations=[]) for r in DatasetCatalog.get("forest")[:2]]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["tree"])
    try:
        visualize = load_tool("visualize_cpr")
        with pytest.raises(ValueError, match=f"{name}.*no image with an annotated object"):
            visualize.main(visualize.parse_args(
                ["--config-file", CONFIG, "--dataset", name, "--output", str(tmp_path / "vis"),
                 "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", str(out / "model_final.pth")]))
        assert not (tmp_path / "vis").exists()  # nothing half-written
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


ADAPTIVE = "configs/forest/cpr_R18_s8_r2_c128_adaptive.yaml"


def test_adaptive_config_trains_refines_and_draws_its_regions(tmp_path, capsys):
    """The adaptive forest config through train_net, refine_export and visualize_cpr."""
    import numpy as np
    from PIL import Image

    train_net = load_tool("train_net")
    out = tmp_path / "train"
    results = train_net.main(train_net.argument_parser().parse_args(
        ["--config-file", ADAPTIVE, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2",
         "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0"]))
    cpr = results["cpr"]
    assert cpr["rsv_coarse"] == pytest.approx(0.0456, abs=1e-4)
    assert 0 <= cpr["worse_%"] <= 100 and 0 <= cpr["worse_%/<12 px"] <= 100
    weights = ["MODEL.WEIGHTS", str(out / "model_final.pth")]

    refine_export = load_tool("refine_export")
    output = tmp_path / "refined.json"
    refined = refine_export.main(refine_export.parse_args(
        ["--config-file", ADAPTIVE, "--dataset", "forest", "--output", str(output),
         "OUTPUT_DIR", str(tmp_path), "DATALOADER.NUM_WORKERS", "0", *weights]))
    assert len(refined) == 574
    assert "worse" in capsys.readouterr().out  # the share of trees made worse, printed

    visualize = load_tool("visualize_cpr")
    vis_dir = tmp_path / "vis"
    written = visualize.main(visualize.parse_args(
        ["--config-file", ADAPTIVE, "--dataset", "forest", "--output", str(vis_dir),
         "--images", "1", "OUTPUT_DIR", str(tmp_path), *weights]))
    assert len(written) == 1 and Image.open(written[0]).size[0] > 0
    plain = vis_dir / "plain"
    visualize.main(visualize.parse_args(
        ["--config-file", ADAPTIVE, "--dataset", "forest", "--output", str(plain),
         "--images", "1", "OUTPUT_DIR", str(tmp_path), "MODEL.CPR.ADAPTIVE.ENABLED", "False",
         *weights]))
    with_regions = np.asarray(Image.open(written[0]).convert("RGB")).astype(int)
    without = np.asarray(Image.open(plain / Path(written[0]).name).convert("RGB")).astype(int)
    assert with_regions.shape == without.shape and (with_regions != without).any()
