import json
import math
import os
import random

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import cpr_d2.utils.io
from cpr_d2.data.coarse import (
    RangeGaussian,
    annotation_mask,
    box_points,
    coarse_points_from_coco,
    mask_point,
    parse_noise,
)
from tests.tool_loader import load_tool

make_coarse = load_tool("make_coarse")


def _phi(x):
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def truncated_moments(mu, sigma, lo=-0.5, hi=0.5):
    """Mean and std of N(mu, sigma) truncated to [lo, hi] (textbook formulas)."""
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    z = _Phi(b) - _Phi(a)
    mean = mu + sigma * (_phi(a) - _phi(b)) / z
    var = sigma**2 * (1 + (a * _phi(a) - b * _phi(b)) / z - ((_phi(a) - _phi(b)) / z) ** 2)
    return mean, math.sqrt(var)


def random_boxes(rng, n):
    xy = rng.uniform(0, 500, size=(n, 2))
    wh = rng.uniform(2, 150, size=(n, 2))
    return np.concatenate([xy, wh], axis=1)


def box_offsets(points, boxes):
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    return (points - centre) / boxes[:, 2:]


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, expected",
    [
        ("rg-0-0-0.25-0.25", (0, 0, 0.25, 0.25)),
        ("rg-0-0.25", (0, 0, 0.25, 0.25)),
        ("rg-0.1-0.2-0.3-0.4", (0.1, 0.2, 0.3, 0.4)),
        ("rg--0.1-0.05-0.2-0.3", (-0.1, 0.05, 0.2, 0.3)),
        ("rg-.1-1e-1", (0.1, 0.1, 0.1, 0.1)),
    ],
)
def test_parse_noise(name, expected):
    noise = parse_noise(name)
    assert (noise.mux, noise.muy, noise.sx, noise.sy) == pytest.approx(expected)
    assert parse_noise(noise.name) == noise


@pytest.mark.parametrize(
    "name",
    [
        "",
        "rg",
        "rg-0",
        "rg-0-0-0.25",
        "gauss-0-0.25",
        "rg-0-0-0.25-0.25-1",
        "rg-a-b",
        "rg-0-0",
        "rg-0-0-0-0.25",
        "rg-0--0.25",
        " rg-0-0.25x",
        None,
        0.25,
    ],
)
def test_parse_noise_rejects_bad_names(name):
    with pytest.raises(ValueError, match=r"rg-mux-muy-sx-sy"):
        parse_noise(name)


# ---------------------------------------------------------------- box model


@pytest.mark.parametrize(
    "mux, muy, sx, sy", [(0.1, -0.05, 0.05, 0.08), (0.0, 0.0, 0.25, 0.25), (0.2, -0.3, 0.3, 0.15)]
)
def test_box_model_matches_truncated_gaussian(mux, muy, sx, sy):
    rng = np.random.default_rng(1)
    n = 40000
    boxes = random_boxes(rng, n)
    noise = RangeGaussian(mux, muy, sx, sy)
    points = box_points(boxes, noise, rng.random((n, 2)))
    o = box_offsets(points, boxes)
    for axis, (mu, sigma) in enumerate([(mux, sx), (muy, sy)]):
        mean, std = truncated_moments(mu, sigma)
        # ~6 standard errors of the mean, 3% on the std
        assert abs(o[:, axis].mean() - mean) < 6 * std / math.sqrt(n)
        assert o[:, axis].std() == pytest.approx(std, rel=0.03)
        assert o[:, axis].min() >= -0.5 and o[:, axis].max() <= 0.5
    assert np.all(points >= boxes[:, :2]) and np.all(points <= boxes[:, :2] + boxes[:, 2:])


def test_box_model_is_the_plain_gaussian_when_truncation_is_negligible():
    # at sigma 0.05 the interval edge is 10 sigma away: mean and std are the parameters
    rng = np.random.default_rng(2)
    n = 20000
    boxes = random_boxes(rng, n)
    o = box_offsets(
        box_points(boxes, RangeGaussian(0.1, -0.1, 0.05, 0.04), rng.random((n, 2))), boxes
    )
    assert o.mean(axis=0) == pytest.approx([0.1, -0.1], abs=0.002)
    assert o.std(axis=0) == pytest.approx([0.05, 0.04], rel=0.03)


def test_box_model_extreme_uniforms_stay_inside():
    boxes = np.array([[10.0, 20.0, 7.0, 3.0]] * 4)
    uniforms = np.array(
        [[0.0, 0.0], [np.nextafter(1.0, 0), np.nextafter(1.0, 0)], [0.5, 0.5], [1e-300, 1 - 1e-16]]
    )
    points = box_points(boxes, RangeGaussian(0.45, -0.45, 0.01, 0.01), uniforms)
    assert np.all(np.isfinite(points))
    assert np.all(points >= boxes[:, :2]) and np.all(points <= boxes[:, :2] + boxes[:, 2:])


# ---------------------------------------------------------------- mask model


def test_mask_model_full_box_mask_follows_the_gaussian():
    # a 200x200 box fully covered by its mask: discretisation + jitter add about
    # (1/200)^2/12 to the variance, negligible against sigma^2
    box = [50.0, 30.0, 200.0, 200.0]
    mask = np.ones((200, 200), dtype=bool)
    noise = RangeGaussian(0.1, -0.05, 0.08, 0.06)
    rng = np.random.default_rng(3)
    points = np.array([mask_point(mask, (50, 30), box, noise, rng) for _ in range(8000)])
    o = box_offsets(points, np.array([box] * len(points)))
    assert o.mean(axis=0) == pytest.approx([0.1, -0.05], abs=0.004)
    assert o.std(axis=0) == pytest.approx([0.08, 0.06], rel=0.04)


def test_mask_model_draws_pixels_in_proportion_to_the_density():
    # a 10x10 box with two mask pixels: column 4 (centre 4.5, u = -0.05) on the mean,
    # column 5 (centre 5.5, u = 0.05) one sigma away: weights 1 and exp(-1/2)
    box = [0.0, 0.0, 10.0, 10.0]
    mask = np.zeros((10, 10), dtype=bool)
    mask[4, 4] = mask[4, 5] = True
    noise = RangeGaussian(-0.05, -0.05, 0.1, 0.1)
    rng = np.random.default_rng(4)
    points = np.array([mask_point(mask, (0, 0), box, noise, rng) for _ in range(6000)])
    on_mean = np.mean(np.floor(points[:, 0]) == 4)
    assert on_mean == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.025)
    # the jitter spreads each point over its pixel
    assert set(map(tuple, np.floor(points).astype(int))) == {(4, 4), (5, 4)}
    assert np.ptp(points[:, 0] % 1) > 0.9 and np.ptp(points[:, 1] % 1) > 0.9


def test_mask_model_far_tail_mask_does_not_underflow():
    box = [0.0, 0.0, 100.0, 100.0]
    mask = np.zeros((100, 100), dtype=bool)
    mask[0:3, 0:3] = True  # a corner, ~90 sigma from the mean
    point = mask_point(
        mask, (0, 0), box, RangeGaussian(0, 0, 0.005, 0.005), np.random.default_rng(0)
    )
    assert point is not None and 0 <= point[0] < 3 and 0 <= point[1] < 3
    assert (
        mask_point(np.zeros((5, 5), bool), (0, 0), box, RangeGaussian(), np.random.default_rng(0))
        is None
    )


def _l_shape_coco():
    """One 80x60 image; an L-shaped polygon, an RLE ring and a plain box."""
    height, width = 60, 80
    ring = np.zeros((height, width), dtype=np.uint8)
    ring[10:40, 40:70] = 1
    ring[18:32, 48:62] = 0
    rle = mask_utils.encode(np.asfortranarray(ring))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "images": [{"id": 7, "file_name": "a.png", "height": height, "width": width}],
        "categories": [{"id": 3, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "bbox": [5.0, 5.0, 30.0, 40.0],
                "segmentation": [[5, 5, 15, 5, 15, 35, 35, 35, 35, 45, 5, 45]],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "bbox": [40.0, 10.0, 30.0, 30.0],
                "segmentation": rle,
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 3,
                "bbox": [2.0, 50.0, 20.0, 8.0],
                "iscrowd": 0,
            },
        ],
    }


def _full_mask(ann, height, width):
    seg = ann["segmentation"]
    rle = (
        mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        if isinstance(seg, list)
        else seg
    )
    return mask_utils.decode(rle).astype(bool)


@pytest.mark.parametrize("seed", range(40))
def test_mask_points_lie_on_mask_pixels(seed):
    coco = _l_shape_coco()
    out, report = coarse_points_from_coco(coco, "rg-0-0-0.25-0.25", seed=seed, use_masks=True)
    assert (report.from_mask, report.from_box, report.fallbacks) == (2, 1, 0)
    for ann in out["annotations"][:2]:
        full = _full_mask(ann, 60, 80)
        x, y = ann["point"]
        assert full[int(math.floor(y)), int(math.floor(x))], (ann["id"], x, y)
        bx, by, bw, bh = ann["bbox"]
        assert bx <= x <= bx + bw and by <= y <= by + bh


def test_annotation_mask_crops_to_the_box():
    coco = _l_shape_coco()
    for ann in coco["annotations"][:2]:
        crop, (c0, r0) = annotation_mask(ann["segmentation"], ann["bbox"], (60, 80))
        full = _full_mask(ann, 60, 80)
        x, y, w, h = (int(t) for t in ann["bbox"])
        assert (c0, r0) == (x, y) and crop.shape == (h, w)
        assert np.array_equal(crop, full[y : y + h, x : x + w])


def test_fallbacks_for_empty_masks_and_degenerate_boxes():
    coco = _l_shape_coco()
    coco["annotations"][0]["segmentation"] = [[70, 50, 75, 50, 75, 55, 70, 55]]  # outside its box
    coco["annotations"].append(
        {"id": 9, "image_id": 7, "category_id": 3, "bbox": [10.0, 10.0, 0.0, 4.0]}
    )
    out, report = coarse_points_from_coco(coco, seed=0)
    assert report.empty_mask_ids == [1] and report.degenerate_box_ids == [9]
    assert report.from_mask == 1 and report.from_box == 1 and report.annotations == 4
    by_id = {a["id"]: a["point"] for a in out["annotations"]}
    assert by_id[1] == [20.0, 25.0] and by_id[9] == [10.0, 12.0]
    assert "1 empty masks" in report.summary() and "1 degenerate boxes" in report.summary()


def test_no_masks_option_uses_boxes_only():
    _, report = coarse_points_from_coco(_l_shape_coco(), seed=0, use_masks=False)
    assert (report.from_mask, report.from_box) == (0, 3)


# ---------------------------------------------------------------- seeding and conversion


def _many_boxes_coco(n=300, seed=0):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n)
    return {
        "images": [{"id": 1, "file_name": "x.png", "height": 700, "width": 700}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1000 + i, "image_id": 1, "category_id": 1, "bbox": [float(t) for t in b]}
            for i, b in enumerate(boxes)
        ],
    }


def test_seeding_is_reproducible_per_annotation():
    coco = _many_boxes_coco()
    a, _ = coarse_points_from_coco(coco, seed=5)
    b, _ = coarse_points_from_coco(coco, seed=5)
    c, _ = coarse_points_from_coco(coco, seed=6)
    pa = [x["point"] for x in a["annotations"]]
    assert pa == [x["point"] for x in b["annotations"]]
    pc = [x["point"] for x in c["annotations"]]
    # each annotation has its own stream: the offsets spread as the model says
    boxes = np.array([x["bbox"] for x in a["annotations"]])
    o = box_offsets(np.array(pa), boxes)
    assert o.std(axis=0) == pytest.approx([truncated_moments(0, 0.25)[1]] * 2, rel=0.15)
    assert all(p != q for p, q in zip(pa, pc))
    # the point of an annotation depends on its id, not on the order or on the other annotations
    shuffled = dict(coco, annotations=random.Random(0).sample(coco["annotations"][::2], 150))
    d, _ = coarse_points_from_coco(shuffled, seed=5)
    expected = {x["id"]: x["point"] for x in a["annotations"]}
    assert all(x["point"] == expected[x["id"]] for x in d["annotations"])


def test_conversion_keeps_fields_and_does_not_touch_the_input():
    coco = _l_shape_coco()
    coco["info"] = {"year": 2024}
    coco["annotations"][0]["area"] = 123.0
    coco["annotations"][0]["custom"] = {"k": [1, 2]}
    before = json.dumps(coco, sort_keys=True)
    out, _ = coarse_points_from_coco(coco, seed=0)
    assert json.dumps(coco, sort_keys=True) == before
    assert (
        out["images"] == coco["images"]
        and out["categories"] == coco["categories"]
        and out["info"] == coco["info"]
    )
    for src, dst in zip(coco["annotations"], out["annotations"]):
        assert {k: v for k, v in dst.items() if k != "point"} == src
        assert len(dst["point"]) == 2
    assert out["point_noise"] == {"noise": "rg-0-0-0.25-0.25", "seed": 0, "use_masks": True}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["annotations"][1].pop("bbox"), "annotation id 2 has no 'bbox'"),
        (
            lambda c: c["annotations"][1].update(bbox=[1, 2, 3]),
            "annotation id 2 has a malformed 'bbox'",
        ),
        (lambda c: c["annotations"][2].update(id=1), "duplicate annotation id 1"),
        (lambda c: c["annotations"][0].pop("id"), "annotation #0 has no 'id'"),
        (lambda c: c.pop("annotations"), "no 'annotations' list"),
    ],
)
def test_conversion_errors_name_the_record(mutate, message):
    coco = _l_shape_coco()
    mutate(coco)
    with pytest.raises(ValueError, match=message):
        coarse_points_from_coco(coco, source="in.json")


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        coarse_points_from_coco(_l_shape_coco(), seed=seed)


# ---------------------------------------------------------------- tools/make_coarse.py


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path.read_bytes()


def test_make_coarse_round_trip(tmp_path, capsys):
    src = tmp_path / "coco.json"
    coco = _l_shape_coco()
    coco["annotations"].append(
        {"id": 4, "image_id": 7, "category_id": 3, "bbox": [50.0, 45.0, 25.0, 12.0], "extra": "x"}
    )
    raw = _write(src, coco)
    dst = tmp_path / "out" / "points.json"
    assert make_coarse.main(["--input", str(src), "--output", str(dst), "--seed", "3"]) == 0
    out = json.loads(dst.read_text())
    assert src.read_bytes() == raw
    assert out["images"] == coco["images"] and out["categories"] == coco["categories"]
    for a, b in zip(coco["annotations"], out["annotations"]):
        assert {k: v for k, v in b.items() if k != "point"} == a
        x, y = b["point"]
        bx, by, bw, bh = a["bbox"]
        assert bx <= x <= bx + bw and by <= y <= by + bh
    printed = capsys.readouterr().out
    assert "1 images, 4 annotations" in printed and "2 from masks, 2 from boxes" in printed
    assert "RSV" in printed and "mean |o|" in printed
    # the same call gives the same file; --no-masks gives other points for the masked objects
    again = tmp_path / "again.json"
    make_coarse.main(["--input", str(src), "--output", str(again), "--seed", "3"])
    assert again.read_bytes() == dst.read_bytes()
    boxes_only = tmp_path / "boxes.json"
    make_coarse.main(
        ["--input", str(src), "--output", str(boxes_only), "--seed", "3", "--no-masks"]
    )
    assert json.loads(boxes_only.read_text())["point_noise"]["use_masks"] is False
    assert sorted(os.listdir(tmp_path / "out")) == ["points.json"]


def test_make_coarse_errors_name_file_and_record(tmp_path, capsys):
    src = tmp_path / "coco.json"
    coco = _l_shape_coco()
    del coco["annotations"][2]["bbox"]
    raw = _write(src, coco)
    dst = tmp_path / "points.json"
    assert make_coarse.main(["--input", str(src), "--output", str(dst)]) == 1
    err = capsys.readouterr().err
    assert str(src) in err and "annotation id 3 has no 'bbox'" in err
    assert not dst.exists()
    assert make_coarse.main(["--input", str(src), "--output", str(src)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err and src.read_bytes() == raw
    assert make_coarse.main(["--input", str(src), "--output", str(dst), "--noise", "rg-1"]) == 1
    assert "rg-mux-muy-sx-sy" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert make_coarse.main(["--input", str(bad), "--output", str(dst)]) == 1
    assert str(bad) in capsys.readouterr().err and not dst.exists()


@pytest.mark.parametrize("existing_output", [False, True])
def test_make_coarse_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, existing_output):
    src = tmp_path / "coco.json"
    raw = _write(src, _l_shape_coco())
    dst = tmp_path / "points.json"
    if existing_output:
        dst.write_text('{"old": true}')
    def fsync_fails(fd):  # the bytes are written; making them durable fails
        raise OSError("No space left on device")

    monkeypatch.setattr(cpr_d2.utils.io.os, "fsync", fsync_fails)
    assert make_coarse.main(["--input", str(src), "--output", str(dst)]) == 1
    assert src.read_bytes() == raw
    if existing_output:
        assert json.loads(dst.read_text()) == {"old": True}
    else:
        assert not dst.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["coco.json"] + (["points.json"] if existing_output else [])
    )


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def test_uncompressed_rle_crowd_mask():
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:9, 10:30] = True
    mask[20:25, 12:14] = True
    rle = _uncompressed_rle(mask)
    assert sum(rle["counts"]) == mask.size
    coco = {
        "images": [{"id": 1, "file_name": "c.png", "height": 30, "width": 40}],
        "categories": [{"id": 1, "name": "crowd"}],
        "annotations": [
            {
                "id": s,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 5, 20, 20],
                "iscrowd": 1,
                "segmentation": rle,
            }
            for s in range(1, 101)
        ],
    }
    out, report = coarse_points_from_coco(coco, seed=0)
    assert report.from_mask == 100
    for ann in out["annotations"]:
        x, y = ann["point"]
        assert mask[int(y), int(x)]
