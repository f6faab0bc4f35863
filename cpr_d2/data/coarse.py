"""Simulated annotator points ("coarse points") drawn from true boxes or masks.

Noise model ``rg-mux-muy-sx-sy`` (the official code's "range gaussian"): the
offset of the annotated point from the true box centre, in box-normalised
units ``u = (x - cx) / w``, ``v = (y - cy) / h``, follows the normal
distribution N((mux, muy), diag(sx, sy)^2) restricted to the object:

* with a mask (COCO polygons or RLE): every mask pixel inside the box gets the
  Gaussian density evaluated at its centre's (u, v); one pixel is drawn with
  probability proportional to it, a U(-0.5, 0.5) jitter is added per axis
  (so the point lies anywhere in that pixel) and the point is clipped to the box;
* without a mask: u and v are drawn independently from the Gaussian truncated
  to [-0.5, 0.5), by exact inverse-CDF sampling (``scipy.stats.truncnorm.ppf``
  of a uniform draw), and the point is ``(cx + u w, cy + v h)``.

Coordinates are continuous pixel coordinates with the origin at the image's
top-left corner: pixel column k spans [k, k + 1) and has its centre at k + 0.5.

Each annotation draws from its own random stream, seeded by ``(seed,
annotation id)``: the same seed gives the same point for an annotation whatever
the order of, or the other annotations in, the file.
"""

import copy
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy.stats import truncnorm

from .point_json import box_centre, true_box, true_box_key

__all__ = [
    "RangeGaussian",
    "parse_noise",
    "annotation_rng",
    "box_points",
    "mask_point",
    "annotation_mask",
    "CoarseReport",
    "coarse_points_from_coco",
]

_NUM = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_NAME_RE = re.compile(rf"^rg-{_NUM}-{_NUM}(?:-{_NUM}-{_NUM})?$")
_NAME_FORMS = (
    "expected 'rg-mux-muy-sx-sy' (e.g. 'rg-0-0-0.25-0.25') or 'rg-mu-sigma' "
    "(both axes, e.g. 'rg-0-0.25'), with sigmas > 0"
)


@dataclass(frozen=True)
class RangeGaussian:
    """Offset distribution N((mux, muy), (sx, sy)) in box-normalised units."""

    mux: float = 0.0
    muy: float = 0.0
    sx: float = 0.25
    sy: float = 0.25

    def __post_init__(self):
        for key in ("mux", "muy", "sx", "sy"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"noise parameter {key} must be finite, got {getattr(self, key)}")
        if self.sx <= 0 or self.sy <= 0:
            raise ValueError(f"noise sigmas must be > 0, got sx={self.sx}, sy={self.sy}")

    @property
    def name(self) -> str:
        return f"rg-{self.mux:g}-{self.muy:g}-{self.sx:g}-{self.sy:g}"

    def log_density(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Unnormalised log density at box-normalised offsets (u, v)."""
        return -0.5 * (((u - self.mux) / self.sx) ** 2 + ((v - self.muy) / self.sy) ** 2)

    def truncated_offsets(self, uniforms: np.ndarray) -> np.ndarray:
        """Map uniforms (N, 2) in [0, 1) to offsets (N, 2) from the per-axis
        Gaussian truncated to [-0.5, 0.5) (inverse CDF: exact sampling)."""
        uniforms = np.asarray(uniforms, dtype=np.float64).reshape(-1, 2)
        mu = np.array([self.mux, self.muy])
        sigma = np.array([self.sx, self.sy])
        a = (-0.5 - mu) / sigma
        b = (0.5 - mu) / sigma
        offsets = truncnorm.ppf(uniforms, a, b, loc=mu, scale=sigma)
        # The interval is half-open; the upper end has probability zero but
        # may come out of the ppf through rounding.
        return np.clip(offsets, -0.5, np.nextafter(0.5, 0.0))


def parse_noise(name) -> RangeGaussian:
    """Parse ``rg-mux-muy-sx-sy`` or the short form ``rg-mu-sigma`` (both axes).

    A ``RangeGaussian`` passes through unchanged; anything else raises ValueError.
    """
    if isinstance(name, RangeGaussian):
        return name
    match = _NAME_RE.match(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"bad noise name {name!r}: {_NAME_FORMS}")
    values = [float(g) for g in match.groups() if g is not None]
    if len(values) == 2:
        mu, sigma = values
        values = [mu, mu, sigma, sigma]
    try:
        return RangeGaussian(*values)
    except ValueError as e:
        raise ValueError(f"bad noise name {name!r}: {e}; {_NAME_FORMS}") from None


def annotation_rng(seed: int, key) -> np.random.Generator:
    """The random stream of one annotation: depends only on ``seed`` and ``key``
    (its id). Non-integer or negative ids are hashed (crc32 of their repr)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)) and key >= 0:
        entropy = [int(seed), 0, int(key)]
    else:
        entropy = [int(seed), 1, zlib.crc32(repr(key).encode())]
    return np.random.default_rng(entropy)


def box_points(boxes: np.ndarray, noise: RangeGaussian, uniforms: np.ndarray) -> np.ndarray:
    """Box-based coarse points.

    Args:
        boxes: (N, 4) true boxes XYWH with w, h > 0.
        noise: the offset distribution.
        uniforms: (N, 2) draws from U[0, 1), one per axis.
    Returns:
        (N, 2) points inside the (closed) boxes.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    offsets = noise.truncated_offsets(uniforms)
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    points = centre + offsets * boxes[:, 2:]
    return np.clip(points, boxes[:, :2], boxes[:, :2] + boxes[:, 2:])


def _box_pixel_range(box, image_hw=None) -> Tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 of the pixels the box overlaps, within the image."""
    x, y, w, h = box
    c0, r0 = math.floor(x), math.floor(y)
    c1, r1 = math.ceil(x + w), math.ceil(y + h)
    if image_hw is not None:
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, image_hw[0]), min(c1, image_hw[1])
    return r0, r1, c0, c1


def annotation_mask(segmentation, box, image_hw=None) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Rasterise a COCO segmentation over the pixels its box overlaps.

    Args:
        segmentation: polygons (list of flat [x0, y0, x1, y1, ...] lists),
            uncompressed RLE ({"size", "counts": list}) or compressed RLE.
        box: the true box XYWH.
        image_hw: (height, width) of the image, used to clip the crop
            (RLE carries its own size).
    Returns:
        (mask, (col0, row0)): a boolean crop and the image pixel of its (0, 0).
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, *rle["size"])
        full = mask_utils.decode(rle).astype(bool)
        r0, r1, c0, c1 = _box_pixel_range(box, full.shape)
        return full[r0 : max(r1, r0), c0 : max(c1, c0)], (c0, r0)
    r0, r1, c0, c1 = _box_pixel_range(box, image_hw)
    height, width = max(r1 - r0, 0), max(c1 - c0, 0)
    polygons = []
    for poly in segmentation:
        poly = np.asarray(poly, dtype=np.float64).reshape(-1)
        if poly.size >= 6 and poly.size % 2 == 0:
            shifted = poly.reshape(-1, 2) - (c0, r0)
            polygons.append(shifted.reshape(-1).tolist())
    if not polygons or height == 0 or width == 0:
        return np.zeros((height, width), dtype=bool), (c0, r0)
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool), (c0, r0)


def mask_point(
    mask: np.ndarray, origin: Tuple[int, int], box, noise: RangeGaussian, rng: np.random.Generator
) -> Optional[np.ndarray]:
    """Mask-based coarse point, or None when the mask has no pixel.

    Args:
        mask: (h, w) boolean crop; its pixel (0, 0) is image pixel ``origin`` = (col, row).
        box: the true box XYWH (w, h > 0).
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    x, y, w, h = (float(t) for t in box)
    u = (origin[0] + cols + 0.5 - (x + w / 2)) / w
    v = (origin[1] + rows + 0.5 - (y + h / 2)) / h
    log_p = noise.log_density(u, v)
    # Shift by the maximum so far-off-centre masks never underflow to all zeros.
    cumulative = np.cumsum(np.exp(log_p - log_p.max()))
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    index = min(index, rows.size - 1)
    jitter = rng.random(2) - 0.5
    point = np.array([origin[0] + cols[index] + 0.5, origin[1] + rows[index] + 0.5]) + jitter
    return np.clip(point, [x, y], [x + w, y + h])


@dataclass
class CoarseReport:
    """What a conversion did, annotation by annotation kind."""

    noise: str
    seed: int
    use_masks: bool
    annotations: int = 0
    from_mask: int = 0
    from_box: int = 0
    # Annotations with a segmentation that is empty inside the box: box centre.
    empty_mask_ids: List = field(default_factory=list)
    # Boxes with w <= 0 or h <= 0: box centre.
    degenerate_box_ids: List = field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        return len(self.empty_mask_ids) + len(self.degenerate_box_ids)

    def summary(self) -> str:
        def ids(values):
            shown = ", ".join(str(v) for v in values[:5])
            return f" (ids {shown}{', ...' if len(values) > 5 else ''})" if values else ""

        return (
            f"noise {self.noise}, seed {self.seed}, masks {'on' if self.use_masks else 'off'}: "
            f"{self.annotations} annotations, {self.from_mask} from masks, "
            f"{self.from_box} from boxes, "
            f"{len(self.empty_mask_ids)} empty masks{ids(self.empty_mask_ids)} and "
            f"{len(self.degenerate_box_ids)} degenerate boxes{ids(self.degenerate_box_ids)} "
            "set to the box centre"
        )


def _record_name(ann, index) -> str:
    return (
        f"annotation id {ann['id']}"
        if isinstance(ann, dict) and "id" in ann
        else f"annotation #{index}"
    )


def _true_box(ann, index, source) -> List[float]:
    key = true_box_key(ann)
    if ann.get(key) is None:
        raise ValueError(f"{source}: {_record_name(ann, index)} has no '{key}' (the true box, XYWH)")
    box = true_box(ann)
    if box is None:
        raise ValueError(
            f"{source}: {_record_name(ann, index)} has a malformed '{key}' {ann.get(key)!r} "
            "(expected 4 finite numbers [x, y, w, h])"
        )
    return box


def _has_segmentation(ann) -> bool:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return "counts" in seg and "size" in seg
    return isinstance(seg, list) and len(seg) > 0


def coarse_points_from_coco(
    coco: Dict,
    noise="rg-0-0-0.25-0.25",
    seed: int = 0,
    use_masks: bool = True,
    source: str = "<dict>",
) -> Tuple[Dict, CoarseReport]:
    """Turn a COCO json dict (true boxes, optional segmentations) into a point json dict.

    Every image, category and annotation field is kept; each annotation gains
    ``point`` = [x, y] (replacing any existing one) and keeps ``bbox`` as its true box.
    The top-level ``point_noise`` records the noise name, seed and mask use.
    With ``use_masks``, annotations with a segmentation use the mask model and
    the others the box model; without, all use the box model.
    ``source`` names the input in error messages.

    Returns:
        (point json dict, CoarseReport). The input dict is not modified.
    """
    model = parse_noise(noise)
    annotation_rng(seed, 0)  # validates the seed before any work
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
        raise ValueError(f"{source}: not a COCO json (no 'annotations' list)")
    out = copy.deepcopy(coco)
    image_hw = _image_sizes(out)
    report = CoarseReport(noise=model.name, seed=int(seed), use_masks=bool(use_masks))
    seen_ids = set()
    box_jobs: List[Tuple[Dict, List[float], np.ndarray]] = []
    for index, ann in enumerate(out["annotations"]):
        key = _annotation_id(ann, index, seen_ids, source)
        box = _true_box(ann, index, source)
        report.annotations += 1
        if box[2] <= 0 or box[3] <= 0:
            ann["point"] = box_centre(box)
            report.degenerate_box_ids.append(key)
            continue
        rng = annotation_rng(seed, key)
        if use_masks and _has_segmentation(ann):
            _set_mask_point(ann, index, box, image_hw, model, rng, report, source)
            continue
        box_jobs.append((ann, box, rng.random(2)))
        report.from_box += 1
    _set_box_points(box_jobs, model)
    out["point_noise"] = {"noise": model.name, "seed": int(seed), "use_masks": bool(use_masks)}
    return out, report


def _image_sizes(coco) -> Dict:
    """{image id: (height, width)} of the images that have them."""
    image_hw = {}
    for img in coco.get("images", []):
        if isinstance(img, dict) and "id" in img and "height" in img and "width" in img:
            image_hw[img["id"]] = (int(img["height"]), int(img["width"]))
    return image_hw


def _annotation_id(ann, index, seen_ids, source):
    """The id of annotation number `index`, checked: an object with an id not seen before."""
    if not isinstance(ann, dict):
        raise ValueError(f"{source}: annotation #{index} is not an object")
    if "id" not in ann:
        raise ValueError(f"{source}: annotation #{index} has no 'id'")
    key = ann["id"]
    if key in seen_ids:
        raise ValueError(f"{source}: duplicate annotation id {key!r}")
    seen_ids.add(key)
    return key


def _set_mask_point(ann, index, box, image_hw, model, rng, report, source):
    """Draw `ann`'s point from its mask; an empty mask gives the box centre."""
    try:
        mask, origin = annotation_mask(ann["segmentation"], box, image_hw.get(ann.get("image_id")))
    except Exception as e:  # pycocotools raises bare Exceptions on bad input
        raise ValueError(
            f"{source}: {_record_name(ann, index)} has an unreadable 'segmentation': {e}"
        ) from e
    point = mask_point(mask, origin, box, model, rng)
    if point is None:
        ann["point"] = box_centre(box)
        report.empty_mask_ids.append(ann["id"])
    else:
        ann["point"] = [float(point[0]), float(point[1])]
        report.from_mask += 1


def _set_box_points(box_jobs, model):
    """Draw the points of the box-model annotations, all at once: (annotation, box, its
    two uniforms) per job."""
    if not box_jobs:
        return
    boxes = np.array([job[1] for job in box_jobs])
    uniforms = np.stack([job[2] for job in box_jobs])
    for (ann, _, _), point in zip(box_jobs, box_points(boxes, model, uniforms)):
        ann["point"] = [float(point[0]), float(point[1])]
