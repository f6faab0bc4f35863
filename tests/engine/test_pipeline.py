"""tools/run_pipeline.py end to end on a tiny subset of the forest data (2 images, a few
iterations per stage): every output exists and parses; a second run skips every stage;
a run with other settings in the same directory is refused."""
import json

import pytest
from PIL import Image

from cpr_d2.data.point_json import centres_json, subset_json
from cpr_d2.evaluation.tables import markdown_table
from tests.tool_loader import load_tool

ARGS = ["--subset", "2", "--cpr-iters", "2", "--p2p-iters", "2", "--num-workers", "0",
        "--vis-images", "1"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    run_pipeline = load_tool("run_pipeline")
    run_pipeline.main(["--output", str(out), *ARGS])
    return out, run_pipeline


def test_every_output_exists_and_parses(pipeline_run):
    out, _ = pipeline_run
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["smoke_run"] is True
    assert [r["trained on"] for r in results["localizers"]] == [
        "coarse points", "CPR-refined points", "true box centres"]
    for row in results["localizers"]:
        assert row["AP@0.5"] is not None and 0 <= row["AP@0.5"] <= 100
        assert row["MAE"] is not None
    ranges = {r["range"]: r for r in results["training_points"]}
    assert set(ranges) == {"all", "<12 px", "12-20 px", "20-32 px", ">=32 px", "<20 px",
                           ">=20 px"}
    assert all(0 <= r["worse_%"] <= 100 for r in ranges.values() if r["objects"])
    assert ranges["all"]["objects"] > 0 and ranges["all"]["rsv_coarse"] > 0
    assert {r["stage"] for r in results["stage_seconds"]} == {
        "data", "cpr", "refine", "p2p_coarse", "p2p_refined", "p2p_centres"}
    assert all(r["seconds"] is not None for r in results["stage_seconds"])
    md = (out / "results.md").read_text()
    assert "SMOKE RUN" in md and "| coarse points |" in md and "| all |" in md
    refined = json.loads((out / "refined.json").read_text())
    assert all("coarse_point" in a for a in refined["annotations"] if not a["iscrowd"])
    for stage in ("cpr", "p2p_coarse", "p2p_refined", "p2p_centres"):
        assert (out / stage / "model_final.pth").is_file()
        # Each stage kept only its newest periodic checkpoint (docs/training.md, "Disk").
        assert "CHECKPOINT_MAX_KEEP: 1\n" in (out / stage / "config.yaml").read_text()
    assert len(results["pictures"]) == 2
    for picture in results["pictures"]:
        with Image.open(picture) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_the_localizer_table_shows_the_count_threshold(pipeline_run):
    out, _ = pipeline_run
    results = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    header = "| trained on | AP@0.5 | AP@1 | AP@2 | mAP | MAE | RMSE | count thresh |"
    assert header in md
    for row in results["localizers"]:
        stage = {"coarse points": "p2p_coarse", "CPR-refined points": "p2p_refined",
                 "true box centres": "p2p_centres"}[row["trained on"]]
        metrics = json.loads((out / stage / "inference" / "pipeline_test" /
                              "point_ap_metrics.json").read_text())
        assert row["count threshold"] == metrics.get("count_threshold")
        assert row["count threshold source"] == metrics.get("count_threshold_source")
        value = row["count threshold"]
        cell = "n/a" if value is None else "0" if value == 0 else f"{value:.4f}"
        if metrics.get("count_rule") == "soft":  # the config's rule, when it could be fitted
            cell += ", soft count"
        assert f"| {row['trained on']} |" in md and md.count(f"| {cell} |") >= 1


def test_a_second_run_skips_every_stage(pipeline_run, capsys):
    out, run_pipeline = pipeline_run
    before = (out / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    run_pipeline.main(["--output", str(out), *ARGS])
    printed = capsys.readouterr().out
    assert printed.count("skipped (--force") == 7
    assert (out / "results.json").stat().st_mtime_ns == before


def test_other_settings_in_the_same_directory_are_refused(pipeline_run):
    out, run_pipeline = pipeline_run
    with pytest.raises(SystemExit, match="cpr_iters: 2 -> 3"):
        run_pipeline.main(["--output", str(out), *ARGS[:3], "3", *ARGS[4:]])


def test_bad_stage_name_is_refused(capsys):
    run_pipeline = load_tool("run_pipeline")
    with pytest.raises(SystemExit):
        run_pipeline.parse_args(["--force", "cprr"])
    assert "unknown stage(s) ['cprr']" in capsys.readouterr().err


def test_force_reruns_a_stage_and_its_dependants():
    run_pipeline = load_tool("run_pipeline")
    assert run_pipeline.forced_stages(["refine"]) == {"refine", "p2p_refined", "report"}
    assert run_pipeline.forced_stages(["data"]) == set(run_pipeline.STAGES)
    assert run_pipeline.forced_stages([]) == set()


def test_derived_jsons():
    data = {"images": [{"id": 1}, {"id": 2}, {"id": 3}],
            "annotations": [{"id": 10, "image_id": 1, "point": [1, 1], "bbox": [0, 0, 4, 2]},
                            {"id": 11, "image_id": 3, "point": [5, 5], "true_bbox": [4, 4, 2, 6],
                             "bbox": [0, 0, 16, 16]}]}
    sub = subset_json(data, 2)
    assert [i["id"] for i in sub["images"]] == [1, 2] and [a["id"] for a in sub["annotations"]] == [10]
    centres = centres_json(data)
    assert centres["annotations"][0]["point"] == [2.0, 1.0]
    assert centres["annotations"][1]["point"] == [5.0, 7.0]  # true_bbox, not the pseudo box
    assert centres["annotations"][1]["coarse_point"] == [5, 5]
    assert data["annotations"][0]["point"] == [1, 1]  # the input is not modified
    with pytest.raises(ValueError, match="annotation id 7 has no true box"):
        centres_json({"annotations": [{"id": 7, "point": [1, 1]}]})
    table = markdown_table([{"a": 0.5, "b": None, "c": 12.345}])
    assert table.splitlines() == ["| a | b | c |", "| --- | --- | --- |", "| 0.5000 | - | 12.35 |"]


def refine_command(tmp_path, *extra):
    run_pipeline = load_tool("run_pipeline")
    run = run_pipeline.Run(run_pipeline.parse_args(["--output", str(tmp_path), *ARGS, *extra]))
    run.resolve_sources()
    commands = []
    run.run_cmd = lambda stage, cmd: commands.append((stage, cmd))
    run.stage_refine()
    (stage, cmd), = commands
    assert stage == "refine"
    return run, cmd


def test_folds_make_the_refine_stage_train_its_fold_models(tmp_path):
    run, cmd = refine_command(tmp_path, "--folds", "3")
    assert cmd[cmd.index("--folds") + 1] == "3" and "MODEL.WEIGHTS" not in cmd
    # The fold models train with the cpr stage's schedule and seed.
    assert cmd[cmd.index("SOLVER.MAX_ITER") + 1] == "2" and cmd[cmd.index("SEED") + 1] == "0"
    assert run.settings["folds"] == 3
    assert cmd[cmd.index("--keep-unreliable") + 1] == "agreed"  # safe mode by default
    assert run.settings["keep_unreliable"] == "agreed"
    _, every = refine_command(tmp_path / "every", "--folds", "2", "--keep-unreliable", "refined")
    assert every[every.index("--keep-unreliable") + 1] == "refined"
    with pytest.raises(SystemExit):
        load_tool("run_pipeline").parse_args(["--output", str(tmp_path / "x"), *ARGS,
                                              "--keep-unreliable", "coarse"])
    assert run.crossfit_dir() == str(tmp_path / "cpr" / "refine_export" / "crossfit_3")
    _, plain = refine_command(tmp_path / "one")
    assert "--folds" not in plain and "SOLVER.MAX_ITER" not in plain
    assert "--keep-unreliable" not in plain
    assert plain[plain.index("MODEL.WEIGHTS") + 1] == str(tmp_path / "one" / "cpr" /
                                                          "model_final.pth")


def test_a_run_directory_from_before_folds_counts_as_one_fold(pipeline_run):
    out, run_pipeline = pipeline_run
    state = json.loads((out / "stages.json").read_text())
    assert state["settings"].pop("folds") == 1
    (out / "stages.json").write_text(json.dumps(state))
    run_pipeline.Run(run_pipeline.parse_args(["--output", str(out), *ARGS])).check_settings()
    with pytest.raises(SystemExit, match="folds: 1 -> 2"):
        run_pipeline.Run(run_pipeline.parse_args(["--output", str(out), *ARGS, "--folds", "2"])
                         ).check_settings()
