"""tools/demo.py on forest images with untrained tiny models: drawing, image modes, tiling,
bad inputs, CPRNet refinement and a video."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cpr_d2.modeling.p2pnet import point_nms
from tests.model_helpers import untrained_checkpoint
from tests.tool_loader import load_tool, tool_helper

P2P = "configs/forest/p2p_R18_s8.yaml"
CPR = "configs/forest/cpr_R18_s8_r2.yaml"

core = tool_helper("demo_core")  # what tools/demo.py runs once its arguments are parsed


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny CPU runs are faster on one thread, much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo():
    return load_tool("demo")


@pytest.fixture(scope="module")
def p2p_weights(tmp_path_factory):
    return untrained_checkpoint(P2P, tmp_path_factory.mktemp("p2p") / "m.pth")


@pytest.fixture(scope="module")
def cpr_weights(tmp_path_factory):
    return untrained_checkpoint(CPR, tmp_path_factory.mktemp("cpr") / "m.pth")


@pytest.fixture(scope="module")
def forest_image():
    from cpr_d2.data import dataset_files

    _, root = dataset_files("forest_test")
    return os.path.join(root, sorted(os.listdir(root))[0])


@pytest.fixture(scope="module")
def p2p_model(demo, p2p_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("p2p_model")
    args = demo.parse_args(["--config-file", P2P, "MODEL.WEIGHTS", str(p2p_weights),
                            "MODEL.P2PNET.SCORE_THRESH", "0.0", "OUTPUT_DIR", str(out)])
    from cpr_d2.engine import setup_cfg

    cfg = setup_cfg(args, output_subdir="demo")
    return core.PointPredictor(cfg), cfg


def run_p2p(demo, weights, tmp_path, *argv):
    args = demo.parse_args(["--config-file", P2P, "--confidence-threshold", "0.0", *argv,
                            "MODEL.WEIGHTS", str(weights), "MODEL.P2PNET.SCORE_THRESH", "0.0",
                            "OUTPUT_DIR", str(tmp_path / "run")])
    return demo.main(args)


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_parse_args_hands_overrides_after_input_back(demo):
    args = demo.parse_args(["--input", "a.png", "b.png", "MODEL.WEIGHTS", "m.pth", "SEED", "1"])
    assert args.input == ["a.png", "b.png"]
    assert args.opts == ["MODEL.WEIGHTS", "m.pth", "SEED", "1"]


def test_demo_draws_points_on_a_forest_image(demo, p2p_weights, forest_image, tmp_path, capsys):
    written = run_p2p(demo, p2p_weights, tmp_path, "--input", forest_image)
    stem = os.path.splitext(os.path.basename(forest_image))[0]
    expected = str(tmp_path / "run" / "demo" / f"{stem}.png")  # default: OUTPUT_DIR/demo
    assert written == [expected]
    assert f"wrote {expected}" in capsys.readouterr().out
    drawn, source = rgb(expected), rgb(forest_image)
    assert drawn.shape == source.shape
    assert np.abs(drawn - source).mean() > 1  # points were drawn
    assert (drawn == source).all(axis=2).mean() > 0.5  # over the image, in RGB order
    assert not [f for f in os.listdir(tmp_path / "run" / "demo") if f.endswith(".tmp")]


def test_demo_reads_grayscale_rgba_and_palette_images(demo, p2p_weights, forest_image, tmp_path):
    source = Image.open(forest_image).convert("RGB").crop((0, 0, 160, 128))
    folder = tmp_path / "modes"
    folder.mkdir()
    source.convert("L").save(folder / "gray.png")
    rgba = source.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    source.convert("P").save(folder / "palette.png")
    # A few points, so that most of each picture is the image it was drawn over.
    written = run_p2p(demo, p2p_weights, tmp_path, "--input", str(folder / "*.png"),
                      "--output", str(tmp_path / "out"), "MODEL.P2PNET.DETECTIONS_PER_IMAGE", "5")
    assert [os.path.basename(p) for p in written] == ["gray.png", "palette.png", "rgba.png"]
    for path in written:
        assert rgb(path).shape == (128, 160, 3)
    gray, drawn_gray = rgb(folder / "gray.png"), rgb(written[0])
    assert np.abs(drawn_gray - gray).mean() > 1
    # The picture is drawn over the grey image, not the colour one: the pixels no point
    # covers are the grey image's, exactly.
    same_as_gray = (drawn_gray == gray).all(axis=2).mean()
    assert same_as_gray > 0.5
    assert same_as_gray > (drawn_gray == np.asarray(source)).all(axis=2).mean() + 0.3


def test_big_image_is_predicted_in_tiles(demo, p2p_weights, p2p_model, forest_image, tmp_path,
                                         capsys, monkeypatch):
    big = tmp_path / "big.png"
    Image.open(forest_image).crop((0, 0, 256, 200)).save(big)
    results = []

    def recording(*args, **kwargs):
        results.append(predict_large(*args, **kwargs))
        return results[-1]

    predict_large = core.PointPredictor.predict_large
    monkeypatch.setattr(core.PointPredictor, "predict_large", recording)
    written = run_p2p(demo, p2p_weights, tmp_path, "--input", str(big), "--max-size", "160",
                      "--output", str(tmp_path / "out"))
    assert f"{big}: 256x200 px > --max-size 160, predicted in 4 tiles" in capsys.readouterr().out
    assert written == [str(tmp_path / "out" / "big.png")] and rgb(written[0]).shape == (200, 256, 3)

    (tiled,) = results
    points = tiled.pred_points
    assert tiled.image_size == (200, 256)
    assert ((points >= 0) & (points <= torch.tensor([256.0, 200.0]))).all()
    for t in core.tile_grid(200, 256, 160):  # every tile contributed points
        assert (((points[:, 0] >= t.cx0) & (points[:, 0] <= t.cx1)
                 & (points[:, 1] >= t.cy0) & (points[:, 1] <= t.cy1)).any())
    assert len(torch.unique(points, dim=0)) == len(points)
    # No two points of a class closer than the model's NMS allows (no double detections).
    predictor, cfg = p2p_model
    model = predictor.model
    again = point_nms(points, tiled.scores, tiled.pred_classes, model.nms_box_size,
                      model.nms_thresh)
    assert len(again) == len(points)
    # An image that just fits in one tile: exactly the untiled prediction.
    small = np.ascontiguousarray(core.read_image(str(big), cfg.INPUT.FORMAT)[:128, :128])
    whole = predictor(small)
    single = predict_large(predictor, small, tile=128)
    assert len(whole) > 0
    assert torch.equal(single.pred_points, whole.pred_points)
    assert torch.equal(single.scores, whole.scores)


def test_bad_inputs_are_named(demo, p2p_weights, forest_image, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        run_p2p(demo, p2p_weights, tmp_path, "--input", str(missing))
    folder = tmp_path / "in"
    folder.mkdir()
    text = folder / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(ValueError, match="cannot read the image .*notes.png"):
        run_p2p(demo, p2p_weights, tmp_path, "--input", str(text), "--output", str(tmp_path / "o1"))
    assert not (tmp_path / "o1" / "notes.png").exists()
    # In a folder: the bad file is reported and skipped, the others are drawn.
    good = folder / "good.png"
    Image.open(forest_image).save(good)
    with pytest.raises(core.DemoError, match="notes.png") as failure:
        run_p2p(demo, p2p_weights, tmp_path, "--input", str(folder),
                "--output", str(tmp_path / "o2"))
    assert failure.value.written == [str(tmp_path / "o2" / "good.png")]
    assert [p for p, _ in failure.value.failed] == [str(text)]
    assert os.listdir(tmp_path / "o2") == ["good.png"]


def test_output_never_overwrites_an_input(demo, p2p_weights, forest_image, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image = folder / "tile.png"
    Image.open(forest_image).save(image)
    before = image.read_bytes()
    with pytest.raises(ValueError, match="would overwrite the input .*tile.png"):
        run_p2p(demo, p2p_weights, tmp_path, "--input", str(image), "--output", str(folder))
    assert image.read_bytes() == before and os.listdir(folder) == ["tile.png"]


def test_cpr_draws_coarse_to_refined(demo, cpr_weights, forest_image, tmp_path, capsys):
    from detectron2.data import DatasetCatalog

    common = ["MODEL.WEIGHTS", str(cpr_weights), "MODEL.CPR.REFINE_SCORE_THRESH", "0.0",
              "DATASETS.TEST", '("forest_test",)', "OUTPUT_DIR", str(tmp_path / "run")]
    args = demo.parse_args(["--config-file", CPR, "--max-images", "1",
                            "--output", str(tmp_path / "out"), *common])
    written = demo.main(args)
    record = DatasetCatalog.get("forest_test")[0]
    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
    assert written == [str(tmp_path / "out" / f"{stem}.png")]
    drawn, source = rgb(written[0]), rgb(record["file_name"])
    assert drawn.shape == source.shape
    changed = (np.abs(drawn - source).sum(axis=2) > 30).sum()
    assert changed > 20 * len(record["annotations"])  # a mark per point, at least

    # --json/--image-root, an image picked by its file name.
    from cpr_d2.data import dataset_files

    json_file, root = dataset_files("forest_test")
    second = sorted(os.listdir(root))[1]
    args = demo.parse_args(["--config-file", CPR, "--json", json_file, "--image-root", root,
                            "--input", second, "--output", str(tmp_path / "out2"), *common])
    assert demo.main(args) == [str(tmp_path / "out2" / second)]

    # A plain image without points: CPRNet cannot run, the error says what to pass.
    plain = tmp_path / "plain.png"
    Image.open(forest_image).save(plain)
    args = demo.parse_args(["--config-file", CPR, "--input", str(plain), *common])
    with pytest.raises(ValueError, match="plain.png: no point annotations.*--json"):
        demo.main(args)


def test_video_gets_points_on_every_frame(demo, p2p_weights, forest_image, tmp_path):
    import cv2

    frame = cv2.imread(forest_image)[:128, :160]
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (160, 128))
    for k in range(3):
        writer.write(np.roll(frame, 8 * k, axis=1))
    writer.release()
    written = run_p2p(demo, p2p_weights, tmp_path, "--video", str(video),
                      "--output", str(tmp_path / "out"))
    assert written == [str(tmp_path / "out" / "clip_points.mp4")]
    capture = cv2.VideoCapture(written[0])
    frames = []
    while True:
        ok, f = capture.read()
        if not ok:
            break
        frames.append(f)
    capture.release()
    assert len(frames) == 3 and frames[0].shape == (128, 160, 3)
    assert np.abs(frames[0].astype(int) - frame.astype(int)).mean() > 1
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video\n")
    with pytest.raises(ValueError, match="notes.mp4"):
        run_p2p(demo, p2p_weights, tmp_path, "--video", str(not_video))


def test_a_calibrated_model_draws_and_counts_at_its_threshold(demo, forest_image, tmp_path, capsys):
    weights = untrained_checkpoint(P2P, tmp_path / "calibrated.pth")
    state = torch.load(weights, weights_only=False)
    state["model"]["count_threshold"] = torch.tensor(0.0095)
    torch.save(state, weights)
    args = demo.parse_args(["--config-file", P2P, "--input", forest_image, "MODEL.WEIGHTS",
                            str(weights), "MODEL.P2PNET.SCORE_THRESH", "0.0",
                            "OUTPUT_DIR", str(tmp_path / "run")])
    demo.main(args)
    out = capsys.readouterr().out
    assert "the threshold this model chose on its training images" in out
    count = int(re.search(r"wrote .*\.png: (\d+) points scoring >= 0\.0095", out).group(1))
    # The untrained head scores every anchor about 0.01 (the prior): some above, some not.
    assert args.confidence_threshold == pytest.approx(0.0095) and 0 <= count <= 100
    assert "soft count" not in out  # the checkpoint has none
    # An explicit --confidence-threshold wins.
    run_p2p(demo, weights, tmp_path, "--input", forest_image)
    assert "points scoring >= 0" in capsys.readouterr().out


def test_a_model_with_a_soft_count_prints_it(demo, forest_image, tmp_path, capsys):
    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.data.image_io import read_image
    from cpr_d2.engine.predictor import PointPredictor
    from cpr_d2.modeling.postprocess import soft_count

    weights = untrained_checkpoint(P2P, tmp_path / "soft.pth")
    state = torch.load(weights, weights_only=False)
    state["model"]["count_threshold"] = torch.tensor(0.0095)
    state["model"]["count_soft"] = torch.tensor([300.0, -1e-5])
    torch.save(state, weights)
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(P2P)
    cfg.merge_from_list(["MODEL.WEIGHTS", str(weights), "MODEL.P2PNET.SCORE_THRESH", "0.0",
                         "MODEL.P2PNET.NUM_CLASSES", "1"])
    predictor = PointPredictor(cfg)
    assert predictor.soft_count == pytest.approx((300.0, -1e-5))
    image = read_image(forest_image, cfg.INPUT.FORMAT)
    inst = predictor(image)
    height, width = image.shape[:2]
    expected = soft_count(float(inst.scores.sum()), height * width, (300.0, -1e-5))
    assert predictor.count(inst) == expected and expected > 0
    demo.main(demo.parse_args(["--config-file", P2P, "--input", forest_image, "MODEL.WEIGHTS",
                               str(weights), "MODEL.P2PNET.SCORE_THRESH", "0.0",
                               "OUTPUT_DIR", str(tmp_path / "run")]))
    assert f"; soft count {expected}" in capsys.readouterr().out
    # A tiled image gets no soft count (it was fitted on whole training images).
    demo.main(demo.parse_args(["--config-file", P2P, "--input", forest_image, "--max-size",
                               "256", "MODEL.WEIGHTS", str(weights),
                               "MODEL.P2PNET.SCORE_THRESH", "0.0",
                               "OUTPUT_DIR", str(tmp_path / "tiled")]))
    out = capsys.readouterr().out
    assert "predicted in" in out and "soft count" not in out
