"""Exported P2PNet (TorchScript, ONNX) and its numpy decoder against the eager model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cpr_d2.engine.predictor import PointPredictor
from cpr_d2.export import P2PNetRaw, decode_params, export_p2pnet
from tests.model_helpers import untrained_cfg
from tests.tool_loader import load_tool

P2P = "configs/forest/p2p_R18_s8.yaml"
DECODER = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "cpr_d2", "export",
                       "p2p_decode.py")


def _decoder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("p2p_decode", DECODER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return PointPredictor(untrained_cfg(P2P, tmp_path_factory.mktemp("export") / "m.pth"))


@pytest.fixture(scope="module")
def images():
    """Two forest_test tiles (BGR) and a crop whose size is no multiple of 32."""
    from detectron2.data import DatasetCatalog

    from cpr_d2.data import image_io

    records = DatasetCatalog.get("forest_test")
    tiles = [image_io.read_image(r["file_name"], format="BGR") for r in records[:2]]
    return tiles + [np.ascontiguousarray(tiles[0][:201, :187])]


def _threshold_in_a_gap(model, image):
    """A score threshold halfway through the widest gap among the 300 best scores of the
    image and its test-time flips: the points it keeps are the same whatever the last
    bits of the scores (an untrained model's scores are all close to its prior)."""
    raw = P2PNetRaw(model).eval()
    d = model.backbone.size_divisibility
    h, w = image.shape[:2]
    axes = {"horizontal": (1,), "vertical": (0,), "both": (0, 1)}
    views = [image] + [np.flip(image, axes[f]) for f in model.test_flips]
    scores = []
    for view in views:
        x = torch.zeros(1, 3, -(-h // d) * d, -(-w // d) * d) + model.pixel_mean
        x[0, :, :h, :w] = torch.as_tensor(view.transpose(2, 0, 1).copy()).float()
        with torch.no_grad():
            logits, _ = raw(x)
        scores.append(logits.sigmoid().flatten().numpy())
    scores = np.sort(np.concatenate(scores))[::-1][:300]
    gaps = scores[:-1] - scores[1:]
    k = int(np.argmax(gaps[20:])) + 20  # keep at least 20 points
    return float((scores[k] + scores[k + 1]) / 2)


def _eager(predictor, image, threshold):
    predictor.model.score_thresh = threshold
    inst = predictor(image)
    return inst.pred_points.numpy(), inst.scores.numpy(), inst.pred_classes.numpy()


def _decode_views(decoder, run, image, params):
    """decode_views of `image`, the network run on each view by `run` (batch -> logits,
    offsets as numpy)."""
    views = decoder.prepare_views(image, params)
    outputs = [tuple(t[0] for t in run(batch)) for batch, _ in views]
    return decoder.decode_views(outputs, views[0][1], params)


def _raw_numpy(model):
    raw = P2PNetRaw(model).eval()

    def run(batch):
        with torch.no_grad():
            return tuple(t.numpy() for t in raw(torch.from_numpy(batch)))
    return run


def test_numpy_decoding_of_the_raw_outputs_equals_the_model(predictor, images):
    """The forest config predicts with a left-right flip: both views decoded and fused."""
    decoder = _decoder()
    params = decode_params(predictor.cfg, predictor.model)
    assert params["test_flips"] == ["horizontal"]
    for image in images:
        threshold = _threshold_in_a_gap(predictor.model, image)
        points, scores, classes = _eager(predictor, image, threshold)
        got = _decode_views(decoder, _raw_numpy(predictor.model), image,
                            dict(params, score_thresh=threshold))
        assert len(got[0]) == len(points) >= 5  # 20 or more before the NMS
        np.testing.assert_allclose(got[0], points, atol=1e-4)
        np.testing.assert_allclose(got[1], scores, atol=1e-6)
        np.testing.assert_array_equal(got[2], classes)


def test_the_decoder_counts_as_the_model_does(predictor, images):
    """A model with a soft count writes it to p2pnet.json, and p2p_decode.count of the
    decoded scores equals the model's count; without one, count is None."""
    decoder = _decoder()
    model = predictor.model
    assert decode_params(predictor.cfg, model)["count_soft"] is None
    assert decoder.count(np.ones(3), (10, 10), decode_params(predictor.cfg, model)) is None
    model.count_threshold.fill_(0.01)
    model.count_soft.copy_(torch.tensor([300.0, -2e-5]))
    try:
        params = decode_params(predictor.cfg, model)
        assert params["count_soft"] == pytest.approx([300.0, -2e-5])
        image = images[2]
        threshold = _threshold_in_a_gap(model, image)
        model.score_thresh = threshold
        with torch.no_grad():
            expected = model([predictor._input(image)])[0]["count"]
        got = _decode_views(decoder, _raw_numpy(model), image,
                            dict(params, score_thresh=threshold))
        assert decoder.count(got[1], image.shape[:2], params) == expected > 0
    finally:
        model.count_threshold.fill_(-1)
        model.count_soft.copy_(torch.tensor([-1.0, 0.0]))


def test_numpy_decoding_of_one_view_is_decode(predictor, images):
    """Without flips (and for an export written before "test_flips" existed) decode_views
    of the one view is decode; a wrong number of views is refused."""
    decoder = _decoder()
    model = predictor.model
    params = decode_params(predictor.cfg, model)
    run = _raw_numpy(model)
    image = images[2]
    threshold = _threshold_in_a_gap(model, image)
    batch, size = decoder.prepare(image, params)
    logits, offsets = run(batch)
    single = decoder.decode(logits[0], offsets[0], size, dict(params, score_thresh=threshold))
    for one_view in ({**params, "test_flips": []},
                     {k: v for k, v in params.items() if k != "test_flips"}):
        got = decoder.decode_views([(logits[0], offsets[0])], size,
                                   dict(one_view, score_thresh=threshold))
        for a, b in zip(got, single):
            np.testing.assert_array_equal(a, b)
    fused = _decode_views(decoder, run, image, dict(params, score_thresh=threshold))
    assert len(fused[0]) != len(single[0]) or not np.allclose(fused[1], single[1])
    with pytest.raises(ValueError, match="expected the outputs of 2 views"):
        decoder.decode_views([(logits[0], offsets[0])], size, params)


def test_numpy_decoding_votes_as_the_model_does(predictor, images):
    decoder = _decoder()
    model = predictor.model
    # The config's: the module's other tests share the predictor. One view here.
    saved = model.vote_radius, model.test_flips
    try:
        model.vote_radius = 2.0 * model.stride
        model.test_flips = ()
        params = decode_params(predictor.cfg, model)
        assert params["vote_radius"] == 2.0 * model.stride
        raw = P2PNetRaw(model).eval()
        moved = 0
        for image in images:
            threshold = _threshold_in_a_gap(model, image)
            points, scores, classes = _eager(predictor, image, threshold)
            batch, size = decoder.prepare(image, dict(params))
            with torch.no_grad():
                logits, offsets = (t.numpy() for t in raw(torch.from_numpy(batch)))
            got = decoder.decode(logits[0], offsets[0], size, dict(params, score_thresh=threshold))
            unvoted = decoder.decode(logits[0], offsets[0], size,
                                     dict(params, score_thresh=threshold, vote_radius=0.0))
            np.testing.assert_allclose(got[0], points, atol=1e-4)
            np.testing.assert_array_equal(got[2], classes)
            moved += int((np.abs(got[0] - unvoted[0]) > 1e-3).any(axis=1).sum())
        assert moved > 0  # the vote moved some points
        # An export written before the key existed decodes without a vote.
        old = {k: v for k, v in params.items() if k != "vote_radius"}
        np.testing.assert_array_equal(
            decoder.decode(logits[0], offsets[0], size, dict(old, score_thresh=threshold))[0],
            unvoted[0])
    finally:
        model.vote_radius, model.test_flips = saved


def test_torchscript_and_onnx_match_the_eager_model(predictor, images, tmp_path):
    out = tmp_path / "export"
    written = load_tool("export_model").main(load_tool("export_model").parse_args(
        ["--config-file", P2P, "--output", str(out), "MODEL.WEIGHTS", predictor.cfg.MODEL.WEIGHTS,
         "OUTPUT_DIR", str(tmp_path / "run")]))
    assert sorted(os.path.basename(p) for p in written) == [
        "p2p_decode.py", "p2pnet.json", "p2pnet.onnx", "p2pnet.ts"]
    params = json.loads((out / "p2pnet.json").read_text())
    assert params["classes"] == [{"index": 0, "id": 1, "name": "tree"}]
    assert params["vote_radius"] == predictor.model.vote_radius > 0  # the config votes
    decoder = _decoder()
    thresholds, expected = [], []
    for k, image in enumerate(images):
        thresholds.append(_threshold_in_a_gap(predictor.model, image))
        expected.append(_eager(predictor, image, thresholds[-1]))
        np.save(tmp_path / f"image{k}.npy", image)
    # TorchScript, in this process.
    traced = torch.jit.load(str(out / "p2pnet.ts"))

    def run_traced(batch):
        with torch.no_grad():
            return tuple(t.numpy() for t in traced(torch.from_numpy(batch)))
    for image, threshold, (points, scores, classes) in zip(images, thresholds, expected):
        got = _decode_views(decoder, run_traced, image, dict(params, score_thresh=threshold))
        assert len(got[0]) == len(points)
        np.testing.assert_allclose(got[0], points, atol=1e-3)
        np.testing.assert_allclose(got[1], scores, atol=1e-4)
        np.testing.assert_array_equal(got[2], classes)
    # ONNX with onnxruntime, in a process that imports neither torch nor detectron2.
    script = f"""
import json, sys
import numpy as np
import onnxruntime as ort
sys.path.insert(0, {str(out)!r})
import p2p_decode
params = json.load(open({str(out / "p2pnet.json")!r}))
session = ort.InferenceSession({str(out / "p2pnet.onnx")!r}, providers=["CPUExecutionProvider"])
for k, threshold in enumerate({thresholds!r}):
    image = np.load({str(tmp_path)!r} + f"/image{{k}}.npy")
    views = p2p_decode.prepare_views(image, params)
    outputs = [session.run(None, {{"image": batch}}) for batch, _ in views]
    points, scores, classes = p2p_decode.decode_views(
        [(logits[0], offsets[0]) for logits, offsets in outputs], views[0][1],
        dict(params, score_thresh=threshold))
    np.savez({str(tmp_path)!r} + f"/onnx{{k}}.npz", points=points, scores=scores, classes=classes)
assert "torch" not in sys.modules and "detectron2" not in sys.modules
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=str(tmp_path))
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    for k, (points, scores, classes) in enumerate(expected):
        got = np.load(tmp_path / f"onnx{k}.npz")
        assert len(got["points"]) == len(points)
        np.testing.assert_allclose(got["points"], points, atol=1e-3)
        np.testing.assert_allclose(got["scores"], scores, atol=1e-4)
        np.testing.assert_array_equal(got["classes"], classes)


def test_export_refuses_bad_requests(predictor, tmp_path):
    with pytest.raises(ValueError, match="export formats must be among"):
        export_p2pnet(predictor, str(tmp_path), formats=("tflite",))
    blocker = tmp_path / "file"
    blocker.write_text("")
    tool = load_tool("export_model")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        tool.main(tool.parse_args(["--config-file", P2P, "--output", str(blocker),
                                   "MODEL.WEIGHTS", predictor.cfg.MODEL.WEIGHTS]))
    decoder = _decoder()
    with pytest.raises(ValueError, match="expected an H x W x 3 uint8 image"):
        decoder.prepare(np.zeros((4, 4), np.uint8), decode_params(predictor.cfg, predictor.model))
