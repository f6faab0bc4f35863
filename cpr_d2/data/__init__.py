"""Point data: dataset loading and registration, the dataset mapper, the resumable
training stream."""
from .datasets.builtin import BUILTIN_POINT_DATASETS, dataset_files, register_all_builtin
from .datasets.point_coco import load_point_json, register_point_coco, register_point_jsons
from .mapper import PointDatasetMapper, annotations_to_point_instances
from .point_json import PointJsonError, read_json
from .samplers import (ResumableTrainingSampler, SeededMapDataset, build_resumable_train_loader,
                       sample_seed, seeded_rng)

register_all_builtin()

__all__ = [
    "BUILTIN_POINT_DATASETS",
    "PointDatasetMapper",
    "PointJsonError",
    "ResumableTrainingSampler",
    "SeededMapDataset",
    "annotations_to_point_instances",
    "build_resumable_train_loader",
    "dataset_files",
    "load_point_json",
    "read_json",
    "register_point_coco",
    "register_point_jsons",
    "sample_seed",
    "seeded_rng",
]
