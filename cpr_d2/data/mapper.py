"""PointDatasetMapper: reads an image, augments it, and moves its points with it.

Points follow the project's convention (continuous pixel coordinates, origin
at the top-left image corner), which is the one detectron2's transforms use
for box corners: a flip maps x to width - x, a resize scales x by
new_width / width, a crop subtracts its offset. So `transforms.apply_coords`
moves a point exactly with the pixels under it.
"""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from .augment import PointAugInput, crop_augmentation, point_augmentations
from .image_io import ImageReadError, PixelLimitError, check_normalize, read_image

__all__ = ["PointDatasetMapper", "annotations_to_point_instances", "count_objects"]

logger = logging.getLogger(__name__)


def count_objects(annotations):
    """The number of annotated objects of a record's annotations (crowd regions not
    counted); None counts as no annotations."""
    return sum(1 for a in annotations or () if not a.get("iscrowd", 0))


def _annotated_points(annotations):
    """(N, 2) points of the non-crowd annotations that have one (none: (0, 2))."""
    points = [a["point"] for a in annotations or () if not a.get("iscrowd", 0) and "point" in a]
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def _points_on_image(points, height, width):
    return ((points[:, 0] >= 0) & (points[:, 0] <= width)
            & (points[:, 1] >= 0) & (points[:, 1] <= height))


def annotations_to_point_instances(annotations, transforms, image_size):
    """Instances of the non-crowd annotations, moved by `transforms`.

    Fields: gt_points (N, 2) float32, gt_classes (N,) int64, gt_ann_index (N,)
    int64 (position in `annotations`, to map results back to annotation ids),
    and gt_boxes (true boxes, XYXY, clipped to the image) when every kept
    annotation has one. Points that end up off the image (e.g. cropped away)
    are dropped with their boxes.
    """
    height, width = image_size
    keep = [k for k, a in enumerate(annotations) if not a.get("iscrowd", 0)]
    points = np.array([annotations[k]["point"] for k in keep], dtype=np.float64).reshape(-1, 2)
    points = transforms.apply_coords(points) if len(points) else points
    on_image = _points_on_image(points, height, width)
    kept = [k for k, ok in zip(keep, on_image) if ok]

    instances = Instances(image_size)
    instances.gt_points = torch.as_tensor(points[on_image], dtype=torch.float32).reshape(-1, 2)
    instances.gt_classes = torch.tensor([annotations[k]["category_id"] for k in kept], dtype=torch.int64)
    instances.gt_ann_index = torch.tensor(kept, dtype=torch.int64)
    if kept and all("bbox" in annotations[k] for k in kept):
        boxes = np.array([BoxMode.convert(annotations[k]["bbox"], annotations[k]["bbox_mode"],
                                          BoxMode.XYXY_ABS) for k in kept], dtype=np.float64)
        boxes = transforms.apply_box(boxes)
        gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
        gt_boxes.clip(image_size)
        instances.gt_boxes = gt_boxes
    elif not kept:
        instances.gt_boxes = Boxes(torch.zeros(0, 4))
    return instances


class PointDatasetMapper:
    """Maps a point dataset dict to the model's input.

    Output dict: the input's fields plus "image" (C, H, W uint8 tensor in
    `image_format`) and, when `with_annotations`, "instances" (see
    :func:`annotations_to_point_instances`). Images without objects are kept:
    their instances are empty.
    """

    @configurable
    def __init__(self, is_train, *, augmentations, image_format="BGR", with_annotations=None,
                 max_image_pixels=0, max_points_per_image=0, normalize="percentile"):
        """
        Args:
            is_train: training mode (only used for the default of with_annotations).
            augmentations: detectron2 augmentations applied in order.
            image_format: format of the image, as for detectron2's read_image ("BGR",
                "RGB", ...); files are decoded by cpr_d2.data.image_io.read_image.
            with_annotations: attach "instances"; default: is_train. CPRNet's
                refinement (inference on annotated images) needs them.
            max_image_pixels, max_points_per_image: refuse larger images / more
                annotated points with a clear error (0 = no limit;
                INPUT.MAX_IMAGE_PIXELS and DATASETS.MAX_POINTS_PER_IMAGE). The pixel
                limit is checked from the record's height/width and again from the
                file's header, both before the image is decoded.
            normalize: how images of more than 8 bits per sample (16-bit, float) become
                0..255: "percentile" or "range" (INPUT.NORMALIZE; see image_io).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.with_annotations = is_train if with_annotations is None else with_annotations
        self.max_image_pixels = int(max_image_pixels)
        self.max_points_per_image = int(max_points_per_image)
        self.normalize = check_normalize(normalize)
        logger.info("[PointDatasetMapper] augmentations (%s): %s",
                    "train" if is_train else "test", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train=True, with_annotations=None):
        augs = utils.build_augmentation(cfg, is_train)  # resize (+ flip when training)
        if is_train and cfg.INPUT.CROP.ENABLED:
            augs.insert(0, crop_augmentation(cfg))
        if is_train:
            before_crop, after_flip = point_augmentations(cfg)
            augs = before_crop + augs + after_flip
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "with_annotations": with_annotations,
            "max_image_pixels": cfg.INPUT.MAX_IMAGE_PIXELS,
            "max_points_per_image": cfg.DATASETS.MAX_POINTS_PER_IMAGE,
            "normalize": cfg.INPUT.NORMALIZE,
        }

    def _check_limits(self, dataset_dict, height, width):
        where = f"image id {dataset_dict.get('image_id')!r} ({dataset_dict.get('file_name')})"
        if self.max_image_pixels and height * width > self.max_image_pixels:
            raise ValueError(
                f"{where}: {width} x {height} = {height * width:,} pixels is more than "
                f"INPUT.MAX_IMAGE_PIXELS = {self.max_image_pixels:,}; tile the image into "
                "smaller ones, or raise the limit if the machine has the memory (about 30 "
                "bytes per pixel)")
        count = count_objects(dataset_dict.get("annotations"))
        if self.with_annotations and self.max_points_per_image and count > self.max_points_per_image:
            raise ValueError(
                f"{where}: {count:,} annotated points is more than DATASETS.MAX_POINTS_PER_IMAGE"
                f" = {self.max_points_per_image:,}; split the image, or raise the limit if the "
                "machine has the memory (see cpr_d2/config.py)")

    def _read_image(self, dataset_dict):
        file_name = dataset_dict["file_name"]
        image_id = dataset_dict.get("image_id")
        try:
            # The pixel limit is checked from the file's header, before decoding.
            image = read_image(file_name, format=self.image_format,
                               max_pixels=self.max_image_pixels, normalize=self.normalize)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image of image id {image_id!r} not found: {file_name}; "
                "check the dataset's image root") from None
        except PixelLimitError as e:  # names the file, its size, the limit and the key
            raise ValueError(f"image id {image_id!r}: {e}") from None
        except ImageReadError as e:
            raise ValueError(
                f"cannot read the image of image id {image_id!r}: "
                f"{file_name} ({e.reason}); is it a complete image file?") from None
        except Exception as e:  # anything else of the file system or the decoder
            raise ValueError(
                f"cannot read the image of image id {image_id!r}: "
                f"{file_name} ({type(e).__name__}: {e}); is it a complete image file?") from None
        try:
            utils.check_image_size(dataset_dict, image)
        except utils.SizeMismatchError as e:
            raise ValueError(f"image id {dataset_dict.get('image_id')!r} ({file_name}): {e}; fix "
                             "the image's height/width in the json") from None
        return image

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        if "height" in dataset_dict and "width" in dataset_dict:
            self._check_limits(dataset_dict, dataset_dict["height"], dataset_dict["width"])
        image = self._read_image(dataset_dict)
        self._check_limits(dataset_dict, *image.shape[:2])
        annotations = dataset_dict.pop("annotations", None)
        # The annotated points travel with the image, for augmentations that place
        # themselves by them (INPUT.POINT_AUG.OBJECT_CROP).
        aug_input = PointAugInput(image, points=_annotated_points(annotations))
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_size = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.with_annotations:
            dataset_dict["instances"] = annotations_to_point_instances(
                annotations or [], transforms, image_size)
        return dataset_dict
