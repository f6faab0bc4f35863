"""Semantic variance of annotated points: how consistently they sit on objects.

For an object with true box (x, y, w, h) and point (px, py), the box-normalised
offset is o = ((px - cx) / w, (py - cy) / h), (cx, cy) the box centre.

* Relative semantic variance (RSV): for each class, the population variance
  (ddof = 0) of o along each axis, averaged over the two axes; RSV is the mean
  of that over classes. Classes with fewer than ``min_per_class`` objects
  (default 2) are left out of the class mean: a single object has variance 0
  by construction and would pull RSV down.
* Mean normalised distance (MND): the mean of |o| over all objects (not per class).

Objects are grouped into size ranges by sqrt(w h) of their true box, lo <= s < hi.

Comparing two sets of points for the same objects (coarse -> refined), an object
is *made worse* when its new point is further from the true box centre than its
old one by more than ``WORSE_MARGIN`` (0.05) of its size sqrt(w h).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from cpr_d2.data.point_json import true_box
from cpr_d2.utils.records import finite_floats

__all__ = [
    "DEFAULT_SIZE_RANGES",
    "VarianceStats",
    "JsonVariance",
    "Comparison",
    "WORSE_MARGIN",
    "normalized_offsets",
    "made_worse",
    "worse_by_range",
    "semantic_variance",
    "semantic_variance_by_range",
    "semantic_variance_json",
    "compare_point_jsons",
    "format_table",
    "format_comparison",
]

# Tree crowns in the forest data are 8 to 108 px (median about 40); the finer ranges
# below 32 px show where refinement at stride 8 is hardest.
DEFAULT_SIZE_RANGES: Tuple[Tuple[str, float, float], ...] = (
    ("all", 0.0, math.inf),
    ("<12 px", 0.0, 12.0),
    ("12-20 px", 12.0, 20.0),
    ("20-32 px", 20.0, 32.0),
    (">=32 px", 32.0, math.inf),
    ("<20 px", 0.0, 20.0),
    (">=20 px", 20.0, math.inf),
)
WORSE_MARGIN = 0.05


@dataclass
class VarianceStats:
    objects: int
    classes: int  # classes that entered the RSV mean
    rsv: float  # nan when no class has min_per_class objects
    mean_distance: float  # nan when there are no objects
    var_u: float  # class-averaged population variance of u
    var_v: float
    per_class: Dict = field(default_factory=dict)  # class -> (objects, var_u, var_v)


def normalized_offsets(points, boxes) -> np.ndarray:
    """(N, 2) points and (N, 4) XYWH boxes with w, h > 0 -> (N, 2) offsets o."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(points) != len(boxes):
        raise ValueError(f"{len(points)} points but {len(boxes)} boxes")
    if np.any(boxes[:, 2:] <= 0):
        raise ValueError("boxes must have w > 0 and h > 0")
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    return (points - centre) / boxes[:, 2:]


def made_worse(before, after, boxes, margin: float = WORSE_MARGIN) -> np.ndarray:
    """(N,) bool: `after` is further from the true box centre than `before` by more than
    margin * sqrt(w h) (points (N, 2), XYWH boxes (N, 4))."""
    before = np.asarray(before, dtype=np.float64).reshape(-1, 2)
    after = np.asarray(after, dtype=np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    size = np.sqrt(boxes[:, 2] * boxes[:, 3])
    return (np.linalg.norm(after - centre, axis=1)
            > np.linalg.norm(before - centre, axis=1) + margin * size)


def worse_by_range(before, after, boxes, size_ranges=DEFAULT_SIZE_RANGES) -> Dict[str, float]:
    """{range: percent of its objects made worse} (nan for an empty range)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    worse = made_worse(before, after, boxes)
    sizes = np.sqrt(boxes[:, 2] * boxes[:, 3])
    out = {}
    for name, lo, hi in size_ranges:
        keep = (sizes >= lo) & (sizes < hi)
        out[name] = 100.0 * float(worse[keep].mean()) if keep.any() else math.nan
    return out


def semantic_variance(points, boxes, labels=None, min_per_class: int = 2) -> VarianceStats:
    """RSV and mean normalised distance of points against their true boxes.

    ``labels`` (N,) are class ids (all one class when None).
    """
    offsets = normalized_offsets(points, boxes)
    labels = (
        np.zeros(len(offsets), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
    )
    if len(labels) != len(offsets):
        raise ValueError(f"{len(offsets)} points but {len(labels)} labels")
    per_class = {}
    for label in np.unique(labels):
        o = offsets[labels == label]
        var = o.var(axis=0)  # population variance
        key = label.item() if hasattr(label, "item") else label
        per_class[key] = (len(o), float(var[0]), float(var[1]))
    used = [v for v in per_class.values() if v[0] >= min_per_class]
    var_u = float(np.mean([v[1] for v in used])) if used else math.nan
    var_v = float(np.mean([v[2] for v in used])) if used else math.nan
    distance = float(np.linalg.norm(offsets, axis=1).mean()) if len(offsets) else math.nan
    return VarianceStats(
        objects=len(offsets),
        classes=len(used),
        rsv=(var_u + var_v) / 2,
        mean_distance=distance,
        var_u=var_u,
        var_v=var_v,
        per_class=per_class,
    )


@dataclass
class JsonVariance:
    ranges: Dict[str, VarianceStats]
    used: int  # annotations measured
    skipped: Dict[str, int]  # reason -> count


@dataclass
class _Objects:
    ids: list
    points: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    skipped: Dict[str, int]


def _box_of(ann) -> Optional[List[float]]:
    return true_box(ann)


def _collect(data: Dict, point_key: str, include_crowd: bool, source: str) -> _Objects:
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{source}: not a point json (no 'annotations' list)")
    if not data["annotations"]:
        raise ValueError(f"{source}: has no annotations")
    skipped = {"no true bbox": 0, "degenerate bbox": 0, "crowd/ignore": 0}
    ids, points, boxes, labels = [], [], [], []
    for index, ann in enumerate(data["annotations"]):
        name = (
            f"annotation id {ann.get('id')}"
            if isinstance(ann, dict) and "id" in ann
            else f"annotation #{index}"
        )
        if not isinstance(ann, dict):
            raise ValueError(f"{source}: {name} is not an object")
        if not include_crowd and (ann.get("iscrowd", 0) or ann.get("ignore", 0)):
            skipped["crowd/ignore"] += 1
            continue
        box = _box_of(ann)
        if box is None:
            skipped["no true bbox"] += 1
            continue
        if box[2] <= 0 or box[3] <= 0:
            skipped["degenerate bbox"] += 1
            continue
        point = finite_floats(ann.get(point_key), 2)
        if point is None:
            raise ValueError(
                f"{source}: {name} has no valid {point_key!r} [x, y] (got {ann.get(point_key)!r})"
            )
        if "category_id" not in ann:
            raise ValueError(f"{source}: {name} has no 'category_id'")
        ids.append(ann.get("id", index))
        points.append(point)
        boxes.append(box)
        labels.append(ann["category_id"])
    return _Objects(
        ids=ids,
        points=np.array(points, dtype=np.float64).reshape(-1, 2),
        boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
        labels=np.array(labels),
        skipped=skipped,
    )


def semantic_variance_by_range(
    points, boxes, labels, size_ranges=DEFAULT_SIZE_RANGES, min_per_class: int = 2
) -> Dict[str, VarianceStats]:
    """semantic_variance per object-size range (sqrt(w*h) in [lo, hi)), {name: stats}."""
    points, boxes, labels = np.asarray(points), np.asarray(boxes), np.asarray(labels)
    sizes = np.sqrt(boxes[:, 2] * boxes[:, 3])
    out = {}
    for name, lo, hi in size_ranges:
        keep = (sizes >= lo) & (sizes < hi)
        out[name] = semantic_variance(points[keep], boxes[keep], labels[keep], min_per_class)
    return out


def semantic_variance_json(
    data: Dict,
    size_ranges: Sequence[Tuple[str, float, float]] = DEFAULT_SIZE_RANGES,
    point_key: str = "point",
    include_crowd: bool = False,
    min_per_class: int = 2,
    source: str = "<dict>",
) -> JsonVariance:
    """RSV and mean normalised distance of a point json, per size range.

    Annotations without a usable true box (``bbox``, or ``true_bbox`` in the
    official release's format), with w or h <= 0, or
    (unless ``include_crowd``) marked ``iscrowd``/``ignore`` are skipped and
    counted; an annotation that is kept but has no valid point is an error, and
    so is a json in which no annotation has a true box.
    """
    objects = _collect(data, point_key, include_crowd, source)
    if not objects.ids and objects.skipped["no true bbox"]:
        raise ValueError(
            f"{source}: no annotation has a true box ('bbox'); semantic variance needs one"
        )
    ranges = semantic_variance_by_range(objects.points, objects.boxes, objects.labels, size_ranges, min_per_class)
    return JsonVariance(ranges=ranges, used=len(objects.ids), skipped=objects.skipped)


@dataclass
class Comparison:
    a: Dict[str, VarianceStats]
    b: Dict[str, VarianceStats]
    worse: Dict[str, float]  # range -> percent of objects b made worse than a
    matched: int
    only_in_a: int
    only_in_b: int
    skipped_a: Dict[str, int]
    skipped_b: Dict[str, int]

    def change(self, range_name: str, metric: str = "rsv") -> float:
        """Relative change from a to b in percent."""
        before = getattr(self.a[range_name], metric)
        after = getattr(self.b[range_name], metric)
        return 100.0 * (after - before) / before if before else math.nan


def compare_point_jsons(
    a: Dict,
    b: Dict,
    size_ranges: Sequence[Tuple[str, float, float]] = DEFAULT_SIZE_RANGES,
    point_key: str = "point",
    include_crowd: bool = False,
    min_per_class: int = 2,
    sources: Tuple[str, str] = ("a", "b"),
) -> Comparison:
    """Compare the points of two jsons (e.g. coarse vs refined) on the objects they share.

    Annotations are matched by ``id``; both sides are measured against a's
    true box and class (the refined json is expected to keep them), and an
    object enters a size range by that box.
    """
    objs_a = _collect(a, point_key, include_crowd, sources[0])
    objs_b = _collect(b, point_key, include_crowd, sources[1])
    if not objs_a.ids and objs_a.skipped["no true bbox"]:
        raise ValueError(
            f"{sources[0]}: no annotation has a true box ('bbox'); semantic variance needs one"
        )
    index_b = {key: i for i, key in enumerate(objs_b.ids)}
    rows_a, rows_b = [], []
    for i, key in enumerate(objs_a.ids):
        j = index_b.get(key)
        if j is not None:
            rows_a.append(i)
            rows_b.append(j)
    if not rows_a:
        raise ValueError(f"{sources[0]} and {sources[1]} share no annotation id with a true box")
    rows_a, rows_b = np.array(rows_a), np.array(rows_b)
    boxes, labels = objs_a.boxes[rows_a], objs_a.labels[rows_a]
    return Comparison(
        a=semantic_variance_by_range(objs_a.points[rows_a], boxes, labels, size_ranges, min_per_class),
        b=semantic_variance_by_range(objs_b.points[rows_b], boxes, labels, size_ranges, min_per_class),
        worse=worse_by_range(objs_a.points[rows_a], objs_b.points[rows_b], boxes, size_ranges),
        matched=len(rows_a),
        only_in_a=len(objs_a.ids) - len(rows_a),
        only_in_b=len(objs_b.ids) - len(rows_b),
        skipped_a=objs_a.skipped,
        skipped_b=objs_b.skipped,
    )


def _rows_to_text(header: List[str], rows: Iterable[List[str]]) -> str:
    rows = [header] + list(rows)
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(result: JsonVariance) -> str:
    rows = [
        [
            name,
            str(s.objects),
            str(s.classes),
            _fmt(s.rsv),
            _fmt(s.var_u),
            _fmt(s.var_v),
            _fmt(s.mean_distance),
        ]
        for name, s in result.ranges.items()
    ]
    return _rows_to_text(["range", "objects", "classes", "RSV", "var u", "var v", "mean |o|"], rows)


def format_comparison(result: Comparison, names: Tuple[str, str] = ("a", "b")) -> str:
    rows = []
    for name in result.a:
        sa, sb = result.a[name], result.b[name]
        rows.append(
            [
                name,
                str(sa.objects),
                _fmt(sa.rsv),
                _fmt(sb.rsv),
                _fmt(result.change(name, "rsv"), 1),
                _fmt(sa.mean_distance),
                _fmt(sb.mean_distance),
                _fmt(result.change(name, "mean_distance"), 1),
                _fmt(result.worse[name], 1),
            ]
        )
    a, b = names
    header = [
        "range",
        "objects",
        f"RSV {a}",
        f"RSV {b}",
        "change %",
        f"|o| {a}",
        f"|o| {b}",
        "change %",
        "worse %",
    ]
    return _rows_to_text(header, rows)
