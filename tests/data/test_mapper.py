import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from PIL import Image

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper, load_point_json
from cpr_d2.data.augment import ObjectCrop, PointAugInput, RandomRot90, RandomScale, crop_augmentation

from .helpers import base_json, write_dataset


def blob_image(height, width, points, half=3):
    """An image that is black except for a white square of 2*half px centred on each point."""
    img = np.zeros((height, width, 3), np.uint8)
    for x, y in points:
        img[int(y) - half:int(y) + half, int(x) - half:int(x) + half] = 255
    return img


def centroid_near(image_chw, point, radius=12):
    """Centroid of the bright pixels within `radius` of `point` (pixel centres at k + 0.5)."""
    img = image_chw.float().mean(0).numpy()
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]] + 0.5
    near = (np.abs(xs - point[0]) < radius) & (np.abs(ys - point[1]) < radius)
    w = img * near
    return np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


TRANSFORMS = {
    "resize": [T.Resize((133, 171))],
    "shortest edge": [T.ResizeShortestEdge(97, 500)],
    "flip": [T.RandomFlip(prob=1.0)],
    "vflip": [T.RandomFlip(prob=1.0, horizontal=False, vertical=True)],
    "crop": [T.RandomCrop("absolute", (70, 90))],
    "crop+resize+flip": [T.RandomCrop("relative", (0.8, 0.8)), T.ResizeShortestEdge(150, 400),
                         T.RandomFlip(prob=1.0)],
    # INPUT.POINT_AUG (cpr_d2/data/augment.py); four calls draw several rotations.
    "rot90": [RandomRot90()],
    "scale": [RandomScale(0.7, 1.4)],
    "object crop": [ObjectCrop("absolute", (80, 90), 1.0)],
    "scale+object crop+flip": [RandomScale(0.8, 1.25), ObjectCrop("absolute", (90, 80), 0.5),
                               T.RandomFlip(prob=1.0)],
    "scale+crop+rot90+colour": [RandomScale(0.8, 1.25), T.RandomCrop("absolute", (90, 80)),
                                RandomRot90(), T.RandomBrightness(0.8, 1.2),
                                T.RandomContrast(0.8, 1.2), T.RandomSaturation(0.8, 1.2)],
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_points_move_with_the_pixels(tmp_path, name):
    # Blobs centred on pixel corners: a point p sits at the centre of the blob
    # [p - 3, p + 3), whose bright-pixel centroid is exactly p.
    points = [(20.0, 15.0), (64.0, 40.0), (100.0, 70.0), (33.0, 77.0)]
    data = base_json()
    data["images"] = [{"id": 1, "file_name": "blobs.png", "height": 100, "width": 120}]
    data["annotations"] = [{"id": k, "image_id": 1, "category_id": 3, "point": list(p)}
                           for k, p in enumerate(points)]
    path, root = write_dataset(tmp_path, data, images=False)
    Image.fromarray(blob_image(100, 120, points)).save(f"{root}/blobs.png")
    record = load_point_json(path, root)[0]
    mapper = PointDatasetMapper(True, augmentations=TRANSFORMS[name], image_format="RGB")
    checked = 0
    for _ in range(4):  # random crops differ per call
        out = mapper(record)
        inst = out["instances"]
        height, width = inst.image_size
        assert (height, width) == tuple(out["image"].shape[1:])
        for p in inst.gt_points.numpy():
            # A blob that a crop edge cuts has a shifted centroid: check only
            # points whose blob (at most 6 px x 2x scale) is wholly on the image.
            if 14 <= p[0] <= width - 14 and 14 <= p[1] <= height - 14:
                np.testing.assert_allclose(centroid_near(out["image"], p), p, atol=0.75)
                checked += 1
    assert checked >= 3


def test_object_crop_holds_the_drawn_point_and_covers_its_windows():
    # One point: every crop of prob 1 holds it, and the crop's corner takes every
    # position whose window holds it (uniformly: each of the 11 x 11 corners is drawn).
    np.random.seed(0)
    image = np.zeros((100, 120, 3), np.uint8)
    aug = ObjectCrop("absolute", (30, 40), 1.0)  # crop h x w = 30 x 40
    corners = []
    for _ in range(3000):
        inp = PointAugInput(image, points=[[50.5, 70.25]])
        crop = aug(inp)  # a CropTransform
        assert (crop.h, crop.w) == (30, 40) and inp.image.shape[:2] == (30, 40)
        x, y = inp.points[0]
        assert 0 <= x <= 40 and 0 <= y <= 30
        corners.append((crop.x0, crop.y0))
    xs, ys = zip(*corners)
    # x0 in [ceil(50.5 - 40), floor(50.5)] = [11, 50]; y0 in [ceil(70.25 - 30), 70] cut to
    # the image: [41, 70].
    assert (min(xs), max(xs), min(ys), max(ys)) == (11, 50, 41, 70)
    counts = np.bincount(np.array(xs) - 11)
    assert len(counts) == 40 and counts.min() > 30  # about 75 each


def test_object_crop_prefers_objects_and_falls_back_to_uniform():
    # A 200 px wide image with its only objects in the left 20 px: 50 px crops of
    # prob 1 always hold one; uniform crops (prob 0, or an image without points) do
    # so about a third of the time (corners 0..150, those <= 20 hold one).
    np.random.seed(1)
    image = np.zeros((50, 200, 3), np.uint8)
    points = [[5.0, 25.0], [15.0, 10.0]]

    def share_holding(aug, pts):
        held = 0
        for _ in range(600):
            inp = PointAugInput(image, points=pts)
            crop = aug(inp)
            held += any(crop.x0 <= x <= crop.x0 + 50 for x, _ in points)
        return held / 600

    assert share_holding(ObjectCrop("absolute", (50, 50), 1.0), points) == 1.0
    assert 0.05 < share_holding(ObjectCrop("absolute", (50, 50), 0.0), points) < 0.25
    assert 0.05 < share_holding(ObjectCrop("absolute", (50, 50), 1.0), None) < 0.25
    half = share_holding(ObjectCrop("absolute", (50, 50), 0.5), points)
    assert 0.45 < half < 0.7  # 0.5 + 0.5 * (21 / 151)


def test_object_crop_config():
    cfg = get_cpr_d2_cfg()
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [20, 20]
    assert type(crop_augmentation(cfg)) is T.RandomCrop  # off by default: detectron2's own
    cfg.INPUT.POINT_AUG.OBJECT_CROP = 0.5
    aug = crop_augmentation(cfg)
    assert isinstance(aug, ObjectCrop) and aug.prob == 0.5
    assert isinstance(PointDatasetMapper(cfg, is_train=True).augmentations.augs[0], ObjectCrop)
    for bad in (-0.1, 1.5):
        cfg.INPUT.POINT_AUG.OBJECT_CROP = bad
        with pytest.raises(ValueError, match="INPUT.POINT_AUG.OBJECT_CROP"):
            crop_augmentation(cfg)


def test_crop_drops_points_and_boxes_that_leave_it(tmp_path):
    path, root = write_dataset(tmp_path)
    record = load_point_json(path, root)[0]
    # Keep the left 30 x 30 px: annotation 10 at (12.5, 8) stays, 11 at (40, 30) leaves;
    # 12 is ignore (iscrowd) and never becomes an instance.
    crop = T.CropTransform(0, 0, 30, 30)

    class FixedCrop(T.Augmentation):
        def get_transform(self, image):
            return crop

    out = PointDatasetMapper(True, augmentations=[FixedCrop()], image_format="BGR")(record)
    inst = out["instances"]
    assert inst.gt_points.tolist() == [[12.5, 8.0]]
    assert inst.gt_classes.tolist() == [1]
    assert inst.gt_ann_index.tolist() == [0]
    assert inst.gt_boxes.tensor.tolist() == [[5.0, 2.0, 25.0, 12.0]]


def test_image_without_objects_and_test_mode(tmp_path):
    path, root = write_dataset(tmp_path)
    empty = load_point_json(path, root)[1]
    out = PointDatasetMapper(True, augmentations=[], image_format="BGR")(empty)
    assert len(out["instances"]) == 0 and out["instances"].gt_points.shape == (0, 2)
    assert out["instances"].gt_boxes.tensor.shape == (0, 4)
    out = PointDatasetMapper(False, augmentations=[], image_format="BGR")(load_point_json(path, root)[0])
    assert "instances" not in out and "annotations" not in out
    out = PointDatasetMapper(False, augmentations=[], image_format="BGR",
                             with_annotations=True)(load_point_json(path, root)[0])
    assert len(out["instances"]) == 2


def test_from_config(tmp_path):
    cfg = get_cpr_d2_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [20, 20]
    mapper = PointDatasetMapper(cfg, is_train=True)
    path, root = write_dataset(tmp_path)
    out = mapper(load_point_json(path, root)[0])
    assert min(out["image"].shape[1:]) == 64
    assert out["image"].dtype == torch.uint8 and out["image"].shape[0] == 3


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_and_palette_images(tmp_path, mode):
    path, root = write_dataset(tmp_path)
    Image.new(mode, (60, 40)).save(f"{root}/a.png")
    out = PointDatasetMapper(True, augmentations=[], image_format="BGR")(load_point_json(path, root)[0])
    assert out["image"].shape == (3, 40, 60)


def test_bad_images_name_the_file_and_record(tmp_path):
    path, root = write_dataset(tmp_path)
    record = load_point_json(path, root)[0]
    mapper = PointDatasetMapper(True, augmentations=[], image_format="BGR")
    with open(f"{root}/a.png", "rb") as f:
        head = f.read(40)
    with open(f"{root}/a.png", "wb") as f:  # truncated
        f.write(head)
    with pytest.raises(ValueError, match=r"cannot read the image of image id 1: .*a.png"):
        mapper(record)
    Image.new("RGB", (61, 40)).save(f"{root}/a.png")
    with pytest.raises(ValueError, match=r"image id 1 .*a.png.*height/width"):
        mapper(record)
    import os
    os.remove(f"{root}/a.png")
    with pytest.raises(FileNotFoundError, match=r"image of image id 1 not found: .*a.png"):
        mapper(record)


def test_size_and_point_limits_fail_before_the_image_is_read(tmp_path, monkeypatch):
    json_file, root = write_dataset(tmp_path)
    record = load_point_json(json_file, root)[0]  # 60 x 40 px, 2 points (+1 ignore)
    mapper = PointDatasetMapper(True, augmentations=[], max_image_pixels=2400,
                                max_points_per_image=2)
    assert len(mapper(record)["instances"]) == 2  # at both limits: fine
    read = []
    monkeypatch.setattr(PointDatasetMapper, "_read_image",
                        lambda self, d: read.append(d) or np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(ValueError, match=r"a.png\): 60 x 40 = 2,400 pixels is more than "
                                         r"INPUT.MAX_IMAGE_PIXELS = 2,399"):
        PointDatasetMapper(True, augmentations=[], max_image_pixels=2399)(record)
    with pytest.raises(ValueError, match=r"2 annotated points is more than "
                                         r"DATASETS.MAX_POINTS_PER_IMAGE = 1"):
        PointDatasetMapper(True, augmentations=[], max_points_per_image=1)(record)
    assert read == []  # refused from the record's size, before reading the image
    # Without annotations (P2PNet inference) the point limit does not apply.
    PointDatasetMapper(False, augmentations=[], max_points_per_image=1)(record)
    cfg = get_cpr_d2_cfg()
    assert PointDatasetMapper(cfg, is_train=True).max_points_per_image == 10_000
    assert PointDatasetMapper(cfg, is_train=True).max_image_pixels == 100_000_000
