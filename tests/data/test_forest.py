import collections
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cpr_d2.data.datasets import forest
from cpr_d2.data.datasets.forest import build_forest, build_voc_fixture

_SPEC = importlib.util.find_spec("deepforest")
pytestmark = pytest.mark.skipif(
    _SPEC is None, reason="deepforest==2.1.0 is not installed (bash tools/setup_env.sh)"
)

# From the DeepForest package's documentation of these files.
EXPECTED = {
    "train": ("2019_YELL_2_528000_4978000_image_crop2", 2299, 2472, 574),
    "test": ("2019_YELL_2_541000_4977000_image_crop", 1249, 1035, 279),
}
REPO = Path(__file__).resolve().parents[2]


def _data_dir():
    return Path(list(_SPEC.submodule_search_locations)[0]) / "data"


def _xml_boxes(stem):
    root = ET.parse(_data_dir() / f"{stem}.xml").getroot()
    return [
        tuple(float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        for o in root.iter("object")
    ]


def _load(split, root):
    json_path, image_root = build_forest(split, root)
    with open(json_path) as f:
        return json.load(f), Path(image_root), Path(json_path)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", params=["train", "test"])
def built(request, cache_root):
    data, image_root, json_path = _load(request.param, cache_root)
    return request.param, data, image_root, json_path


def test_every_tree_is_one_object_in_exactly_one_tile(built):
    split, data, _, _ = built
    stem, _, _, n_trees = EXPECTED[split]
    boxes = _xml_boxes(stem)
    assert len(boxes) == n_trees
    objects = [a for a in data["annotations"] if a["iscrowd"] == 0]
    assert len(objects) == n_trees
    seen = collections.Counter(
        (s[0], s[1], s[0] + s[2], s[1] + s[3]) for s in (a["source_bbox"] for a in objects)
    )
    assert seen == collections.Counter(boxes)
    assert data["categories"] == [{"id": 1, "name": "tree"}]
    assert {a["category_id"] for a in data["annotations"]} == {1}


def test_tiles_cover_the_image_in_near_equal_tiles(built):
    split, data, image_root, _ = built
    stem, width, height, _ = EXPECTED[split]
    images = data["images"]
    cols = sorted({im["tile_origin"][0] for im in images})
    rows = sorted({im["tile_origin"][1] for im in images})
    assert len(images) == len(cols) * len(rows) == {"train": 36, "test": 9}[split]
    widths = {im["tile_origin"][0]: im["width"] for im in images}
    heights = {im["tile_origin"][1]: im["height"] for im in images}
    assert sum(widths.values()) == width and sum(heights.values()) == height
    # contiguous, no overlap
    assert all(cols[k] + widths[cols[k]] == cols[k + 1] for k in range(len(cols) - 1))
    assert all(rows[k] + heights[rows[k]] == rows[k + 1] for k in range(len(rows) - 1))
    for sizes in (widths.values(), heights.values()):
        assert max(sizes) - min(sizes) <= 1 and all(300 <= s <= 500 for s in sizes)
    with Image.open(_data_dir() / f"{stem}.png") as src:
        src = np.asarray(src.convert("RGB"))
    for im in images:
        with Image.open(image_root / im["file_name"]) as tile:
            assert tile.size == (im["width"], im["height"])
        if im["id"] in (1, len(images)):  # first and last tile: same pixels as the source
            x0, y0 = im["tile_origin"]
            with Image.open(image_root / im["file_name"]) as tile:
                assert np.array_equal(
                    np.asarray(tile), src[y0 : y0 + im["height"], x0 : x0 + im["width"]]
                )


def _tile_overlaps(box, images):
    x0, y0, x1, y1 = box
    out = {}
    for im in images:
        tx, ty = im["tile_origin"]
        ox = min(x1, tx + im["width"]) - max(x0, tx)
        oy = min(y1, ty + im["height"]) - max(y0, ty)
        if ox > 0 and oy > 0:
            out[im["id"]] = ox * oy
    return out


def test_border_rule(built):
    # each tree: an object in the tile holding most of its area, an ignore piece in
    # each other tile it overlaps, all clipped to their tile
    split, data, _, _ = built
    stem = EXPECTED[split][0]
    by_tree = collections.defaultdict(list)
    for a in data["annotations"]:
        s = a["source_bbox"]
        by_tree[(s[0], s[1], s[0] + s[2], s[1] + s[3])].append(a)
    images = {im["id"]: im for im in data["images"]}
    n_pieces = 0
    for box in _xml_boxes(stem):
        overlaps = _tile_overlaps(box, data["images"])
        anns = by_tree[box]
        assert sorted(a["image_id"] for a in anns) == sorted(overlaps)
        best = max(overlaps.values())
        [main] = [a for a in anns if a["iscrowd"] == 0]
        assert overlaps[main["image_id"]] == best
        assert main["image_id"] == min(i for i, v in overlaps.items() if v == best)
        for a in anns:
            im = images[a["image_id"]]
            tx, ty = im["tile_origin"]
            x, y, w, h = a["bbox"]
            assert w * h == pytest.approx(overlaps[a["image_id"]])
            assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
            assert max(box[0], tx) == pytest.approx(x + tx) and max(box[1], ty) == pytest.approx(
                y + ty
            )
            area = (box[2] - box[0]) * (box[3] - box[1])
            assert a["visible_fraction"] == pytest.approx(overlaps[a["image_id"]] / area)
        n_pieces += len(anns)
    assert n_pieces == len(data["annotations"])


def test_points_inside_their_true_boxes(built):
    _, data, _, _ = built
    pts = np.array([a["point"] for a in data["annotations"]])
    boxes = np.array([a["bbox"] for a in data["annotations"]])
    assert np.all(pts >= boxes[:, :2]) and np.all(pts <= boxes[:, :2] + boxes[:, 2:])
    assert data["point_noise"] == {"noise": "rg-0-0-0.25-0.25", "seed": 0, "use_masks": False}
    # the points are spread around the centres, not on them
    o = (pts - boxes[:, :2] - boxes[:, 2:] / 2) / boxes[:, 2:]
    assert (
        np.all(np.abs(o) <= 0.5) and 0.15 < o.std() < 0.25 and np.all(np.abs(o.mean(axis=0)) < 0.05)
    )


def test_loadable_with_detectron2(built):
    from detectron2.data.datasets import load_coco_json

    _, data, image_root, json_path = built
    dicts = load_coco_json(str(json_path), str(image_root), extra_annotation_keys=["point"])
    assert len(dicts) == len(data["images"])
    assert sum(len(d["annotations"]) for d in dicts) == len(data["annotations"])
    assert all(os.path.isfile(d["file_name"]) for d in dicts)


def test_cache_is_reused(cache_root, monkeypatch):
    json_path, _ = build_forest("test", cache_root)
    manifest = Path(json_path).parent / "MANIFEST.json"
    stamps = (os.stat(json_path).st_mtime_ns, os.stat(manifest).st_mtime_ns)

    def no_rebuild(*args):
        raise AssertionError("rebuilt a complete cache")

    monkeypatch.setattr(forest, "_build_split", no_rebuild)
    assert build_forest("forest_test", cache_root)[0] == json_path
    assert (os.stat(json_path).st_mtime_ns, os.stat(manifest).st_mtime_ns) == stamps


def test_incomplete_cache_is_rebuilt(tmp_path):
    json_path, image_root = build_forest("test", tmp_path)
    target = Path(json_path).parent
    (target / "MANIFEST.json").unlink()
    (target / "points.json").write_text("{partial")
    json_path2, _ = build_forest("test", tmp_path)
    assert json_path2 == json_path
    assert len(json.loads(Path(json_path).read_text())["images"]) == 9
    assert [p.name for p in target.parent.iterdir()] == ["test"]


def _assert_one_clean_build(root, split):
    version_dir = forest.forest_dir(split, root).parent
    assert sorted(p.name for p in version_dir.iterdir()) == [split]
    data, image_root, _ = _load(split, root)
    assert len(os.listdir(image_root)) == len(data["images"])


def test_concurrent_builders_in_threads(tmp_path, monkeypatch):
    # both threads are made to build at the same time, so both reach the rename
    barrier = threading.Barrier(2, timeout=60)
    real_build = forest._build_split
    builds = []

    def build_together(split, out):
        barrier.wait()
        real_build(split, out)
        builds.append(out)

    monkeypatch.setattr(forest, "_build_split", build_together)
    results, errors = [], []

    def worker():
        try:
            results.append(build_forest("test", tmp_path))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(builds) == 2
    assert results[0] == results[1]
    _assert_one_clean_build(tmp_path, "test")


def test_concurrent_builders_in_processes(tmp_path):
    # two interpreters that wait for each other before building (a file barrier)
    script = textwrap.dedent("""
        import os, sys, time
        from cpr_d2.data.datasets import forest
        root, me, other = sys.argv[1:4]
        real = forest._build_split
        def build_together(split, out):
            open(os.path.join(root, me), "w").close()
            deadline = time.time() + 60
            while not os.path.exists(os.path.join(root, other)) and time.time() < deadline:
                time.sleep(0.01)
            real(split, out)
        forest._build_split = build_together
        print(forest.build_forest("test", os.path.join(root, "cache"))[0])
        print("deepforest" in sys.modules)  # its files are read, the package is never imported
        """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), me, other],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for me, other in (("a.ready", "b.ready"), ("b.ready", "a.ready"))
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    assert outs[0][0].splitlines()[-1] == "False"
    _assert_one_clean_build(tmp_path / "cache", "test")


def test_missing_deepforest_is_a_clear_error(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepforest" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"deepforest.*bash tools/setup_env\.sh"):
        build_forest("train", tmp_path)
    assert not any(tmp_path.rglob("*.json"))


def test_missing_deepforest_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(forest.FOREST_SOURCES, "test", "no_such_image")
    with pytest.raises(FileNotFoundError, match=r"no_such_image\.png.*bash tools/setup_env\.sh"):
        build_forest("test", tmp_path)


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unknown forest split 'val'"):
        build_forest("val", tmp_path)


def test_default_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CPR_D2_CACHE", str(tmp_path))
    assert forest.forest_dir("train").parent.parent == tmp_path / "forest"
    monkeypatch.delenv("CPR_D2_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert (
        forest.forest_dir("train").parent.parent
        == tmp_path / "home" / ".cache" / "cpr_d2" / "forest"
    )


def test_voc_fixture(tmp_path):
    json_path, image_root = build_voc_fixture(tmp_path / "voc", seed=0)
    data = json.loads(Path(json_path).read_text())
    assert len(data["annotations"]) == 19
    assert len(data["categories"]) == 4
    assert {c["name"] for c in data["categories"]} == {"bottle", "chair", "diningtable", "person"}
    [image] = data["images"]
    with Image.open(Path(image_root) / image["file_name"]) as img:
        assert img.size == (image["width"], image["height"]) == (500, 375)
    for ann in data["annotations"]:
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        x, y = ann["point"]
        assert mask[int(math.floor(y)), int(math.floor(x))], ann["id"]
        bx, by, bw, bh = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (bx, by, bx + bw, by + bh)
    again, _ = build_voc_fixture(tmp_path / "voc2", seed=0)
    other, _ = build_voc_fixture(tmp_path / "voc3", seed=1)
    points = [a["point"] for a in data["annotations"]]
    assert [a["point"] for a in json.loads(Path(again).read_text())["annotations"]] == points
    assert [a["point"] for a in json.loads(Path(other).read_text())["annotations"]] != points
