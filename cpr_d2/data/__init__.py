"""Point data: dataset loading and registration, the dataset mapper."""
from .datasets.builtin import BUILTIN_POINT_DATASETS, dataset_files, register_all_builtin
from .datasets.point_coco import (PointJsonError, load_point_json, register_point_coco,
                                  set_outside_image_policy)
from .mapper import PointDatasetMapper, annotations_to_point_instances

register_all_builtin()

__all__ = [
    "BUILTIN_POINT_DATASETS",
    "PointDatasetMapper",
    "PointJsonError",
    "annotations_to_point_instances",
    "dataset_files",
    "load_point_json",
    "register_point_coco",
    "set_outside_image_policy",
]
