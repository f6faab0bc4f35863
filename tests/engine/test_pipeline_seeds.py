"""tools/run_pipeline.py --seeds: one end-to-end run with seeds 0 and 1 on the tiny setup of
test_pipeline.py (2 images, 2 iterations per stage), checked against each seed's own
outputs; a rerun skips every stage; the settings check covers the seeds; and the tables
over seeds (cpr_d2/evaluation/tables.py, evaluator.py) on constructed values."""
import json
import math
import re

import numpy as np
import pytest

from cpr_d2.evaluation.evaluator import point_ap_dets, point_ap_settings
from cpr_d2.evaluation.tables import (localizer_rows, localizer_table, seeds_localizer_rows,
                                      seeds_training_rows, summarize_seeds)
from tests.engine.test_pipeline import ARGS
from tests.tool_loader import load_tool

SEEDS_ARGS = ["--seeds", "0", "1", *ARGS, "--bootstrap-samples", "200"]
STAGE_OUTPUTS = ("cpr/model_final.pth", "refined.json", "results.md", "results.json",
                 "stages.json", "data/train_coarse.json")
LOCALIZERS = {"p2p_coarse": "coarse points", "p2p_refined": "CPR-refined points",
              "p2p_centres": "true box centres"}


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline_seeds")
    run_pipeline = load_tool("run_pipeline")
    run_pipeline.main(["--output", str(out), *SEEDS_ARGS])
    return out, run_pipeline


def _metrics(out, seed, stage):
    path = out / f"seed_{seed}" / stage / "inference" / "pipeline_test" / "point_ap_metrics.json"
    return json.loads(path.read_text())


def _check_summary(summary, values):
    assert summary["values"] == values
    assert summary["n"] == len(values)
    assert summary["mean"] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-12)
    assert summary["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=1e-12)


def test_seeds_run_writes_every_seed_and_the_table_over_them(seeds_run):
    out, _ = seeds_run
    for seed in (0, 1):
        seed_dir = out / f"seed_{seed}"
        for rel in STAGE_OUTPUTS:
            assert (seed_dir / rel).exists(), f"seed {seed}: {rel} missing"
        for stage in LOCALIZERS:
            assert (seed_dir / stage / "model_final.pth").is_file()
        state = json.loads((seed_dir / "stages.json").read_text())
        assert state["settings"]["seed"] == seed and "seeds" not in state["settings"]
        own = json.loads((seed_dir / "results.json").read_text())
        assert own["meta"]["seed"] == seed
        # The seed's command is the single-seed command that writes this directory.
        assert f"--seed {seed} --output" in own["meta"]["command"]
        assert "--seeds" not in own["meta"]["command"]

    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and set(results["per_seed"]) == {"0", "1"}
    assert results["meta"]["smoke_run"] is True
    for stage, name in LOCALIZERS.items():
        per_seed = [_metrics(out, seed, stage) for seed in (0, 1)]
        for metric in ("AP@0.5", "AP@1", "AP@2", "mAP", "MAE", "RMSE"):
            _check_summary(results["localizers"][name][metric], [m[metric] for m in per_seed])
        for seed, m in zip(("0", "1"), per_seed):
            row = next(r for r in results["per_seed"][seed]["localizers"]
                       if r["trained on"] == name)
            assert row["AP@0.5"] == m["AP@0.5"]
            assert row["count threshold"] == m.get("count_threshold")
    for name, summary in results["training_points"].items():
        rows = [next(r for r in results["per_seed"][s]["training_points"] if r["range"] == name)
                for s in ("0", "1")]
        for key, (new, old) in (("rsv_change_%", ("rsv_refined", "rsv_coarse")),
                                ("dist_change_%", ("dist_refined", "dist_coarse"))):
            if rows[0]["objects"]:
                _check_summary(summary[key], [100 * (r[new] / r[old] - 1) for r in rows])
            else:  # a range without objects has no change
                assert summary[key]["mean"] is None and summary[key]["values"] == [None, None]

    boot = results["bootstrap"]
    assert boot["lower"] <= boot["estimate"] <= boot["upper"]
    assert (boot["num_samples"], boot["seed"], boot["num_images"], boot["seeds"]) == (
        200, 0, 2, [0, 1])
    assert boot["confidence"] == 0.95 and boot["matches_metrics"] is True
    differences = [_metrics(out, s, "p2p_refined")["AP@0.5"]
                   - _metrics(out, s, "p2p_coarse")["AP@0.5"] for s in (0, 1)]
    assert boot["estimate"] == pytest.approx(np.mean(differences), abs=1e-9)
    assert [r["difference"] for r in boot["per_seed"]] == pytest.approx(differences, abs=1e-9)

    md = (out / "results.md").read_text()
    assert "SMOKE RUN" in md and "2 seeds" in md
    assert "| coarse points | 0 |" in md and "| coarse points | 1 |" in md
    assert "| coarse points | mean ± std |" in md and "count thresh" in md
    assert "paired bootstrap" in md and "95% interval" in md
    assert "`seed_0/results.md`" in md and "| cpr |" in md


def test_a_second_seeds_run_skips_every_stage(seeds_run, capsys):
    out, run_pipeline = seeds_run
    paths = [out / "results.json", out / "seed_0" / "results.json", out / "seed_1" / "results.json"]
    before = [p.stat().st_mtime_ns for p in paths]
    capsys.readouterr()
    run_pipeline.main(["--output", str(out), *SEEDS_ARGS])
    printed = capsys.readouterr().out
    assert printed.count("skipped (--force") == 2 * 7 + 1  # every stage of both seeds, the table
    assert [p.stat().st_mtime_ns for p in paths] == before


def test_the_settings_check_covers_the_seeds(seeds_run):
    out, run_pipeline = seeds_run
    with pytest.raises(SystemExit, match=r"seeds: \[0, 1\] -> \[0, 1, 2\]"):
        run_pipeline.main(["--output", str(out), "--seeds", "0", "1", "2", *SEEDS_ARGS[3:]])
    other = [*SEEDS_ARGS]
    other[other.index("--p2p-iters") + 1] = "3"
    with pytest.raises(SystemExit, match="p2p_iters: 2 -> 3"):
        run_pipeline.main(["--output", str(out), *other])
    with pytest.raises(SystemExit, match="holds a --seeds run"):
        run_pipeline.main(["--output", str(out), "--seed", "0", *ARGS])
    # A seed's own directory is a single-seed run: resumable with --seed, not --seeds.
    with pytest.raises(SystemExit, match="holds a single-seed run"):
        run_pipeline.main(["--output", str(out / "seed_0"), *SEEDS_ARGS])


def test_a_seed_directory_with_other_settings_stops_the_run_before_anything_runs(tmp_path):
    run_pipeline = load_tool("run_pipeline")
    (tmp_path / "seed_1").mkdir()
    (tmp_path / "seed_1" / "stages.json").write_text(json.dumps(
        {"settings": {"seed": 1, "cpr_iters": 5}, "stages": {}}))
    with pytest.raises(SystemExit, match=r"seed_1 holds a run with other settings"):
        run_pipeline.main(["--output", str(tmp_path), *SEEDS_ARGS])
    assert not (tmp_path / "seed_0").exists() and not (tmp_path / "stages.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seed", "0", "--seeds", "0", "1"], "--seed 0 and --seeds 0 1 exclude each other"),
    (["--seeds", "0", "1", "--seed", "2"], "pass only one of them"),
    (["--seeds", "3"], "--seeds needs at least two seeds .* use --seed 3"),
    (["--seeds", "0", "1", "0"], r"seed\(s\) \[0\] given more than once"),
    (["--seeds", "0", "1", "--bootstrap-samples", "0"], "--bootstrap-samples must be >= 1"),
])
def test_bad_seed_flags_are_refused(argv, message, capsys):
    run_pipeline = load_tool("run_pipeline")
    with pytest.raises(SystemExit):
        run_pipeline.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_a_single_seed_run_keeps_its_arguments():
    run_pipeline = load_tool("run_pipeline")
    args = run_pipeline.parse_args(["--quick"])
    assert args.seed == 0 and args.seeds is None
    assert run_pipeline.parse_args(["--seed", "4"]).seed == 4


def test_single_seed_argv():
    run_pipeline = load_tool("run_pipeline")
    argv = ["--subset", "2", "--seeds", "0", "1", "--out", "D", "--bootstrap-samples=5", "--quick",
            "--force", "cpr"]
    assert run_pipeline.single_seed_argv(argv, 1, "D/seed_1") == [
        "--subset", "2", "--quick", "--force", "cpr", "--seed", "1", "--output", "D/seed_1"]
    assert run_pipeline.single_seed_argv(["--seeds=3", "--output=E"], 3, "E/seed_3") == [
        "--seed", "3", "--output", "E/seed_3"]


# ----------------------------------------------------------------------------- tables


def _point_ap(ap05, mae=1.0, threshold=None):
    m = {"AP@0.5": ap05, "AP@1": ap05 + 10, "AP@2": ap05 + 20, "mAP": ap05 + 10, "MAE": mae,
         "RMSE": mae * 2}
    if threshold is not None:
        m.update(count_threshold=threshold, count_threshold_source="the model's")
    return m


def test_localizer_table_shows_the_count_threshold_or_na():
    rows = localizer_rows({"coarse points": _point_ap(20.0, threshold=0.37),
                           "CPR-refined points": _point_ap(50.0)})
    assert rows[0]["count threshold"] == 0.37
    assert rows[0]["count threshold source"] == "the model's"
    assert rows[1]["count threshold"] is None and rows[1]["count threshold source"] is None
    lines = localizer_table(rows).splitlines()
    assert lines[0] == "| trained on | AP@0.5 | AP@1 | AP@2 | mAP | MAE | RMSE | count thresh |"
    assert lines[2].endswith("| 0.3700 |") and lines[3].endswith("| n/a |")
    # A model that counts with the soft count says so beside its threshold.
    soft = _point_ap(20.0, threshold=0.37)
    soft["count_rule"] = "soft"
    rows = localizer_rows({"coarse points": soft})
    assert rows[0]["count rule"] == "soft"
    assert localizer_table(rows).splitlines()[2].endswith("| 0.3700, soft count |")


def test_summarize_seeds_keeps_values_that_are_not_numbers():
    out = summarize_seeds({0: {"a": 1.0, "b": None, "c": 2.0}, 1: {"a": 3.0, "b": 4.0}})
    assert out["a"] == {"mean": 2.0, "std": math.sqrt(2), "n": 2, "values": [1.0, 3.0]}
    assert out["b"] == {"mean": None, "std": None, "n": 2, "values": [None, 4.0]}
    assert out["c"] == {"mean": None, "std": None, "n": 2, "values": [2.0, None]}


def test_seeds_localizer_rows():
    rows, summary = seeds_localizer_rows({
        0: {"coarse points": _point_ap(10.0, mae=2.0, threshold=0.5),
            "CPR-refined points": _point_ap(40.0)},
        1: {"coarse points": _point_ap(20.0, mae=4.0, threshold=0.25),
            "CPR-refined points": _point_ap(60.0)}})
    assert [(r["trained on"], r["seed"]) for r in rows] == [
        ("coarse points", 0), ("coarse points", 1), ("coarse points", "mean ± std"),
        ("CPR-refined points", 0), ("CPR-refined points", 1), ("CPR-refined points", "mean ± std")]
    assert rows[0]["count thresh"] == "0.5000" and rows[3]["count thresh"] == "n/a"
    assert rows[2]["AP@0.5"] == f"15.00 ± {math.sqrt(50):.2f}" and rows[2]["MAE"] == "3.00 ± 1.41"
    assert summary["CPR-refined points"]["AP@0.5"] == {
        "mean": 50.0, "std": pytest.approx(math.sqrt(200)), "n": 2, "values": [40.0, 60.0]}


def test_seeds_training_rows():
    def rows(rsv_refined, dist_refined, small):
        return [{"range": "all", "objects": 10, "rsv_coarse": 0.05, "rsv_refined": rsv_refined,
                 "dist_coarse": 0.2, "dist_refined": dist_refined},
                {"range": "<12 px", "objects": 0, "rsv_coarse": small, "rsv_refined": small,
                 "dist_coarse": None, "dist_refined": None}]

    md, summary = seeds_training_rows({0: rows(0.04, 0.18, None), 1: rows(0.045, 0.16, None)})
    rsv = summary["all"]["rsv_change_%"]
    assert rsv["values"] == pytest.approx([-20.0, -10.0]) and rsv["mean"] == pytest.approx(-15.0)
    assert summary["all"]["dist_change_%"]["values"] == pytest.approx([-10.0, -20.0])
    assert summary["all"]["objects"] == 10
    assert summary["<12 px"]["rsv_change_%"]["mean"] is None
    assert md[0]["RSV seed 0"] == "-20.0%" and md[0]["RSV mean ± std"] == "-15.0 ± 7.1%"
    assert md[0]["\\|o\\| seed 1"] == "-20.0%" and md[1]["RSV mean ± std"] == "-"


def test_point_ap_dets_follows_the_dataset_order():
    rows = [{"image_id": 7, "category_id": 0, "point": [1.0, 2.0], "score": 0.5},
            {"image_id": 3, "category_id": 1, "point": [3.0, 4.0], "score": 0.25},
            {"image_id": 7, "category_id": 0, "point": [5.0, 6.0], "score": 0.75}]
    dets = point_ap_dets(rows, [3, 9, 7])
    assert dets[0]["points"].tolist() == [[3.0, 4.0]] and dets[0]["classes"].tolist() == [1]
    assert dets[1]["points"].shape == (0, 2) and dets[1]["scores"].dtype == np.float32
    assert dets[2]["points"].tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert dets[2]["scores"].tolist() == [0.5, 0.75]
    with pytest.raises(ValueError, match="preds.json: row 0 is for image_id 7, which the test"):
        point_ap_dets(rows, [3], "preds.json")


def test_point_ap_settings(tmp_path):
    class Meta:
        size_ranges = "tinyperson"
        max_dets = 1000

    cfg = tmp_path / "config.yaml"
    cfg.write_text("TEST:\n  POINT_AP:\n    SIZE_RANGES: ''\n    MAX_DETS: 0\n    CLEAN: true\n")
    assert point_ap_settings(str(cfg), Meta()) == {"size_range": (1.0, 1e5), "max_dets": 1000,
                                                   "clean": True}
    cfg.write_text("TEST:\n  POINT_AP:\n    SIZE_RANGES: coco\n    MAX_DETS: 50\n")
    assert point_ap_settings(str(cfg), Meta()) == {"size_range": (0.0, 1e5), "max_dets": 50,
                                                   "clean": False}
    assert point_ap_settings(str(tmp_path / "missing.yaml")) == {
        "size_range": (0.0, 1e5), "max_dets": 100, "clean": False}
