"""Point AP: average precision for point localisation (the paper's metric).

Written in numpy, without detectron2. The module holds the metric's rules; the
matching of detections to GTs they define is cpr_d2.layers.point_ap_match, which
runs compiled (``torch.ops.cpr_d2.point_ap_match``, CPU and CUDA kernels, see
``backend``) or as its numpy reference. The rules are those of
docs/method.md, "Evaluation: point AP"; by default they reproduce the
published evaluator, including its two quirks (marked (Q) below), so numbers
compare with the paper's. ``clean=True`` drops the quirks.

Rules, per distance threshold tau and size range:

* A GT's location is the centre of its true box ``(x + w/2, y + h/2)``
  (continuous pixel coordinates, origin at the image's top-left corner).
  A detection is its point. The distance between detection ``p`` and GT
  ``g`` is normalised per axis by the GT box:
  ``d^2 = ((px - gx)/gw)^2 + ((py - gy)/gh)^2``; they can match when
  ``d <= tau``.
* Ignore GTs: ``iscrowd`` set, or (for this size range) ``sqrt(w*h)``
  outside ``[lo, hi)``.
* Per image and class, only the ``max_dets`` highest-scoring detections
  take part. They are matched greedily, one-to-one, in descending score
  order, each taking the closest still-free non-ignore GT within tau.
  Detections whose float32 scores are within 1e-8 of the first score of
  their run form a block that is matched together: the closest
  (detection, free GT) pair of the block first, then the next closest, ...
  A detection left unmatched but within tau of an ignore GT is dropped
  (neither TP nor FP).
* Per class, the remaining detections of all images are ranked by score
  (stable sort: ties keep image order, then the order inside the image).
  For each recall threshold r in 0, 0.01, ..., 1 the precision at the
  first rank whose recall reaches r is taken (0 if none does), without the
  monotone envelope of COCO box AP. AP is their mean.
* (Q) recall is ``TP / (npos + 1e-12)``: a threshold k/npos is reached one
  TP late and r = 1 never is, so a perfect detector scores 100/101.
  ``clean=True`` uses ``TP / npos`` (exact integer comparison).
* (Q) a class without non-ignore GT in a range scores 1 if none of its
  detections remains after dropping, else 0, and the mean AP is over every
  class. ``clean=True`` leaves such a class out of the mean (its AP is NaN).

Counting errors, over all images: ``|#detections with score > thresh -
#non-crowd GT|`` per image (all classes together, all sizes); MAE is their
mean, RMSE the square root of the mean squared error.

Scores are rounded to float32 before anything else, as the published
evaluator does; this decides which scores tie.
"""
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from cpr_d2.layers.point_ap_match import check_backend, point_ap_match, sort_runs

__all__ = [
    "DEFAULT_TAUS",
    "SIZE_RANGE_PRESETS",
    "PointAPResult",
    "box_centers",
    "evaluate_point_ap",
]

DEFAULT_TAUS = (0.5, 1.0, 2.0)

SIZE_RANGE_PRESETS: Dict[str, "OrderedDict[str, Tuple[float, float]]"] = {
    "coco": OrderedDict(
        [("all", (0.0, 1e5)), ("small", (0.0, 32.0)), ("medium", (32.0, 96.0)),
         ("large", (96.0, 1e5))]
    ),
    "tinyperson": OrderedDict(
        [("all", (1.0, 1e5)), ("tiny", (1.0, 20.0)), ("tiny1", (1.0, 8.0)),
         ("tiny2", (8.0, 12.0)), ("tiny3", (12.0, 20.0)), ("small", (20.0, 32.0)),
         ("reasonable", (32.0, 1e5))]
    ),
}

NUM_RECALL_THRESHOLDS = 101
# Scores closer than this to the first score of their run are matched as a block. The
# comparison is done in float32, like the published evaluator's.
TIE_EPS = np.float32(1e-8)
# (Q) added to the number of positives when computing recall.
RECALL_EPS = 1e-12
# Keys (image and class) below this sort with their scores in one integer.
_ORDER_KEY_LIMIT = 1 << 30


def box_centers(boxes_xywh) -> np.ndarray:
    """Centres ``(x + w/2, y + h/2)`` of ``(N, 4)`` XYWH boxes, as float64."""
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    return b[:, :2] + 0.5 * b[:, 2:]


def _tau_label(tau: float) -> str:
    return format(float(tau), "g")


@dataclass(frozen=True)
class PointAPResult:
    """Output of :func:`evaluate_point_ap`. AP values are fractions in [0, 1].

    Attributes:
        taus: the distance thresholds, in the order of ``ap``'s first axis.
        range_names, size_ranges: the size ranges (names and ``[lo, hi)``), in
            the order of ``ap``'s second axis.
        ap: ``(T, R, C)`` AP per threshold, size range and class; NaN for a
            class without positives in a range when ``clean``.
        num_positives: ``(R, C)`` number of non-ignore GTs per range and class.
        num_images, max_dets, clean, count_score_thresh: the settings.
        mae, rmse: counting errors (see the module docstring).
    """

    taus: Tuple[float, ...]
    range_names: Tuple[str, ...]
    size_ranges: Tuple[Tuple[float, float], ...]
    ap: np.ndarray
    num_positives: np.ndarray
    num_images: int
    max_dets: int
    clean: bool
    count_score_thresh: float
    mae: float
    rmse: float

    @property
    def mean_ap(self) -> np.ndarray:
        """``(T, R)`` mean AP over classes (over classes with positives when clean)."""
        if not self.clean:
            return self.ap.mean(axis=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slice -> NaN
            return np.nanmean(self.ap, axis=2)

    def _tau_index(self, tau: float) -> int:
        for i, t in enumerate(self.taus):
            if math.isclose(t, float(tau), rel_tol=0.0, abs_tol=1e-12):
                return i
        raise KeyError(f"tau={tau} was not evaluated (taus: {self.taus})")

    def _range_index(self, name: str) -> int:
        try:
            return self.range_names.index(name)
        except ValueError:
            raise KeyError(f"no size range {name!r} (ranges: {self.range_names})") from None

    def per_class(self, tau: float, size_range: str = "all") -> np.ndarray:
        """``(C,)`` AP of every class at one threshold and size range."""
        return self.ap[self._tau_index(tau), self._range_index(size_range)]

    def metrics(self) -> "OrderedDict[str, float]":
        """Scalar metrics with stable names.

        For the range named ``all``: ``mAP`` (mean over taus of the class-mean
        AP) and ``AP@<tau>`` (``AP@0.5``, ``AP@1``, ``AP@2``); for any other
        range the same names with ``/<range>`` appended (``AP@1/small``).
        Then ``MAE`` and ``RMSE``.
        """
        out: "OrderedDict[str, float]" = OrderedDict()
        m = self.mean_ap
        for r, name in enumerate(self.range_names):
            suffix = "" if name == "all" else "/" + name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out["mAP" + suffix] = float(np.mean(m[:, r]))
            for t, tau in enumerate(self.taus):
                out[f"AP@{_tau_label(tau)}{suffix}"] = float(m[t, r])
        out["MAE"] = self.mae
        out["RMSE"] = self.rmse
        return out


# ----------------------------------------------------------------------------- inputs


def _check_taus(taus) -> Tuple[float, ...]:
    out = tuple(float(t) for t in taus)
    if not out:
        raise ValueError("taus must not be empty")
    if any(not (t > 0 and math.isfinite(t)) for t in out):
        raise ValueError(f"taus must be positive and finite, got {out}")
    if len({_tau_label(t) for t in out}) != len(out):
        raise ValueError(f"taus must be distinct, got {out}")
    return out


def _resolve_size_ranges(size_ranges) -> Tuple[Tuple[str, ...], Tuple[Tuple[float, float], ...]]:
    if isinstance(size_ranges, str):
        if size_ranges not in SIZE_RANGE_PRESETS:
            raise ValueError(
                f"unknown size range preset {size_ranges!r}; "
                f"choose one of {sorted(SIZE_RANGE_PRESETS)} or pass {{name: (lo, hi)}}"
            )
        size_ranges = SIZE_RANGE_PRESETS[size_ranges]
    if not isinstance(size_ranges, Mapping) or not size_ranges:
        raise ValueError(
            "size_ranges must be a preset name or a non-empty {name: (lo, hi)} mapping"
        )
    names, bounds = [], []
    for name, rng in size_ranges.items():
        lo, hi = (float(v) for v in rng)
        if not lo < hi:
            raise ValueError(f"size range {name!r} must have lo < hi, got ({lo}, {hi})")
        names.append(str(name))
        bounds.append((lo, hi))
    return tuple(names), tuple(bounds)


def _as_rows(value, width: int, what: str, image: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, width)
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"image {image}: {what} must have shape (N, {width}), got {arr.shape}")
    return arr


def _as_vector(value, dtype, n: int, what: str, image: int) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"image {image}: {what} has {arr.shape[0]} entries, expected {n}")
    return arr


def _check_classes(classes: np.ndarray, num_classes: int, what: str) -> None:
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        bad = classes[(classes < 0) | (classes >= num_classes)][0]
        raise ValueError(f"{what} class {bad} is outside [0, {num_classes})")


def _pack_gts(gts, num_classes):
    boxes, classes, crowd, counts = [], [], [], []
    for i, g in enumerate(gts):
        b = _as_rows(g["boxes"], 4, "GT boxes", i)
        n = b.shape[0]
        boxes.append(b)
        classes.append(_as_vector(g["classes"], np.int64, n, "GT classes", i))
        c = g.get("iscrowd")
        if c is None:
            crowd.append(np.zeros(n, bool))
        else:
            crowd.append(_as_vector(c, np.int64, n, "iscrowd", i) != 0)
        counts.append(n)
    counts = np.asarray(counts, dtype=np.int64)
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    classes = np.concatenate(classes) if classes else np.zeros(0, np.int64)
    crowd = np.concatenate(crowd) if crowd else np.zeros(0, bool)
    if not np.isfinite(boxes).all():
        raise ValueError("GT boxes must be finite")
    bad = np.flatnonzero(~(boxes[:, 2:] > 0).all(axis=1))
    if bad.size:
        image = int(np.searchsorted(np.cumsum(counts), bad[0], "right"))
        raise ValueError(
            f"image {image}: GT box {boxes[bad[0]].tolist()} has no area; point AP divides "
            "distances by the box width and height, so every GT box needs both positive"
        )
    _check_classes(classes, num_classes, "GT")
    image = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    return image, classes, box_centers(boxes), boxes[:, 2:].copy(), crowd


def _pack_dets(dets):
    points, scores, classes, counts = [], [], [], []
    for i, d in enumerate(dets):
        p = _as_rows(d["points"], 2, "detection points", i)
        n = p.shape[0]
        points.append(p)
        scores.append(_as_vector(d["scores"], np.float64, n, "scores", i).astype(np.float32))
        classes.append(_as_vector(d["classes"], np.int64, n, "detection classes", i))
        counts.append(n)
    counts = np.asarray(counts, dtype=np.int64)
    points = np.concatenate(points) if points else np.zeros((0, 2))
    scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    classes = np.concatenate(classes) if classes else np.zeros(0, np.int64)
    if not (np.isfinite(points).all() and np.isfinite(scores).all()):
        raise ValueError("detection points and scores must be finite")
    image = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    return image, classes, points, scores


# ----------------------------------------------------------------------------- matching order


def _matching_order(key: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices sorted by (key, descending float32 score, index), as a stable sort.

    One integer sort: the score's bits, mapped so that integer order is float
    order, go below the key; only runs of equal (key, score) need a second look.
    """
    if key.size == 0 or int(key.min()) < 0 or int(key.max()) >= _ORDER_KEY_LIMIT:
        return np.lexsort((-scores, key))  # lexsort is stable
    bits = scores.astype(np.float32).view(np.int32).astype(np.int64)
    # Integer order = float order (-0 and +0 both map to 0).
    ascending = np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    packed = key * (1 << 32) + ((1 << 31) - 1 - ascending)  # descending score
    return sort_runs(np.argsort(packed), packed)


def _tie_blocks(scores: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """Block id of every detection, detections sorted by (group, descending score).

    A block starts at each group start and wherever the score differs from the
    block's first score by TIE_EPS or more (float32 arithmetic).
    """
    new = group_start.copy()
    if scores.size > 1:
        diff = scores[:-1] - scores[1:]  # float32, >= 0 inside a group
        new[1:] |= diff >= TIE_EPS
        # A step of TIE_EPS or more always starts a block (the block's first score is at
        # least the previous score), so runs between such starts are independent. Runs
        # of equal scores need nothing more; a run with a step smaller than TIE_EPS
        # (scores below ~0.13 only) is scanned on its own.
        near = np.flatnonzero(~new[1:] & (diff > 0)) + 1
        if near.size:
            starts = np.flatnonzero(new)
            run_of = np.searchsorted(starts, near, "right") - 1
            ends = np.append(starts[1:], scores.size)
            for run in np.unique(run_of):
                lo, hi = int(starts[run]), int(ends[run])
                first = scores[lo]
                for k in range(lo + 1, hi):
                    if abs(scores[k] - first) >= TIE_EPS:
                        new[k] = True
                        first = scores[k]
    return np.cumsum(new) - 1


# ----------------------------------------------------------------------------- AP


def _min_tp_for_recall(npos: np.ndarray, clean: bool) -> np.ndarray:
    """``(C, 101)``: the fewest TPs whose recall reaches each threshold (npos >= 1)."""
    npos = npos.astype(np.int64)[:, None]
    j = np.arange(NUM_RECALL_THRESHOLDS, dtype=np.int64)[None, :]
    steps = NUM_RECALL_THRESHOLDS - 1
    if clean:  # TP / npos >= j / 100, in integers
        return (j * npos + steps - 1) // steps
    # (Q) TP / (npos + 1e-12) >= linspace(0, 1, 101)[j], evaluated in float64 exactly as
    # written; the smallest integer satisfying it lies within a few units of thr * npos.
    thr = np.linspace(0.0, 1.0, NUM_RECALL_THRESHOLDS)[None, :]
    denom = npos + RECALL_EPS
    k0 = np.maximum(np.ceil(thr * npos).astype(np.int64) - 2, 0)
    k = np.full(k0.shape, -1, dtype=np.int64)
    for step in range(5, -1, -1):
        cand = k0 + step
        k = np.where(cand / denom >= thr, cand, k)
    assert (k >= 0).all()
    return k


def _class_ap(cls_sorted, tp_sorted, npos, clean) -> np.ndarray:
    """AP of every class from detections sorted by (class, rank)."""
    num_classes = npos.size
    n = cls_sorted.size
    classes = np.arange(num_classes)
    seg_start = np.searchsorted(cls_sorted, classes, "left")
    seg_end = np.searchsorted(cls_sorted, classes, "right")
    if n:
        csum = np.zeros(n + 1, np.int64)
        np.cumsum(tp_sorted, out=csum[1:])
        start_of = seg_start[cls_sorted]
        tp_cum = csum[1:] - csum[start_of]
        precision = tp_cum / (np.arange(1, n + 1) - start_of)
        # First rank of each class whose TP count reaches k: one searchsorted over
        # (class, TP count) keys made globally non-decreasing.
        stride = n + 2
        need = _min_tp_for_recall(np.maximum(npos, 1), clean)
        keys = tp_cum + cls_sorted * stride
        idx = np.searchsorted(keys, need + (classes * stride)[:, None], "left")
        valid = idx < seg_end[:, None]
        chosen = np.where(valid, precision[np.minimum(idx, n - 1)], 0.0)
        ap = chosen.sum(axis=1) / NUM_RECALL_THRESHOLDS
    else:
        ap = np.zeros(num_classes)
    no_pos = npos == 0
    if clean:
        ap[no_pos] = np.nan
    else:  # (Q)
        ap[no_pos] = (seg_end == seg_start)[no_pos].astype(np.float64)
    return ap


# ----------------------------------------------------------------------------- entry point


def _check_settings(gts, dets, num_classes, max_dets, taus, size_ranges, backend):
    """The settings of :func:`evaluate_point_ap`, checked before the inputs: returns
    num_classes, max_dets, taus and the size ranges (names, bounds)."""
    if len(gts) != len(dets):
        raise ValueError(f"got GT for {len(gts)} images but detections for {len(dets)}")
    if len(gts) == 0:
        raise ValueError("nothing to evaluate: no images")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    if int(max_dets) != max_dets or max_dets < 1:
        raise ValueError(f"max_dets must be a positive integer, got {max_dets}")
    taus = _check_taus(taus)
    range_names, bounds = _resolve_size_ranges(size_ranges)
    check_backend(backend)
    return num_classes, int(max_dets), taus, range_names, bounds


def _counting_errors(d_img, d_score, g_img, g_crowd, count_score_thresh, num_images):
    """MAE and RMSE of the per-image counts of detections above the threshold."""
    err = np.bincount(d_img[d_score > count_score_thresh], minlength=num_images) - np.bincount(
        g_img[~g_crowd], minlength=num_images
    )
    return float(np.abs(err).mean()), float(np.sqrt((err.astype(np.float64) ** 2).mean()))


def _matching_detections(d_img, d_cls, d_pts, d_score, num_classes, max_dets):
    """The detections that take part, in matching order: per (image, class), by
    descending score (stable), the first ``max_dets``. Returns their keys, classes,
    points, scores and tie blocks."""
    d_key = d_img * num_classes + d_cls
    order = _matching_order(d_key, d_score)
    key_sorted = d_key[order]
    group_start = np.ones(order.size, bool)
    group_start[1:] = key_sorted[1:] != key_sorted[:-1]
    first_of_group = np.flatnonzero(group_start)
    rank = np.arange(order.size) - first_of_group[np.cumsum(group_start) - 1]
    keep = rank < max_dets
    order, group_start = order[keep], group_start[keep]
    d_key, d_cls, d_pts, d_score = (a[order] for a in (d_key, d_cls, d_pts, d_score))
    return d_key, d_cls, d_pts, d_score, _tie_blocks(d_score, group_start)


def _size_range_ignores(g_cls, g_wh, g_crowd, bounds, num_classes):
    """``(R, G)`` the GTs each size range ignores, and ``(R, C)`` its positives per class."""
    g_size = np.sqrt(g_wh[:, 0] * g_wh[:, 1])
    ignore = np.stack([g_crowd | (g_size < lo) | (g_size >= hi) for lo, hi in bounds])
    num_pos = np.stack([np.bincount(g_cls[~row], minlength=num_classes) for row in ignore])
    return ignore, num_pos


def _ap_table(tp, ignore_d2, d_cls, d_score, num_pos, taus, clean) -> np.ndarray:
    """``(T, R, C)`` AP from the matching of the detections (in matching order)."""
    # Ranking for AP: per class, descending score; ties keep image order, then the
    # order inside the image (the detections are in (image, class, score) order).
    pooled = _matching_order(d_cls, d_score)
    ap = np.zeros((len(taus),) + num_pos.shape)
    for r in range(num_pos.shape[0]):
        for t, tau in enumerate(taus):
            # An unmatched detection within tau of an ignore GT is dropped.
            kept = tp[t, r] | ~(ignore_d2[r] <= tau * tau)
            sel = pooled[kept[pooled]]
            ap[t, r] = _class_ap(d_cls[sel], tp[t, r][sel], num_pos[r], clean)
    return ap


def evaluate_point_ap(
    gts: Sequence[Mapping],
    dets: Sequence[Mapping],
    num_classes: int,
    *,
    taus: Sequence[float] = DEFAULT_TAUS,
    size_ranges: Union[str, Mapping[str, Tuple[float, float]]] = "coco",
    max_dets: int = 100,
    clean: bool = False,
    count_score_thresh: float = 0.5,
    backend: str = "auto",
    device: Optional[str] = None,
) -> PointAPResult:
    """Point AP over a set of images.

    Args:
        gts: one mapping per image: ``boxes`` ``(N, 4)`` true boxes XYWH in
            pixels, ``classes`` ``(N,)`` ints in ``[0, num_classes)``, optional
            ``iscrowd`` ``(N,)`` (nonzero = ignore region).
        dets: one mapping per image, same order as ``gts``: ``points``
            ``(K, 2)`` xy in pixels, ``scores`` ``(K,)``, ``classes`` ``(K,)``.
        num_classes: C; every class counts in the mean AP (unless ``clean``).
        taus: normalised distance thresholds.
        size_ranges: ``"coco"``, ``"tinyperson"`` or an ordered
            ``{name: (lo, hi)}`` over ``sqrt(w*h)`` of the GT box.
        max_dets: detections kept per image and class (highest scores).
        clean: drop the published evaluator's quirks (see module docstring).
        count_score_thresh: detections with a score above it are counted for
            MAE / RMSE.
        backend: who matches detections to GTs. ``"auto"``: the compiled
            matcher (``torch.ops.cpr_d2.point_ap_match``) when cpr_d2._C has
            it for ``device``, else numpy (logged once); ``"compiled"``: the
            compiled matcher or an error; ``"numpy"``: the numpy reference.
            All give the same result, bit for bit.
        device: where the compiled matcher runs (default ``"cpu"``; e.g.
            ``"cuda"``); inputs and results stay numpy either way.
    """
    num_classes, max_dets, taus, range_names, bounds = _check_settings(
        gts, dets, num_classes, max_dets, taus, size_ranges, backend)
    g_img, g_cls, g_ctr, g_wh, g_crowd = _pack_gts(gts, num_classes)
    d_img, d_cls, d_pts, d_score = _pack_dets(dets)
    _check_classes(d_cls, num_classes, "detection")
    mae, rmse = _counting_errors(d_img, d_score, g_img, g_crowd, count_score_thresh, len(gts))
    d_key, d_cls, d_pts, d_score, block = _matching_detections(
        d_img, d_cls, d_pts, d_score, num_classes, max_dets)
    ignore, num_pos = _size_range_ignores(g_cls, g_wh, g_crowd, bounds, num_classes)
    tp, ignore_d2 = point_ap_match(d_key, d_pts, block, g_img * num_classes + g_cls, g_ctr, g_wh,
                                   ignore, taus, backend=backend, device=device)
    return PointAPResult(
        taus=taus, range_names=range_names, size_ranges=bounds,
        ap=_ap_table(tp, ignore_d2, d_cls, d_score, num_pos, taus, clean),
        num_positives=num_pos, num_images=len(gts), max_dets=max_dets, clean=bool(clean),
        count_score_thresh=float(count_score_thresh), mae=mae, rmse=rmse,
    )
