"""Point AP: average precision for point localisation (the paper's metric).

Written in numpy, without detectron2; the matching of detections to GTs also runs
compiled (``torch.ops.cpr_d2.point_ap_match``, CPU and CUDA kernels, see
``backend``), with the numpy matcher as its reference. The rules are those of
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
# (Detection, GT) pairs measured at once: the chunk's arrays stay in cache.
_PAIR_CHUNK = 1 << 14
# The candidate search clips coordinates to +-this (px), and ranks its sort keys
# densely when they reach _DENSE_LIMIT.
_COORD_LIMIT = 2.0 ** 40
_REACH_LIMIT = 2.0 ** 42
_DENSE_LIMIT = 1 << 30
# Keys (image and class) below this sort with their scores in one integer.
_ORDER_KEY_LIMIT = 1 << 30
# Edges per chunk of the greedy matching rounds (see _greedy_match).
_MATCH_CHUNK = 8192


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


# ----------------------------------------------------------------------------- matching


def _sort_runs(order: np.ndarray, key: np.ndarray, *finer) -> np.ndarray:
    """Reorder, in place, the runs of equal ``key[order]`` (``order`` sorts ``key``,
    not stably) by ``finer`` keys, most significant first, then by index."""
    k = key[order]
    equal = k[1:] == k[:-1]
    if equal.any():
        in_run = np.zeros(k.size, bool)
        in_run[1:] |= equal
        in_run[:-1] |= equal
        pos = np.flatnonzero(in_run)
        sub = order[pos]
        order[pos] = sub[np.lexsort((sub,) + tuple(f[sub] for f in reversed(finer)) + (k[pos],))]
    return order


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
    return _sort_runs(np.argsort(packed), packed)


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


def _abs_max(*arrays) -> int:
    """The largest magnitude in non-empty integer arrays, as a Python int."""
    return max(max(abs(int(a.min())), abs(int(a.max()))) for a in arrays)


def _dense_keys(det_keys: np.ndarray, gt_keys: np.ndarray):
    """Dense ranks of the detections' keys, and the GTs' keys on the same ranks
    (-1 where no detection has the key)."""
    uniq, det_dense = np.unique(det_keys, return_inverse=True)
    at = np.minimum(np.searchsorted(uniq, gt_keys), uniq.size - 1)
    return det_dense.reshape(-1), np.where(uniq[at] == gt_keys, at, -1)


def _candidate_pairs(det_key, det_pts, gt_key, gt_centers, gt_wh, max_tau):
    """All (detection, GT) pairs of equal key (image and class) with ``d <= max_tau``.

    Returns ``(det, gt, d2)`` arrays, ``d2`` computed exactly as the rules say.
    Points, centres and sizes must be finite and sizes positive.

    The search is 2-D. A detection lives in one horizontal strip; a GT is looked
    up in every strip its ``+-max_tau`` box heights reach, each time in a band of
    x around its centre, narrowed by how far the strip lies from the centre in
    y. All detections are sorted once by (key, strip, x) and every band is located
    in that order by the same sort, which holds the band ends too. Every margin
    below is many times the float rounding it covers, so the bands only ever hold
    more detections than the exact test at the end keeps, never fewer.
    """
    num_dets, num_gts = det_key.size, gt_key.size
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    if num_dets == 0 or num_gts == 0:
        return empty
    tau2 = max_tau * max_tau
    # Searched on coordinates clipped to +-2^40 px: clipping never moves two points
    # apart, so it loses no pair, and it bounds every number below.
    det_x = np.clip(det_pts[:, 0], -_COORD_LIMIT, _COORD_LIMIT)
    det_y = np.clip(det_pts[:, 1], -_COORD_LIMIT, _COORD_LIMIT)
    gt_x = np.clip(gt_centers[:, 0], -_COORD_LIMIT, _COORD_LIMIT)
    gt_y = np.clip(gt_centers[:, 1], -_COORD_LIMIT, _COORD_LIMIT)
    gt_w, gt_h = gt_wh[:, 0], gt_wh[:, 1]

    # Strips about twice as high as a typical GT's reach: 2-3 strips per GT. At most
    # 2^20 strips, so that strip numbers stay small.
    # Reaches are capped at 2^42 px: past 2^41 a reach covers every clipped
    # coordinate already, and the cap keeps a huge box's reach finite.
    with np.errstate(over="ignore"):
        reach_y = np.minimum(max_tau * gt_h * (1 + 1e-9) + 1e-9 * (1 + np.abs(gt_y)), _REACH_LIMIT)
    y0, y1 = float(det_y.min()), float(det_y.max())
    strip = max(float(np.median(2 * reach_y)), (y1 - y0) * 2.0 ** -20)
    det_strip = np.floor(det_y / strip)
    s0, s1 = float(det_strip.min()), float(det_strip.max())
    num_strips = int(s1 - s0) + 1
    gt_lo = np.maximum(np.floor((gt_y - reach_y) / strip), s0)
    gt_hi = np.minimum(np.floor((gt_y + reach_y) / strip), s1)
    spans = np.maximum(gt_hi - gt_lo + 1, 0).astype(np.int64)
    rep = np.repeat(np.arange(num_gts), spans)  # one entry per (GT, strip)
    rep_strip = gt_lo[rep] + (np.arange(rep.size) - np.repeat(np.cumsum(spans) - spans, spans))

    # One integer per (key, strip); ranked densely when the raw numbers get large.
    if _abs_max(det_key, gt_key) + 1 >= _DENSE_LIMIT // num_strips:
        det_key, gt_key = _dense_keys(det_key, gt_key)  # absent GT keys: -1, no strip hits
    det_ck = det_key * num_strips + (det_strip - s0).astype(np.int64)
    rep_ck = gt_key[rep] * num_strips + (rep_strip - s0).astype(np.int64)
    if _abs_max(det_ck) + 1 >= _DENSE_LIMIT:
        det_ck, rep_ck = _dense_keys(det_ck, rep_ck)
        found = rep_ck >= 0
        rep, rep_strip, rep_ck = rep[found], rep_strip[found], rep_ck[found]

    # The band's half width in x for each (GT, strip), from the least y distance
    # between the GT centre and the strip.
    rep_y, rep_h = gt_y[rep], gt_h[rep]
    gap = np.maximum(rep_strip * strip - rep_y, rep_y - (rep_strip + 1) * strip)
    gap = np.maximum(gap - 1e-9 * (1 + np.abs(rep_y) + strip * (np.abs(rep_strip) + 1)), 0.0)
    rep_x = gt_x[rep]
    with np.errstate(over="ignore"):
        half = np.minimum(gt_w[rep] * np.sqrt(np.maximum(tau2 * (1 + 1e-9) - (gap / rep_h) ** 2, 0.0))
                          * (1 + 1e-9) + 1e-9 * (1 + np.abs(rep_x)), _REACH_LIMIT)

    # Sort keys: x relative to the leftmost detection, plus (key, strip) times a span
    # wider than all of them. A band is clipped to the detections' x range first, so
    # it cannot reach a neighbouring (key, strip); margin covers the rounding.
    x0 = float(det_x.min())
    width = float(det_x.max()) - x0
    span = width + 4.0
    ck_abs = _abs_max(det_ck)
    coord_abs = max(float(np.abs(det_x).max()), float(np.abs(gt_x).max()))
    margin = ((ck_abs + 2) * span + 2 * coord_abs) * 2.0 ** -44
    rel_x = rep_x - x0
    values = np.concatenate([
        (det_x - x0) + det_ck * span,
        np.maximum(rel_x - half, -1.0) + rep_ck * span - margin,
        np.minimum(rel_x + half, width + 1.0) + rep_ck * span + margin,
    ])
    # A band end equal to a detection's value may sort on either side of it: that only
    # decides about a detection outside the band by the margin, which the test drops.
    merged = np.argsort(values)
    is_det = merged < num_dets
    before = np.cumsum(is_det) - is_det  # detections sorted before each entry
    dets_before = np.empty(merged.size, np.int64)
    dets_before[merged] = before
    num_reps = rep.size
    lo = dets_before[num_dets:num_dets + num_reps]
    count = np.maximum(dets_before[num_dets + num_reps:] - lo, 0)
    by_x = merged[is_det]  # detections in (key, strip, x) order
    sorted_x, sorted_y, sorted_ck = det_pts[by_x, 0], det_pts[by_x, 1], det_ck[by_x]
    gt_cx, gt_cy = gt_centers[:, 0], gt_centers[:, 1]

    # Every detection in each band, measured exactly, in chunks that stay in cache.
    # With a margin under 1 px no band reaches another (key, strip) (they are 3 px
    # apart); otherwise the (key, strip) is compared too.
    check_ck = margin >= 1.0
    cum = np.cumsum(count)
    measured = int(cum[-1]) if num_reps else 0
    dets_out, gts_out = np.empty(measured, np.int64), np.empty(measured, np.int64)
    d2_out = np.empty(measured)
    found = 0
    start = 0
    while start < num_reps:
        base = int(cum[start - 1]) if start else 0
        end = max(int(np.searchsorted(cum, base + _PAIR_CHUNK, "right")), start + 1)
        c = count[start:end]
        total = int(cum[end - 1]) - base
        if total:
            pos = np.repeat(lo[start:end] - (cum[start:end] - c - base), c) + np.arange(total)
            gt = np.repeat(rep[start:end], c)
            with np.errstate(over="ignore"):  # tiny boxes: an infinite distance, no pair
                dx = (sorted_x[pos] - gt_cx[gt]) / gt_w[gt]
                dy = (sorted_y[pos] - gt_cy[gt]) / gt_h[gt]
                d2 = dx * dx + dy * dy
            ok = d2 <= tau2
            if check_ck:
                ok &= sorted_ck[pos] == np.repeat(rep_ck[start:end], c)
            ok = np.flatnonzero(ok)
            n = ok.size
            dets_out[found:found + n] = by_x[pos[ok]]
            gts_out[found:found + n] = gt[ok]
            d2_out[found:found + n] = d2[ok]
            found += n
        start = end
    return dets_out[:found], gts_out[:found], d2_out[:found]


def _pair_priority(block: np.ndarray, d2: np.ndarray, det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Order of pairs by (block, d2, det, gt): the same as ``np.lexsort`` on the four
    keys, with one float sort (a multi-key lexsort is ~10x slower).

    ``block + d2 / (2 max d2)`` lies in ``[block, block + 1)``, and rounding never
    reverses an order, so sorting it orders the pairs correctly except inside runs
    of equal keys (equal distances, or distances too close to tell apart at the
    block's magnitude); those runs, all in one block, are sorted exactly.
    """
    if d2.size == 0:
        return np.zeros(0, np.int64)
    d2_max = float(d2.max())
    key = d2 * (0.5 / d2_max if d2_max > 0 else 0.0)
    key += block
    return _sort_runs(np.argsort(key), key, d2, det, gt)


def _greedy_match(det_loc, gt_loc, num_det_loc, num_gt_loc) -> np.ndarray:
    """Greedy one-to-one matching over edges given in priority order.

    ``det_loc`` / ``gt_loc`` are compact ids (< ``num_det_loc`` / ``num_gt_loc``).
    Equivalent to walking the edges in order and accepting each whose two ends
    are both free, but done in rounds: an edge that comes first among the live
    edges of its detection and of its GT is accepted by the walk whatever
    happens elsewhere, so all such edges are accepted at once, then every edge
    touching a matched end is removed. The rounds run on consecutive chunks of
    the edges, each to the end before the next starts: the edges of later chunks
    come later in the walk, so they cannot change a chunk's decisions, and short
    chunks need fewer rounds over fewer live edges (a dense image's edges take
    ~20 rounds at once). Returns a bool mask over compact detection ids.
    """
    done_d = np.zeros(num_det_loc, bool)
    done_g = np.zeros(num_gt_loc, bool)
    first_d = np.empty(num_det_loc, np.int64)
    first_g = np.empty(num_gt_loc, np.int64)
    positions = np.arange(min(_MATCH_CHUNK, det_loc.size))
    for start in range(0, det_loc.size, _MATCH_CHUNK):
        dets = det_loc[start:start + _MATCH_CHUNK]
        gts = gt_loc[start:start + _MATCH_CHUNK]
        while True:
            dead = done_d[dets]
            dead |= done_g[gts]
            live = np.flatnonzero(~dead)
            dets, gts = dets[live], gts[live]
            n = dets.size
            if not n:
                break
            pos = positions[:n]
            first_d[dets] = n
            np.minimum.at(first_d, dets, pos)
            first_g[gts] = n
            np.minimum.at(first_g, gts, pos)
            accept = first_d[dets] == pos
            accept &= first_g[gts] == pos
            done_d[dets[accept]] = True
            done_g[gts[accept]] = True
    return done_d


def _match_numpy(d_key, d_pts, block, g_key, g_ctr, g_wh, ignore, taus):
    """The reference matcher: ``tp`` ``(T, R, D)`` (detection matched, per tau and
    size range) and ``ignore_d2`` ``(R, D)`` (least d2 to an ignore GT within the
    largest tau, inf if none). Detections in matching order, ``block`` their tie
    blocks, ``ignore`` ``(R, G)``."""
    num_dets = d_key.size
    tp = np.zeros((len(taus), ignore.shape[0], num_dets), bool)
    ignore_d2 = np.full((ignore.shape[0], num_dets), np.inf)
    # Candidate pairs within the largest tau, in matching priority: block, distance,
    # detection, GT (the closest pair of a block first; one-detection blocks take their
    # closest GT; remaining ties go to the earlier detection, then the earlier GT).
    pair_det, pair_gt, pair_d2 = _candidate_pairs(d_key, d_pts, g_key, g_ctr, g_wh, max(taus))
    prio = _pair_priority(block[pair_det], pair_d2, pair_det, pair_gt)
    # Compact ids of the detections that have a pair, for the matching rounds.
    has_pair = np.zeros(num_dets, bool)
    has_pair[pair_det] = True
    det_ids = np.flatnonzero(has_pair)
    det_loc = (np.cumsum(has_pair) - 1)[pair_det[prio]]
    pair_gt, pair_d2 = pair_gt[prio], pair_d2[prio]
    num_gt_loc = int(pair_gt.max()) + 1 if pair_gt.size else 0

    # The pairs within each tau, largest tau first: each tau's pairs are a subset of
    # the previous one's, still in priority order.
    within_tau = {}
    t_loc, t_gt, t_d2 = det_loc, pair_gt, pair_d2
    for t in sorted(range(len(taus)), key=lambda i: -taus[i]):
        within = t_d2 <= taus[t] * taus[t]
        if not within.all():
            within = np.flatnonzero(within)
            t_loc, t_gt, t_d2 = t_loc[within], t_gt[within], t_d2[within]
        within_tau[t] = t_loc, t_gt
    gt_paired = np.zeros(g_key.size, bool)
    gt_paired[pair_gt] = True

    for r, row in enumerate(ignore):
        # Ranges that ignore none or all of the GTs with a pair skip the per-pair work.
        ignores = row[gt_paired]
        some, every = bool(ignores.any()), bool(ignores.all())
        if some:
            at = slice(None) if every else np.flatnonzero(row[pair_gt])
            loc_d2 = np.full(det_ids.size, np.inf)
            np.minimum.at(loc_d2, det_loc[at], pair_d2[at])
            ignore_d2[r, det_ids] = loc_d2
        if every:  # no detection has a non-ignore GT to match
            continue
        for t in range(len(taus)):
            reg_loc, reg_gt = within_tau[t]
            if some:
                regular = ~row[reg_gt]
                reg_loc, reg_gt = reg_loc[regular], reg_gt[regular]
            if reg_loc.size:
                tp[t, r, det_ids] = _greedy_match(reg_loc, reg_gt, det_ids.size, num_gt_loc)
    return tp, ignore_d2


_BACKENDS = ("auto", "compiled", "numpy")


def _compiled_matcher(backend, device):
    """torch.ops.cpr_d2.point_ap_match if ``backend`` asks for it and it serves
    ``device``, else None (numpy)."""
    if backend == "numpy":
        return None
    import torch

    from cpr_d2.layers._ext import compiled_op

    try:
        where = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from e
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use device='cpu'")
    probe = torch.empty(0, dtype=torch.float64, device=where)
    op = compiled_op("point_ap_match", probe)
    if op is None and backend == "compiled":
        raise RuntimeError(
            f"backend='compiled' but cpr_d2._C has no point_ap_match kernel for {probe.device}; "
            "rebuild it (`CPR_D2_REBUILD=1 bash tools/setup_env.sh`, then "
            "`python -m cpr_d2.collect_env`) or use backend='numpy'"
        )
    return op


def _match_compiled(op, device, d_key, d_pts, block, g_key, g_ctr, g_wh, ignore, taus):
    """``_match_numpy``'s results from the compiled matcher. It wants the GTs sorted by
    key (a stable sort keeps the GT order that breaks distance ties) and runs each
    distinct row of ``ignore`` once."""
    import torch

    gt_order = np.argsort(g_key, kind="stable")
    ignore = ignore[:, gt_order]
    # Each distinct ignore mask once (np.unique(axis=0) is slow on bool rows).
    distinct, inverse = {}, np.zeros(len(ignore), np.int64)
    for r, row in enumerate(ignore):
        inverse[r] = distinct.setdefault(row.tobytes(), len(distinct))
    rows = ignore[[inverse.tolist().index(k) for k in range(len(distinct))]]

    def tensor(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device or "cpu")

    tp, ignore_d2 = op(
        tensor(d_key, np.int64), tensor(d_pts, np.float64), tensor(block, np.int64),
        tensor(g_key[gt_order], np.int64), tensor(g_ctr[gt_order], np.float64),
        tensor(g_wh[gt_order], np.float64), tensor(rows, np.bool_), [float(t) for t in taus],
    )
    return tp.cpu().numpy()[:, inverse], ignore_d2.cpu().numpy()[inverse]


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
    if len(gts) != len(dets):
        raise ValueError(f"got GT for {len(gts)} images but detections for {len(dets)}")
    if len(gts) == 0:
        raise ValueError("nothing to evaluate: no images")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    if int(max_dets) != max_dets or max_dets < 1:
        raise ValueError(f"max_dets must be a positive integer, got {max_dets}")
    max_dets = int(max_dets)
    taus = _check_taus(taus)
    range_names, bounds = _resolve_size_ranges(size_ranges)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")

    g_img, g_cls, g_ctr, g_wh, g_crowd = _pack_gts(gts, num_classes)
    d_img, d_cls, d_pts, d_score = _pack_dets(dets)
    _check_classes(d_cls, num_classes, "detection")
    num_images = len(gts)

    # Counting errors, on every detection above the threshold.
    err = np.bincount(d_img[d_score > count_score_thresh], minlength=num_images) - np.bincount(
        g_img[~g_crowd], minlength=num_images
    )
    mae = float(np.abs(err).mean())
    rmse = float(np.sqrt((err.astype(np.float64) ** 2).mean()))

    # Matching order: per (image, class), descending score, stable; then max_dets.
    d_key = d_img * num_classes + d_cls
    order = _matching_order(d_key, d_score)
    key_sorted = d_key[order]
    group_start = np.ones(order.size, bool)
    group_start[1:] = key_sorted[1:] != key_sorted[:-1]
    first_of_group = np.flatnonzero(group_start)
    rank = np.arange(order.size) - first_of_group[np.cumsum(group_start) - 1]
    keep = rank < max_dets
    order, group_start = order[keep], group_start[keep]
    d_img, d_cls, d_pts, d_score, d_key = (a[order] for a in (d_img, d_cls, d_pts, d_score, d_key))
    block = _tie_blocks(d_score, group_start)

    # Ranking for AP: per class, descending score; ties keep image order, then the
    # order inside the image (the detections are in (image, class, score) order).
    pooled = _matching_order(d_cls, d_score)

    g_key = g_img * num_classes + g_cls
    g_size = np.sqrt(g_wh[:, 0] * g_wh[:, 1])
    ignore = np.stack([g_crowd | (g_size < lo) | (g_size >= hi) for lo, hi in bounds])
    num_pos = np.stack([np.bincount(g_cls[~row], minlength=num_classes) for row in ignore])
    matcher = _compiled_matcher(backend, device)
    if matcher is None:
        tp, ignore_d2 = _match_numpy(d_key, d_pts, block, g_key, g_ctr, g_wh, ignore, taus)
    else:
        tp, ignore_d2 = _match_compiled(matcher, device, d_key, d_pts, block, g_key, g_ctr,
                                        g_wh, ignore, taus)

    ap = np.zeros((len(taus), len(bounds), num_classes))
    for r in range(len(bounds)):
        for t, tau in enumerate(taus):
            # An unmatched detection within tau of an ignore GT is dropped.
            kept = tp[t, r] | ~(ignore_d2[r] <= tau * tau)
            sel = pooled[kept[pooled]]
            ap[t, r] = _class_ap(d_cls[sel], tp[t, r][sel], num_pos[r], clean)

    return PointAPResult(
        taus=taus,
        range_names=range_names,
        size_ranges=bounds,
        ap=ap,
        num_positives=num_pos,
        num_images=num_images,
        max_dets=max_dets,
        clean=bool(clean),
        count_score_thresh=float(count_score_thresh),
        mae=mae,
        rmse=rmse,
    )
