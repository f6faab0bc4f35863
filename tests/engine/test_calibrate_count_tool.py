"""tools/calibrate_count.py: a trained P2PNet's counting fitted again on named images,
written to a new checkpoint, the trained one untouched."""
import hashlib

import pytest
import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader

from tests.model_helpers import untrained_cfg
from tests.tool_loader import load_tool

P2P = "configs/forest/p2p_R18_s8.yaml"
CPR = "configs/forest/cpr_R18_s4_r4_f128_c64_4x192_disc_hflip.yaml"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = untrained_cfg(P2P, tmp_path_factory.mktemp("calibrate") / "m.pth")
    # Six tiles from the emptiest to nearly the densest: enough for a soft count, quick to
    # predict.
    records = sorted(DatasetCatalog.get("forest"), key=lambda r: len(r["annotations"]))
    subset = records[::6]
    DatasetCatalog.register("calibrate_tool_tiles", lambda: [dict(r) for r in subset])
    yield cfg
    DatasetCatalog.remove("calibrate_tool_tiles")


def run(tmp_path, weights, *argv, config=P2P):
    tool = load_tool("calibrate_count")
    args = tool.parse_args(["--config-file", config, *argv, "MODEL.WEIGHTS", weights,
                            "OUTPUT_DIR", str(tmp_path / "run"),
                            "MODEL.P2PNET.SCORE_THRESH", "0.0"])
    return tool.main(args)


def _sha1(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


def test_it_writes_what_the_training_calibration_would_choose(tmp_path, cfg):
    from cpr_d2.data.mapper import PointDatasetMapper
    from cpr_d2.engine.count_calibration import calibrate_count_threshold
    from cpr_d2.engine.predictor import PointPredictor

    weights, out = cfg.MODEL.WEIGHTS, tmp_path / "recounted.pth"
    before = _sha1(weights)
    threshold, mae, n = run(tmp_path, weights, "--output", str(out),
                            "--datasets", "calibrate_tool_tiles")
    assert n == 6 and _sha1(weights) == before  # the trained checkpoint is never written
    # The reference: the calibration training runs, on the same model and images.
    ref_cfg = cfg.clone()
    ref_cfg.MODEL.P2PNET.SCORE_THRESH = 0.0
    model = PointPredictor(ref_cfg).model
    dicts = DatasetCatalog.get("calibrate_tool_tiles")
    loader = build_detection_test_loader(dicts, mapper=PointDatasetMapper(ref_cfg, is_train=False),
                                         num_workers=0)
    ref = calibrate_count_threshold(model, loader, dicts, soft_fit="inverse")
    assert (threshold, mae, n) == pytest.approx(ref)
    written = torch.load(out, map_location="cpu", weights_only=False)["model"]
    original = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    assert float(written["count_threshold"]) == pytest.approx(ref[0])
    assert written["count_soft"].tolist() == pytest.approx(model.count_soft.tolist())
    assert float(original["count_threshold"]) == -1  # the untrained model had none
    # Every other weight is the trained one.
    assert set(written) == set(original)
    for key in original:
        if key not in ("count_threshold", "count_soft"):
            assert torch.equal(written[key], original[key]), key
    # The written model loads and counts with it.
    loaded_cfg = ref_cfg.clone()
    loaded_cfg.MODEL.WEIGHTS = str(out)
    assert PointPredictor(loaded_cfg).count_threshold == pytest.approx(ref[0])


def test_the_direct_fit_is_taken_from_the_config(tmp_path, cfg):
    out_inverse, out_direct = tmp_path / "inverse.pth", tmp_path / "direct.pth"
    run(tmp_path, cfg.MODEL.WEIGHTS, "--output", str(out_inverse),
        "--datasets", "calibrate_tool_tiles")
    run(tmp_path, cfg.MODEL.WEIGHTS, "--output", str(out_direct),
        "--datasets", "calibrate_tool_tiles", "MODEL.P2PNET.COUNT_SOFT_FIT", "direct")
    inverse, direct = (torch.load(p, map_location="cpu", weights_only=False)["model"]
                       for p in (out_inverse, out_direct))
    assert float(inverse["count_threshold"]) == float(direct["count_threshold"])
    # Both lines can be fitted on these six tiles, and they differ.
    assert inverse["count_soft"][0] > 0 and direct["count_soft"][0] > 0
    assert inverse["count_soft"].tolist() != direct["count_soft"].tolist()


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "forest_test"], "is the config's test set (DATASETS.TEST)"),
    (["--datasets", "no_such_dataset"], "'no_such_dataset' is not a registered dataset"),
])
def test_bad_datasets_are_refused_before_any_work(tmp_path, cfg, argv, message):
    out = tmp_path / "x.pth"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(tmp_path, cfg.MODEL.WEIGHTS, "--output", str(out), *argv)
    assert not out.exists()


def test_the_trained_checkpoint_cannot_be_the_output(tmp_path, cfg):
    before = _sha1(cfg.MODEL.WEIGHTS)
    with pytest.raises(ValueError, match="is MODEL.WEIGHTS, the trained model"):
        run(tmp_path, cfg.MODEL.WEIGHTS, "--output", cfg.MODEL.WEIGHTS,
            "--datasets", "calibrate_tool_tiles")
    assert _sha1(cfg.MODEL.WEIGHTS) == before


def test_a_cpr_config_is_refused(tmp_path, cfg):
    with pytest.raises(ValueError, match="only a P2PNet counts"):
        run(tmp_path, cfg.MODEL.WEIGHTS, "--output", str(tmp_path / "x.pth"), config=CPR)
