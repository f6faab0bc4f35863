"""Point AP: average precision for point localisation (the paper's metric).

Pure numpy, no detectron2 dependency. The rules are those of
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
from typing import Dict, Mapping, Sequence, Tuple, Union

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
# Upper bound on the (detection, GT) pairs whose distance is computed at once.
_PAIR_CHUNK = 1 << 21
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


def _candidate_pairs(det_key, det_pts, gt_key, gt_centers, gt_wh, max_tau):
    """All (detection, GT) pairs of the same image and class with ``d <= max_tau``.

    Returns ``(det, gt, d2)`` arrays. Only detections whose x lies in a band of
    ``+-max_tau`` box widths around a GT's centre are measured: detections are
    sorted by (image and class, x), and each GT's band is located in that order
    by sorting it together with the band ends.
    """
    num_dets, num_gts = det_key.size, gt_key.size
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    if num_dets == 0 or num_gts == 0:
        return empty
    # Horizontal strips make the search 2-D: a detection lives in one strip, a GT is
    # searched in every strip its +-max_tau box heights reach. Strips about as high
    # as a typical GT's reach keep that to 1-3 strips per GT, and keep dense images
    # from measuring every detection in a band of the whole image height.
    reach_y = max_tau * gt_wh[:, 1] * (1 + 1e-9) + 1e-9 * (1 + np.abs(gt_centers[:, 1]))
    strip = float(np.median(2 * reach_y))
    if not np.isfinite(strip) or strip <= 0:
        strip = 1.0
    det_strip = np.floor(det_pts[:, 1] / strip)
    gt_lo = np.floor((gt_centers[:, 1] - reach_y) / strip)
    gt_hi = np.floor((gt_centers[:, 1] + reach_y) / strip)
    finite = np.isfinite(det_strip)
    first = min(det_strip[finite].min() if finite.any() else 0.0, gt_lo.min())
    spans = (gt_hi - gt_lo + 1).astype(np.int64)
    gt_rep = np.repeat(np.arange(num_gts), spans)
    rep_strip = gt_lo[gt_rep] + (np.arange(gt_rep.size) - np.repeat(np.cumsum(spans) - spans, spans))
    num_strips = int(max(det_strip[finite].max() if finite.any() else 0.0, gt_hi.max()) - first) + 2
    det_strip = np.where(finite, det_strip - first, num_strips - 1).astype(np.int64)
    dets, gts, d2 = _band_pairs(det_key * num_strips + det_strip, det_pts,
                                gt_key[gt_rep] * num_strips + (rep_strip - first).astype(np.int64),
                                gt_centers[gt_rep], gt_wh[gt_rep], max_tau)
    return dets, gt_rep[gts], d2


def _band_pairs(det_key, det_pts, gt_key, gt_centers, gt_wh, max_tau):
    """_candidate_pairs within equal keys, searching a band in x only."""
    num_dets, num_gts = det_key.size, gt_key.size
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    if num_dets == 0 or num_gts == 0:
        return empty
    by_x = np.lexsort((det_pts[:, 0], det_key))
    # Widen the band a little so that rounding never loses a pair; d2 decides below.
    half = max_tau * gt_wh[:, 0] * (1 + 1e-9) + 1e-9 * (1 + np.abs(gt_centers[:, 0]))
    keys = np.concatenate([det_key[by_x], gt_key, gt_key])
    xs = np.concatenate([det_pts[by_x, 0], gt_centers[:, 0] - half, gt_centers[:, 0] + half])
    # At equal (key, x): band starts (0) before detections (1) before band ends (2).
    tag = np.repeat(np.array([1, 0, 2], np.int8), [num_dets, num_gts, num_gts])
    merged = np.lexsort((tag, xs, keys))
    dets_before = np.cumsum(tag[merged] == 1) - (tag[merged] == 1)
    position = np.empty_like(merged)
    position[merged] = np.arange(merged.size)
    lo = dets_before[position[num_dets:num_dets + num_gts]]
    count = dets_before[position[num_dets + num_gts:]] - lo
    cum = np.cumsum(count)
    det_x, det_y = det_pts[:, 0].copy(), det_pts[:, 1].copy()
    gt_x, gt_y = gt_centers[:, 0].copy(), gt_centers[:, 1].copy()
    gt_w, gt_h = gt_wh[:, 0].copy(), gt_wh[:, 1].copy()
    dets_out, gts_out, d2_out = [], [], []
    start = 0
    while start < num_gts:
        base = cum[start - 1] if start else 0
        end = max(int(np.searchsorted(cum, base + _PAIR_CHUNK, "right")), start + 1)
        c = count[start:end]
        total = int(c.sum())
        if total:
            offset = np.arange(total) - np.repeat(np.cumsum(c) - c, c)
            det = by_x[np.repeat(lo[start:end], c) + offset]
            # The y distance first (a strip is higher than the reach): x only for those
            # within max_tau in y. Per-axis arrays, and the GTs' values by repeat.
            dy = (det_y[det] - np.repeat(gt_y[start:end], c)) / np.repeat(gt_h[start:end], c)
            near = np.flatnonzero(dy * dy <= max_tau * max_tau)  # d2 >= dy * dy in floats
            gt = np.repeat(np.arange(start, end), c)[near]
            det, dy = det[near], dy[near]
            dx = (det_x[det] - gt_x[gt]) / gt_w[gt]
            d2 = dx * dx + dy * dy
            ok = d2 <= max_tau * max_tau
            dets_out.append(det[ok])
            gts_out.append(gt[ok])
            d2_out.append(d2[ok])
        start = end
    if not dets_out:
        return empty
    return np.concatenate(dets_out), np.concatenate(gts_out), np.concatenate(d2_out)


def _dense_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each value among the distinct values (equal values, equal rank)."""
    order = np.argsort(values)
    v = values[order]
    step = np.ones(v.size, np.int64)
    step[0] = 0
    step[1:] = v[1:] != v[:-1]
    rank = np.empty(v.size, np.int64)
    rank[order] = np.cumsum(step)
    return rank


def _pair_priority(block: np.ndarray, d2: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Order of pairs by (block, d2, tiebreak); same result as ``np.lexsort`` on the
    three keys, but with one integer sort (a multi-key lexsort is ~10x slower)."""
    if d2.size == 0:
        return np.zeros(0, np.int64)
    d2_rank = _dense_rank(d2)
    key = block * (int(d2_rank.max()) + 1) + d2_rank
    order = np.argsort(key)
    k = key[order]
    equal = k[1:] == k[:-1]
    if equal.any():  # exact distance ties inside a block: order those runs by tiebreak
        in_run = np.zeros(k.size, bool)
        in_run[1:] |= equal
        in_run[:-1] |= equal
        pos = np.flatnonzero(in_run)
        sub = order[pos]
        order[pos] = sub[np.lexsort((tiebreak[sub], key[sub]))]
    return order


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
    for start in range(0, det_loc.size, _MATCH_CHUNK):
        dets = det_loc[start:start + _MATCH_CHUNK]
        gts = gt_loc[start:start + _MATCH_CHUNK]
        live = ~(done_d[dets] | done_g[gts])
        dets, gts = dets[live], gts[live]
        while dets.size:
            pos = np.arange(dets.size)
            first_d[dets] = dets.size
            np.minimum.at(first_d, dets, pos)
            first_g[gts] = dets.size
            np.minimum.at(first_g, gts, pos)
            accept = (first_d[dets] == pos) & (first_g[gts] == pos)
            done_d[dets[accept]] = True
            done_g[gts[accept]] = True
            live = ~(done_d[dets] | done_g[gts])
            dets, gts = dets[live], gts[live]
    return done_d


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
    order = np.lexsort((np.arange(d_key.size), -d_score, d_key))
    key_sorted = d_key[order]
    group_start = np.ones(order.size, bool)
    group_start[1:] = key_sorted[1:] != key_sorted[:-1]
    first_of_group = np.flatnonzero(group_start)
    rank = np.arange(order.size) - first_of_group[np.cumsum(group_start) - 1]
    keep = rank < max_dets
    order, group_start = order[keep], group_start[keep]
    d_img, d_cls, d_pts, d_score, d_key = (a[order] for a in (d_img, d_cls, d_pts, d_score, d_key))
    num_dets = order.size
    block = _tie_blocks(d_score, group_start)

    # Candidate pairs within the largest tau, in matching priority: block, distance,
    # detection, GT (the closest pair of a block first; one-detection blocks take their
    # closest GT; remaining ties go to the earlier detection, then the earlier GT).
    g_size = np.sqrt(g_wh[:, 0] * g_wh[:, 1])
    pair_det, pair_gt, pair_d2 = _candidate_pairs(
        d_key, d_pts, g_img * num_classes + g_cls, g_ctr, g_wh, max(taus)
    )
    prio = _pair_priority(block[pair_det], pair_d2, pair_det * max(g_cls.size, 1) + pair_gt)
    pair_det, pair_gt, pair_d2 = pair_det[prio], pair_gt[prio], pair_d2[prio]
    # Compact ids of the detections and GTs that have a pair, for the matching rounds.
    det_ids, det_loc = np.unique(pair_det, return_inverse=True)
    num_gt_loc = int(pair_gt.max()) + 1 if pair_gt.size else 0

    # Ranking for AP: per class, descending score; ties keep image order, then the
    # order inside the image.
    pooled = np.lexsort((np.arange(num_dets), d_img, -d_score, d_cls))

    ap = np.zeros((len(taus), len(bounds), num_classes))
    num_pos = np.zeros((len(bounds), num_classes), np.int64)
    for r, (lo, hi) in enumerate(bounds):
        ignore = g_crowd | (g_size < lo) | (g_size >= hi)
        num_pos[r] = np.bincount(g_cls[~ignore], minlength=num_classes)
        pair_ignore = ignore[pair_gt]
        for t, tau in enumerate(taus):
            within = pair_d2 <= tau * tau
            regular = within & ~pair_ignore
            tp = np.zeros(num_dets, bool)
            tp[det_ids] = _greedy_match(
                det_loc[regular], pair_gt[regular], det_ids.size, num_gt_loc
            )
            near_ignore = np.zeros(num_dets, bool)
            near_ignore[pair_det[within & pair_ignore]] = True
            kept = tp | ~near_ignore
            sel = pooled[kept[pooled]]
            ap[t, r] = _class_ap(d_cls[sel], tp[sel], num_pos[r], clean)

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
