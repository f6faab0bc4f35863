"""Training augmentations for overhead and microscope imagery, where an image has no
"up": vertical flips, rotations by multiples of 90 degrees, scale and colour jitter, and
crops placed on objects (INPUT.POINT_AUG). Each moves points exactly with the pixels
under them, in the project's continuous pixel coordinates (docs/method.md, "Coordinate
convention").

Randomness comes from numpy's global generator, which the training stream seeds per
sample (cpr_d2.data.samplers), so a run is reproducible and resumable.
"""
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform

__all__ = ["ObjectCrop", "PointAugInput", "RandomRot90", "RandomScale", "Rot90Transform",
           "crop_augmentation", "point_augmentations"]


class Rot90Transform(Transform):
    """Rotation by k * 90 degrees counter-clockwise (numpy's rot90) of an h x w image.
    A point (x, y) goes to (y, w - x) for k = 1, (w - x, h - y) for k = 2 and
    (h - y, x) for k = 3: exact, with no resampling."""

    def __init__(self, k, h, w):
        super().__init__()
        self._set_attributes(locals())
        self.k = int(k) % 4

    def apply_image(self, img):
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_coords(self, coords):
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        if self.k == 1:
            x, y = y, self.w - x
        elif self.k == 2:
            x, y = self.w - x, self.h - y
        elif self.k == 3:
            x, y = self.h - y, x
        return np.stack([x, y], axis=1)

    def apply_segmentation(self, segmentation):
        return self.apply_image(segmentation)

    def inverse(self):
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(4 - self.k, h, w)


class RandomRot90(T.Augmentation):
    """Rotates by 0, 90, 180 or 270 degrees, each with probability 1/4."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        return Rot90Transform(int(np.random.randint(4)), h, w)


class RandomScale(T.Augmentation):
    """Resizes by a factor drawn uniformly from [low, high] (both axes alike)."""

    def __init__(self, low, high):
        super().__init__()
        if not 0 < low <= high:
            raise ValueError(f"INPUT.POINT_AUG.SCALE must be (low, high) with 0 < low <= high, "
                             f"got ({low}, {high})")
        self.low, self.high = float(low), float(high)

    def get_transform(self, image):
        h, w = image.shape[:2]
        s = np.random.uniform(self.low, self.high)
        return T.ResizeTransform(h, w, max(1, int(round(h * s))), max(1, int(round(w * s))))


class PointAugInput(T.AugInput):
    """An AugInput that carries the annotated points ((N, 2), continuous pixel
    coordinates) along with the image, so that an augmentation can place itself by them
    (:class:`ObjectCrop`); every transform applied moves them with the pixels."""

    def __init__(self, image, *, points=None):
        super().__init__(image)
        self.points = np.asarray([] if points is None else points, np.float64).reshape(-1, 2)

    def transform(self, tfm):
        super().transform(tfm)
        if len(self.points):
            self.points = tfm.apply_coords(self.points.copy())


class ObjectCrop(T.Augmentation):
    """detectron2's RandomCrop, placed on an object with probability `prob`: one of the
    image's annotated points is drawn uniformly, and the crop's corner uniformly among
    the positions whose window holds that point. Otherwise (and on an image without
    points) the corner is uniform over the image, as RandomCrop's. On sparse images this
    shows the model more objects and fewer empty crops per step (on `forest` it made the
    localizer worse: docs/p2pnet.md, "Crops placed on objects")."""

    def __init__(self, crop_type, crop_size, prob):
        super().__init__()
        if not 0 <= prob <= 1:
            raise ValueError(f"INPUT.POINT_AUG.OBJECT_CROP must be a probability in [0, 1] "
                             f"(0 = off), got {prob}")
        self.crop = T.RandomCrop(crop_type, crop_size)
        self.prob = float(prob)

    def get_transform(self, image, points):
        if not (len(points) and np.random.rand() < self.prob):
            return self.crop.get_transform(image)
        h, w = image.shape[:2]
        ch, cw = self.crop.get_crop_size((h, w))  # at most the image's, for every type
        x, y = points[np.random.randint(len(points))]
        return T.CropTransform(self._corner(x, cw, w), self._corner(y, ch, h), cw, ch)

    @staticmethod
    def _corner(p, size, length):
        """A corner c uniform among the integers with c <= p <= c + size, 0 <= c <= length - size
        (a point on the image lies in at least one such window)."""
        lo = max(0, int(np.ceil(p - size)))
        hi = min(length - size, int(np.floor(p)))
        if hi < lo:  # only for a point off the image: the nearest window
            lo = hi = min(lo, length - size)
        return int(np.random.randint(lo, hi + 1))


def _check_intensity(name, value):
    if not 0 <= value < 1:
        raise ValueError(f"INPUT.POINT_AUG.{name} must be in [0, 1) (0 = off; 0.2 draws a "
                         f"factor from [0.8, 1.2]), got {value}")
    return value


def point_augmentations(cfg):
    """(before_crop, after_flip): the INPUT.POINT_AUG augmentations of a training
    mapper, to run before the crop (scale) and after detectron2's flip (vertical flip,
    rotation, colour)."""
    c = cfg.INPUT.POINT_AUG
    before, after = [], []
    scale = tuple(c.SCALE)
    if scale:
        if len(scale) != 2:
            raise ValueError(f"INPUT.POINT_AUG.SCALE must be () or (low, high), got {scale}")
        before.append(RandomScale(*scale))
    if c.VFLIP:
        after.append(T.RandomFlip(0.5, horizontal=False, vertical=True))
    if c.ROT90:
        after.append(RandomRot90())
    for name, aug in (("BRIGHTNESS", T.RandomBrightness), ("CONTRAST", T.RandomContrast),
                      ("SATURATION", T.RandomSaturation)):
        value = _check_intensity(name, float(getattr(c, name)))
        if value:
            after.append(aug(1 - value, 1 + value))
    return before, after


def crop_augmentation(cfg):
    """The training crop (INPUT.CROP): detectron2's RandomCrop, or an :class:`ObjectCrop`
    with INPUT.POINT_AUG.OBJECT_CROP > 0."""
    prob = float(cfg.INPUT.POINT_AUG.OBJECT_CROP)
    if prob == 0:
        return T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE)
    return ObjectCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, prob)  # checks the range
