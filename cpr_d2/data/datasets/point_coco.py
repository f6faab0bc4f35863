"""Point annotations in COCO-style json, loaded into detectron2 dataset dicts.

The project's point json::

    {"images":      [{"id", "file_name", "height", "width"}, ...],
     "categories":  [{"id", "name"}, ...],
     "annotations": [{"id", "image_id", "category_id",
                      "point": [x, y],              # the (coarse) point
                      "bbox": [x, y, w, h],         # optional TRUE box (evaluation, RSV)
                      "iscrowd": 0 | 1,             # optional
                      "ignore": 0 | 1}, ...]}       # optional, read as iscrowd

`iscrowd` and `ignore` are flags: the json integers 0 and 1 or the booleans
false and true; a missing field is 0. Anything else (a string such as "no", 2,
1.0, null) is an error: a truthy "no" would silently turn an object into a
crowd region.

The official CPR release is read as is: its annotations carry the true box in
`true_bbox`, the coarse point in `point`, and a 16x16 pseudo box around the
point in `bbox` (the point is that box's centre when `point` is absent).

Points are continuous pixel coordinates, origin at the image's top-left
corner (pixel k spans [k, k+1)). A point is on its image when
0 <= x <= width and 0 <= y <= height. Points off their image are counted and
kept, or refused (the `points_outside_image` argument); a json whose every object point
(crowd regions aside) is off its image is always refused: its points are in
another coordinate system.

Each loaded record::

    {"file_name", "image_id", "height", "width",
     "annotations": [{"id", "point": [x, y], "category_id": <contiguous index>,
                      "iscrowd": 0 | 1, "bbox": [...], "bbox_mode": BoxMode.XYWH_ABS,
                      "coarse_point", "refine_score" (when the json has them)}]}
"""
import contextlib
import gc
import json
import logging
import math
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..point_json import PointJsonError, box_centre, read_json, true_box_key

__all__ = [
    "PointJsonError",
    "load_point_json",
    "register_point_coco",
    "register_point_jsons",
]

logger = logging.getLogger(__name__)

OUTSIDE_IMAGE_POLICIES = ("warn", "error")
# Per-annotation fields copied through to the records when present.
_EXTRA_FIELDS = ("coarse_point", "refine_score")


def check_outside_image_policy(policy):
    """`policy` if it is one of OUTSIDE_IMAGE_POLICIES (what loading does with points off
    their image: "warn" counts and keeps them, "error" refuses the dataset)."""
    if policy not in OUTSIDE_IMAGE_POLICIES:
        raise ValueError(
            f"points-outside-image policy must be one of {OUTSIDE_IMAGE_POLICIES}, got {policy!r}")
    return policy


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The annotation flags: 1 makes the annotation a crowd region (not an object).
_FLAG_FIELDS = ("iscrowd", "ignore")


def _flag(value):
    """0 or 1 for the json flags 0, 1, false and true; None for any other value (a
    string, another number, 1.0, null, a list)."""
    if value is True or value is False:
        return int(value)
    if type(value) is int and (value == 0 or value == 1):
        return value
    return None


def _json_text(value):
    """`value` as the json file spells it ("no", null, 2)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: loading creates millions of small
    containers, and the collections they trigger cost more than the loading."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Reader:
    """Checks records of one json file and raises errors that name the record."""

    def __init__(self, json_file):
        self.json_file = json_file

    def fail(self, where, problem, fix):
        raise PointJsonError(f"{self.json_file}: {where}: {problem}; {fix}")

    def list_field(self, data, key):
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, list):
            self.fail("top level", f"'{key}' must be a list of records, got "
                      f"{type(value).__name__ if value is not None else 'nothing'}",
                      "a point json is COCO-style: {'images': [...], 'categories': [...], "
                      "'annotations': [...]}")
        return value

    def field(self, record, key, where, check, expected):
        if not isinstance(record, dict):
            self.fail(where, f"expected a json object, got {type(record).__name__}",
                      "every record must be an object")
        if key not in record:
            self.fail(where, f"missing '{key}'", f"add '{key}' ({expected})")
        value = record[key]
        if not check(value):
            self.fail(where, f"'{key}' must be {expected}, got {value!r}", f"fix '{key}'")
        return value

    def xy(self, value, key, where):
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value))):
            self.fail(where, f"'{key}' must be [x, y] with two finite numbers, got {value!r}",
                      f"fix '{key}' or remove the annotation")
        return [float(value[0]), float(value[1])]

    def box(self, value, key, where):
        if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(map(_is_number, value))
                and value[2] >= 0 and value[3] >= 0):
            self.fail(where, f"'{key}' must be [x, y, w, h] with finite numbers and w, h >= 0, "
                      f"got {value!r}", f"fix '{key}' or remove it")
        return [float(v) for v in value]


def _is_id(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_size(v):
    return _is_id(v) and v > 0


def _read_categories(reader, data):
    categories = reader.list_field(data, "categories")
    if not categories:
        reader.fail("categories", "the list is empty", "list every class as {'id', 'name'}")
    names = {}
    for k, cat in enumerate(categories):
        where = f"categories[{k}]"
        cid = reader.field(cat, "id", where, _is_id, "an int")
        name = reader.field(cat, "name", where, lambda v: isinstance(v, str) and v, "a non-empty string")
        if cid in names:
            reader.fail(where, f"category id {cid} appears twice ('{names[cid]}' and '{name}')",
                        "give every category its own id")
        names[cid] = name
    ids = sorted(names)
    return ids, [names[i] for i in ids]


def _read_images(reader, data, image_root):
    images = reader.list_field(data, "images")
    if not images:
        reader.fail("images", "the list is empty (an empty dataset)",
                    "check that you passed the right json")
    records = {}
    for k, img in enumerate(images):
        where = f"images[{k}]"
        iid = reader.field(img, "id", where, lambda v: _is_id(v) or isinstance(v, str), "an int or string")
        where = f"image id {iid!r}"
        file_name = reader.field(img, "file_name", where, lambda v: isinstance(v, str) and v,
                                 "a non-empty string")
        height = reader.field(img, "height", where, _is_size, "a positive int")
        width = reader.field(img, "width", where, _is_size, "a positive int")
        if iid in records:
            reader.fail(where, "appears twice in 'images'", "give every image its own id")
        records[iid] = {
            "file_name": os.path.join(image_root, file_name),
            "image_id": iid,
            "height": height,
            "width": width,
            "annotations": [],
        }
    return records


class _Invalid(Exception):
    """The fast path found something wrong; the detailed check says what."""


def _annotation_point_and_box(reader, ann, where, box_centre_points):
    """(point, true box or None) of one annotation, with detailed errors."""
    key = true_box_key(ann)
    true_box = reader.box(ann[key], key, where) if key in ann else None
    if "point" in ann:
        return reader.xy(ann["point"], "point", where), true_box
    if key == "true_bbox":  # the official CPR release: the point is its pseudo box's centre
        return box_centre(reader.box(reader.field(ann, "bbox", where, lambda v: True,
                                                  "[x, y, w, h]"), "bbox", where)), true_box
    if box_centre_points and true_box is not None:
        return box_centre(true_box), true_box
    reader.fail(where, "has no 'point'", "add 'point': [x, y], or make coarse points "
                "from boxes with tools/make_coarse.py")


def _check_annotations(reader, annotations, records, id_map, box_centre_points):
    """Validates every annotation in order and raises on the first bad one."""
    cat_ids = sorted(id_map)
    seen_ids = set()
    for k, ann in enumerate(annotations):
        where = f"annotations[{k}]"
        aid = reader.field(ann, "id", where, lambda v: _is_id(v) or isinstance(v, str), "an int or string")
        where = f"annotation id {aid!r}"
        if aid in seen_ids:
            reader.fail(where, "the id appears twice", "give every annotation its own id (refined "
                        "points are matched to annotations by id)")
        seen_ids.add(aid)
        reader.field(ann, "image_id", where, lambda v: v in records, "the id of an image in 'images'")
        reader.field(ann, "category_id", where, lambda v: v in id_map,
                     f"one of the category ids {cat_ids[:20]}{'...' if len(cat_ids) > 20 else ''}")
        for key in _FLAG_FIELDS:
            if key in ann and _flag(ann[key]) is None:
                reader.fail(
                    f"{where} of image id {ann['image_id']!r}",
                    f"'{key}' must be 0 or 1 (or false or true), got {_json_text(ann[key])}",
                    f"write \"{key}\": 0 for an object or \"{key}\": 1 for a crowd region "
                    "(no strings such as \"no\", no null), or leave the field out (0)")
        _annotation_point_and_box(reader, ann, where, box_centre_points)


def _read_annotations_fast(annotations, records, id_map, box_centre_points):
    """[(image id, loaded annotation)] with plain lookups, then vectorised checks.

    Raises on anything unexpected; the caller then runs the detailed check.
    """
    loaded, points, boxes, ids = [], [], [], []
    for ann in annotations:
        iid = ann["image_id"]
        if iid not in records:
            raise _Invalid
        aid = ann["id"]
        if not isinstance(aid, (int, str)) or isinstance(aid, bool):
            raise _Invalid
        key = true_box_key(ann)
        true_box = ann.get(key)
        if key == "true_bbox" and true_box is None:
            raise _Invalid
        point = ann.get("point")
        if point is None:
            if key == "true_bbox":  # the official CPR release
                point = box_centre(ann["bbox"])
            elif box_centre_points and true_box is not None:
                point = box_centre(true_box)
            else:
                raise _Invalid
        crowd, ignore = _flag(ann.get("iscrowd", 0)), _flag(ann.get("ignore", 0))
        if crowd is None or ignore is None:
            raise _Invalid
        out = {
            "id": aid,
            "point": [float(point[0]), float(point[1])],
            "category_id": id_map[ann["category_id"]],
            "iscrowd": crowd | ignore,
        }
        if len(point) != 2:
            raise _Invalid
        points.append(point)
        if true_box is not None:
            out["bbox"] = [float(v) for v in true_box]
            out["bbox_mode"] = BoxMode.XYWH_ABS
            boxes.append(true_box)
        for key in _EXTRA_FIELDS:
            if key in ann:
                out[key] = ann[key]
        ids.append(aid)
        loaded.append((iid, out))
    if len(set(ids)) != len(ids):
        raise _Invalid
    if points and not np.isfinite(np.array(points, dtype=np.float64)).all():
        raise _Invalid
    if boxes:
        b = np.array(boxes, dtype=np.float64)
        if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all() or (b[:, 2:] < 0).any():
            raise _Invalid
    return loaded


def _refuse_all_points_outside(json_file, loaded, records, objects, swapped_inside):
    """Raise for a json none of whose object points is on its image: whatever the
    points-outside-image policy, there is nothing to train or evaluate on."""
    iid, ann = next((iid, ann) for iid, ann in loaded if not ann["iscrowd"])
    aid, point, record = ann["id"], ann["point"], records[iid]
    swapped = ("; here x and y look swapped: swapped, every point would be on its image"
               if swapped_inside == objects else "")
    raise PointJsonError(
        f"{json_file}: all {objects} object points lie outside their image (first: annotation "
        f"id {aid!r} of image id {iid!r} at {point}, the image is {record['width']} x "
        f"{record['height']} (width x height)); no point can be used. Check that 'point' is "
        "[x, y] in pixels of the image the json names (not of a resized or tiled copy, not map "
        "coordinates), x along the width and y along the height, and that the images' width "
        f"and height are right{swapped}")


def load_point_json(json_file, image_root, dataset_name=None, *, box_centre_points=False,
                    points_outside_image="warn"):
    """Load a point json (module docstring) into detectron2 dataset dicts.

    Args:
        json_file: path of the point json.
        image_root: folder that the images' `file_name` are relative to.
        dataset_name: if given, its MetadataCatalog entry gets `thing_classes`,
            `thing_dataset_id_to_contiguous_id`, `json_file` and `image_root`.
        box_centre_points: annotations without a point take their true box's
            centre (evaluation sets in plain COCO format); otherwise such an
            annotation is an error.
        points_outside_image: what to do with points off their image: "warn" (count
            them in a warning, keep them) or "error" (refuse the json). A json whose
            every object point is off its image is refused either way.

    Returns:
        list[dict], one per image, in the json's image order, images without
        annotations included.
    """
    check_outside_image_policy(points_outside_image)
    with _gc_paused():
        return _load_point_json(json_file, image_root, dataset_name, box_centre_points,
                                points_outside_image)


def _load_point_json(json_file, image_root, dataset_name, box_centre_points, outside_policy):
    data = read_json(json_file)
    reader = _Reader(json_file)
    if not isinstance(data, dict):
        reader.fail("top level", f"expected a json object, got {type(data).__name__}",
                    "a point json is COCO-style: {'images', 'categories', 'annotations'}")
    cat_ids, class_names = _read_categories(reader, data)
    id_map = {cid: k for k, cid in enumerate(cat_ids)}
    records = _read_images(reader, data, image_root)
    annotations = reader.list_field(data, "annotations")
    try:
        loaded = _read_annotations_fast(annotations, records, id_map, box_centre_points)
    except (_Invalid, KeyError, TypeError, ValueError, IndexError, AttributeError):
        # Find the first bad record and say what is wrong with it (raises).
        _check_annotations(reader, annotations, records, id_map, box_centre_points)
        raise
    outside = []
    # Object points (crowd regions aside): how many, how many off their image, and how
    # many of those would be on it with x and y swapped.
    objects = objects_outside = swapped_inside = 0
    for (iid, ann) in loaded:
        record = records[iid]
        x, y = ann["point"]
        objects += not ann["iscrowd"]
        if not (0 <= x <= record["width"] and 0 <= y <= record["height"]):
            outside.append((ann["id"], iid, ann["point"]))
            if not ann["iscrowd"]:
                objects_outside += 1
                swapped_inside += 0 <= y <= record["width"] and 0 <= x <= record["height"]
        record["annotations"].append(ann)

    if objects and objects_outside == objects:
        _refuse_all_points_outside(json_file, loaded, records, objects, swapped_inside)
    if outside:
        aid, iid, point = outside[0]
        message = (f"{json_file}: {len(outside)} of {len(annotations)} points lie outside their "
                   f"image (first: annotation id {aid!r} of image id {iid!r} at {point})")
        if outside_policy == "error":
            raise PointJsonError(message + "; fix them, or set DATASETS.POINTS_OUTSIDE_IMAGE "
                                 "to 'warn' to keep them")
        logger.warning(message + "; they are kept (DATASETS.POINTS_OUTSIDE_IMAGE: 'error' "
                       "refuses them)")

    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        meta.set(thing_classes=class_names,
                 thing_dataset_id_to_contiguous_id={cid: k for k, cid in enumerate(cat_ids)})
    logger.info("Loaded %d images, %d point annotations, %d classes from %s", len(records),
                len(annotations), len(class_names), json_file)
    return list(records.values())


def register_point_coco(name, json_file, image_root, *, box_centre_points=False,
                        points_outside_image="warn", **metadata):
    """Register a point json as detectron2 dataset `name` (loaded lazily, on first use);
    `box_centre_points` and `points_outside_image` are load_point_json's."""
    if name in DatasetCatalog.list():
        raise ValueError(f"dataset '{name}' is already registered; pick another name")
    check_outside_image_policy(points_outside_image)
    DatasetCatalog.register(name, lambda: load_point_json(
        json_file, image_root, name, box_centre_points=box_centre_points,
        points_outside_image=points_outside_image))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                  evaluator_type="point_ap", **metadata)


def register_point_jsons(cfg):
    """Register the point jsons of config `cfg`'s DATASETS.POINT_JSONS, (name, json file,
    image root) triples, with its DATASETS.POINTS_OUTSIDE_IMAGE policy. A name already
    registered with the same files is left alone; with other files it is an error."""
    for k, entry in enumerate(cfg.DATASETS.POINT_JSONS):
        if (not isinstance(entry, (tuple, list)) or len(entry) != 3
                or not all(isinstance(v, str) and v for v in entry)):
            raise ValueError(
                f"DATASETS.POINT_JSONS[{k}] is {entry!r}; each entry must be a (name, json file, "
                "image root) triple of strings, e.g. (('trees', 'trees.json', 'images/'),)")
        name, json_file, image_root = entry
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"DATASETS.POINT_JSONS[{k}] ('{name}'): json file not found: "
                                    f"{json_file}")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"DATASETS.POINT_JSONS[{k}] ('{name}'): image root is not a "
                                    f"directory: {image_root}")
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (getattr(meta, "json_file", None), getattr(meta, "image_root", None)) == (
                    json_file, image_root):
                continue
            raise ValueError(f"DATASETS.POINT_JSONS[{k}]: dataset '{name}' is already registered "
                             "with other files; pick another name")
        register_point_coco(name, json_file, image_root,
                            points_outside_image=cfg.DATASETS.POINTS_OUTSIDE_IMAGE)
