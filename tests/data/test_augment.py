"""INPUT.POINT_AUG: exact 90-degree rotations, scale jitter, and their config keys.
(That points land on their pixels after each of them is in test_mapper.py.)"""
import numpy as np
import pytest
from detectron2.data import transforms as T

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper
from cpr_d2.data.augment import RandomRot90, RandomScale, Rot90Transform, point_augmentations


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rot90_moves_every_pixel_centre_with_its_pixel(np_rng, k):
    h, w = 5, 7
    image = np_rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    t = Rot90Transform(k, h, w)
    out = t.apply_image(image)
    assert out.shape == ((w, h, 3) if k % 2 else (h, w, 3)) and out.flags["C_CONTIGUOUS"]
    rows, cols = np.mgrid[0:h, 0:w]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    moved = t.apply_coords(centres)
    # Each pixel's centre goes where its value went.
    np.testing.assert_array_equal(out[(moved[:, 1] - 0.5).astype(int), (moved[:, 0] - 0.5).astype(int)],
                                  image[rows.ravel(), cols.ravel()])
    # The corners stay corners (continuous coordinates, no half-pixel shift).
    corners = t.apply_coords([[0, 0], [w, 0], [0, h], [w, h]])
    assert sorted(map(tuple, corners)) == sorted(
        [(0, 0), (out.shape[1], 0), (0, out.shape[0]), (out.shape[1], out.shape[0])])
    np.testing.assert_allclose(t.inverse().apply_coords(moved), centres)
    np.testing.assert_array_equal(t.inverse().apply_image(out), image)


def test_random_rot90_draws_every_rotation():
    np.random.seed(0)
    image = np.zeros((4, 6, 3), np.uint8)
    assert {RandomRot90().get_transform(image).k for _ in range(40)} == {0, 1, 2, 3}


def test_random_scale_stays_in_its_range_and_checks_it():
    np.random.seed(0)
    image = np.zeros((100, 200, 3), np.uint8)
    sizes = [RandomScale(0.5, 2.0).get_transform(image) for _ in range(50)]
    assert all(50 <= t.new_h <= 200 and 100 <= t.new_w <= 400 for t in sizes)
    assert max(t.new_h for t in sizes) - min(t.new_h for t in sizes) > 50  # it does vary
    with pytest.raises(ValueError, match="INPUT.POINT_AUG.SCALE"):
        RandomScale(1.5, 1.0)


def test_config_builds_the_augmentations_in_order():
    cfg = get_cpr_d2_cfg()
    assert point_augmentations(cfg) == ([], [])  # all off by default
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.POINT_AUG.SCALE = (0.8, 1.25)
    cfg.INPUT.POINT_AUG.VFLIP = True
    cfg.INPUT.POINT_AUG.ROT90 = True
    cfg.INPUT.POINT_AUG.BRIGHTNESS = 0.2
    cfg.INPUT.POINT_AUG.SATURATION = 0.1
    augs = PointDatasetMapper(cfg, is_train=True).augmentations.augs
    kinds = [type(a).__name__ for a in augs]
    assert kinds == ["RandomScale", "RandomCrop", "ResizeShortestEdge", "RandomFlip", "RandomFlip",
                     "RandomRot90", "RandomBrightness", "RandomSaturation"]
    assert augs[4].vertical and not augs[4].horizontal
    assert (augs[6].intensity_min, augs[6].intensity_max) == (0.8, 1.2)
    # Never at test time.
    test_kinds = [type(a).__name__ for a in PointDatasetMapper(cfg, is_train=False).augmentations.augs]
    assert test_kinds == ["ResizeShortestEdge"]


@pytest.mark.parametrize("key, value, message", [
    ("SCALE", (0.5,), "SCALE must be"), ("SCALE", (0.0, 1.0), "0 < low <= high"),
    ("BRIGHTNESS", 1.0, "BRIGHTNESS must be in"), ("CONTRAST", -0.1, "CONTRAST must be in")])
def test_bad_values_name_their_key(key, value, message):
    cfg = get_cpr_d2_cfg()
    setattr(cfg.INPUT.POINT_AUG, key, value)
    with pytest.raises(ValueError, match=message):
        point_augmentations(cfg)


def test_colour_jitter_changes_the_image_not_the_points():
    np.random.seed(1)
    image = np.full((8, 8, 3), 100, np.uint8)
    image[2:4, 2:4] = 200
    aug = T.AugmentationList([T.RandomBrightness(0.5, 1.5), T.RandomContrast(0.5, 1.5)])
    inp = T.AugInput(image.copy())
    transforms = aug(inp)
    assert not np.array_equal(inp.image, image)
    np.testing.assert_array_equal(transforms.apply_coords(np.array([[2.5, 3.0]])), [[2.5, 3.0]])
