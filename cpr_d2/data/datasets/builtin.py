"""Datasets registered when cpr_d2 is imported.

Files live under $DETECTRON2_DATASETS (default ./datasets), laid out as the
official CPR release ships them. Nothing is downloaded; a missing file is
reported when the dataset is first used, with the path it was expected at.
The `forest` sets are built on first use from images inside the installed
`deepforest` package (see forest.py).
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..point_json import box_centre
from .point_coco import load_point_json

__all__ = ["BUILTIN_POINT_DATASETS", "dataset_files", "register_all_builtin"]

_COARSE = "noise_rg-0-0-0.25-0.25_1/pseuw16h16"

# name -> (json file, image root, evaluation set?) relative to $DETECTRON2_DATASETS.
# Evaluation sets may be plain COCO jsons: their points are the true box centres.
BUILTIN_POINT_DATASETS = {
    "coco_2017_train_coarse": (
        f"coco/coarse_gen_annotations/{_COARSE}/instances_train2017_coarse.json",
        "coco/train2017", False),
    "coco_2017_val_points": ("coco/annotations/instances_val2017.json", "coco/val2017", True),
    "dota_1024_train_coarse": (
        f"dota/DOTA-split/trainsplit/{_COARSE}/DOTA_train_1024_coarse.json",
        "dota/DOTA-split/trainsplit/images", False),
    "dota_1024_val_points": ("dota/DOTA-split/valsplit/DOTA_val_1024.json",
                             "dota/DOTA-split/valsplit/images", True),
    "seaperson_train_coarse": (
        "tiny_set_v2/anns/release/corner/coarse/noise_rg-0-0.25_1/corner_w640_h640/pseuw16h16/"
        "rgb_train_w640h640ow100oh100_coarse.json",
        "tiny_set_v2/images", False),
    "seaperson_test_points": ("tiny_set_v2/anns/release/rgb_test.json", "tiny_set_v2/images", True),
}

# Built on first use from the NEON images in the deepforest package: name -> split.
# `forest_centres` is the training split with every point moved to its true box
# centre (the localizer's upper bound).
_FOREST_SPLITS = {"forest": "train", "forest_test": "test", "forest_centres": "train"}
_BOX_CENTRE_SETS = {"forest_centres"}

# Dataset-specific evaluation settings, read by the evaluator.
_EVAL_METADATA = {
    "seaperson": dict(size_ranges="tinyperson", max_dets=1000),
}


def datasets_root():
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _builtin_files(name):
    json_rel, image_rel, _ = BUILTIN_POINT_DATASETS[name]
    root = datasets_root()
    return os.path.join(root, json_rel), os.path.join(root, image_rel)


def dataset_files(name):
    """(json file, image root) of a registered point dataset: a builtin (resolved now,
    building `forest` if needed) or one registered with register_point_coco."""
    if name in BUILTIN_POINT_DATASETS:
        return _builtin_files(name)
    if name in _FOREST_SPLITS:
        from .forest import build_forest

        return build_forest(_FOREST_SPLITS[name])
    if name not in DatasetCatalog.list():
        raise KeyError(f"dataset '{name}' is not registered; registered point datasets include "
                       f"{sorted(list(BUILTIN_POINT_DATASETS) + list(_FOREST_SPLITS))}")
    meta = MetadataCatalog.get(name)
    if not (hasattr(meta, "json_file") and hasattr(meta, "image_root")):
        raise ValueError(f"dataset '{name}' has no json_file/image_root in its metadata; "
                         "register it with cpr_d2.data.register_point_coco")
    return meta.json_file, meta.image_root


def _load_builtin(name, evaluation_set):
    json_file, image_root = _builtin_files(name)
    root = datasets_root()
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"dataset '{name}' expects its annotations at {json_file} (DETECTRON2_DATASETS="
            f"{root}); download the CPR release files (see docs/data.md, 'Datasets'), or point "
            "DETECTRON2_DATASETS at the folder that holds them")
    return load_point_json(json_file, image_root, name, box_centre_points=evaluation_set)


def _load_forest(name):
    json_file, image_root = dataset_files(name)
    dicts = load_point_json(json_file, image_root, name)
    if name in _BOX_CENTRE_SETS:
        for record in dicts:
            for ann in record["annotations"]:
                ann["point"] = box_centre(ann["bbox"])  # the loaded true box, XYWH
    return dicts


def register_all_builtin():
    for name, (_, _, evaluation_set) in BUILTIN_POINT_DATASETS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda n=name, e=evaluation_set: _load_builtin(n, e))
        extra = next((v for k, v in _EVAL_METADATA.items() if name.startswith(k)), {})
        MetadataCatalog.get(name).set(evaluator_type="point_ap", **extra)
    for name in _FOREST_SPLITS:
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda n=name: _load_forest(n))
        MetadataCatalog.get(name).set(evaluator_type="point_ap", thing_classes=["tree"])
