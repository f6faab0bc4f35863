"""tools/train_net.py and tools/refine_export.py end to end on the forest data (a few iterations)."""
import json

import pytest

from tests.tool_loader import load_tool

CONFIG = "configs/forest/cpr_R18_s8_r2.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpr_train")
    train_net = load_tool("train_net")
    args = train_net.default_argument_parser().parse_args(
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
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", CONFIG, "MODEL.CPR.RADIUSS", "3", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(KeyError, match="command-line override: Non-existent key: MODEL.CPR.RADIUSS"):
        train_net.main(args)
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  CPR:\n    RADIUS_RINGS: 3\n")
    args = train_net.default_argument_parser().parse_args(["--config-file", str(bad)])
    with pytest.raises(KeyError, match=r"bad.yaml: Non-existent config key: MODEL.CPR.RADIUS_RINGS"):
        train_net.main(args)


def test_visualize_cpr_draws_pngs_and_a_trace_gif(trained, tmp_path):
    import numpy as np
    from detectron2.data import DatasetCatalog
    from PIL import Image

    out, _ = trained
    visualize = load_tool("visualize_cpr")
    args = visualize.parse_args(
        ["--config-file", CONFIG, "--dataset", "forest", "--output", str(tmp_path / "vis"),
         "--images", "1", "--checkpoint", str(out / "model_0000001.pth"),
         "--checkpoint", str(out / "model_final.pth"),
         "OUTPUT_DIR", str(tmp_path)])
    written = visualize.main(args)
    record = DatasetCatalog.get("forest")[0]
    png, gif = (tmp_path / "vis" / f"{record['image_id']}_{kind}" for kind in ("refine.png", "trace.gif"))
    assert sorted(written) == sorted([str(png), str(gif)])
    drawn = np.asarray(Image.open(png).convert("RGB"))
    source = np.asarray(Image.open(record["file_name"]).convert("RGB"))
    assert drawn.shape[:2] == (2 * source.shape[0], 2 * source.shape[1])
    resized = np.asarray(Image.fromarray(source).resize(drawn.shape[1::-1]))
    assert np.abs(drawn.astype(int) - resized.astype(int)).mean() > 1  # something was drawn
    assert Image.open(gif).n_frames == 2
