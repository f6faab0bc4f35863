"""Greedy matching of detections to GTs, the core of the point AP evaluator.

:func:`point_ap_match` runs the compiled matcher (``torch.ops.cpr_d2.point_ap_match``,
CPU and CUDA kernels in csrc/point_ap) when it serves the device, else
:func:`point_ap_match_reference`, the numpy matcher that is its reference; the
two agree bit for bit. The metric's rules (which detections take part, their
order and tie blocks, which GTs a size range ignores, what a TP is worth) are
cpr_d2.evaluation.point_ap's; this module carries out the matching they define:

* Detections come in matching order: sorted by key (image and class), then by
  priority; ``det_block`` numbers their tie blocks 0, 1, 2, ... in that order (a
  block never spans two keys). GTs come in any order.
* A pair (d, g) of equal keys is a candidate when
  ``d2 = ((x - cx) / w)^2 + ((y - cy) / h)^2 <= max(taus)^2``.
* For each tau t and size range r, the candidates with ``d2 <= tau_t^2`` whose GT
  is not ignored in r are walked in (block, d2, det, gt) order, and a pair is
  accepted when its detection and its GT are both free: ``tp[t, r, d]``.
* ``ignore_d2[r, d]`` is the least d2 of d's candidates whose GT is ignored in r
  (inf when there is none).
"""
import math

import numpy as np
import torch

from . import _ext

__all__ = ["BACKENDS", "check_backend", "point_ap_match", "point_ap_match_reference",
           "sort_runs"]

BACKENDS = ("auto", "compiled", "numpy")
# (Detection, GT) pairs measured at once: the chunk's arrays stay in cache.
_PAIR_CHUNK = 1 << 14
# The candidate search clips coordinates to +-this (px), and ranks its sort keys
# densely when they reach _DENSE_LIMIT.
_COORD_LIMIT = 2.0 ** 40
_REACH_LIMIT = 2.0 ** 42
_DENSE_LIMIT = 1 << 30
# Edges per chunk of the greedy matching rounds (see _greedy_match).
_MATCH_CHUNK = 8192


# ----------------------------------------------------------------------------- checks


def check_backend(backend):
    if backend not in BACKENDS:
        choices = ", ".join(map(repr, BACKENDS))
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")


def _check_shapes(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore):
    """The arrays' shapes, on every path: the compiled path reorders the GTs before the
    kernel sees them. Same messages as the kernel's checks."""
    for name, a in (("det_key", det_key), ("gt_key", gt_key)):
        if np.ndim(a) != 1:
            raise ValueError(f"point_ap_match: {name} must be 1-D, got shape {np.shape(a)}")
    num_dets, num_gts = np.shape(det_key)[0], np.shape(gt_key)[0]
    for name, a, dim, rows, columns in (
        ("det_xy", det_xy, 2, num_dets, 2), ("det_block", det_block, 1, num_dets, 0),
        ("gt_xy", gt_xy, 2, num_gts, 2), ("gt_wh", gt_wh, 2, num_gts, 2),
        ("ignore", ignore, 2, None, num_gts),
    ):
        shape = np.shape(a)
        if len(shape) != dim:
            raise ValueError(
                f"point_ap_match: {name} must have {dim} dimension(s), got shape {shape}")
        if rows is not None and shape[0] != rows:
            raise ValueError(f"point_ap_match: {name} has {shape[0]} rows, expected {rows}")
        if dim == 2 and shape[1] != columns:
            raise ValueError(
                f"point_ap_match: {name} must have {columns} columns, got shape {shape}")


def _check_values(det_key, det_xy, det_block, gt_xy, gt_wh, taus):
    """The values the kernel checks (csrc/point_ap/point_ap_common.cpp), for the
    reference: the same messages, as ValueError."""
    if len(taus) == 0:
        raise ValueError("point_ap_match: taus must not be empty")
    for tau in taus:
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"point_ap_match: every tau must be finite and positive, got {tau}")
    for name, a in (("det_xy", det_xy), ("gt_xy", gt_xy)):
        if not np.isfinite(a).all():
            raise ValueError(f"point_ap_match: {name} must be finite")
    if not (np.isfinite(gt_wh).all() and (gt_wh > 0).all()):
        raise ValueError("point_ap_match: gt_wh must be finite and positive")
    if det_block.size and det_block[0] != 0:
        raise ValueError("point_ap_match: det_block must start at 0")
    if (det_key[1:] < det_key[:-1]).any():
        raise ValueError("point_ap_match: det_key must be sorted")
    block_step = det_block[1:] - det_block[:-1]
    if not ((block_step == 0) | (block_step == 1)).all():
        raise ValueError("point_ap_match: det_block must number the blocks 0, 1, 2, ... in order")
    if ((det_key[1:] != det_key[:-1]) & (block_step != 1)).any():
        raise ValueError("point_ap_match: a tie block must not span two keys")


# ----------------------------------------------------------------------------- sorting


def sort_runs(order: np.ndarray, key: np.ndarray, *finer) -> np.ndarray:
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
    return sort_runs(np.argsort(key), key, d2, det, gt)


# ----------------------------------------------------------------------------- candidates


def _abs_max(*arrays) -> int:
    """The largest magnitude in non-empty integer arrays, as a Python int."""
    return max(max(abs(int(a.min())), abs(int(a.max()))) for a in arrays)


def _dense_keys(det_keys: np.ndarray, gt_keys: np.ndarray):
    """Dense ranks of the detections' keys, and the GTs' keys on the same ranks
    (-1 where no detection has the key)."""
    uniq, det_dense = np.unique(det_keys, return_inverse=True)
    at = np.minimum(np.searchsorted(uniq, gt_keys), uniq.size - 1)
    return det_dense.reshape(-1), np.where(uniq[at] == gt_keys, at, -1)


def _strips(det_y, gt_y, gt_h, max_tau):
    """Horizontal strips about twice as high as a typical GT's reach (2-3 strips per
    GT), at most 2^20 of them, so that strip numbers stay small. Returns the strip
    height, every detection's strip, the first strip and the number of strips, and
    one entry per (GT, strip it reaches): the GT and the strip."""
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
    rep = np.repeat(np.arange(gt_y.size), spans)  # one entry per (GT, strip)
    rep_strip = gt_lo[rep] + (np.arange(rep.size) - np.repeat(np.cumsum(spans) - spans, spans))
    return strip, det_strip, s0, num_strips, rep, rep_strip


def _strip_keys(det_key, gt_key, det_strip, s0, num_strips, rep, rep_strip):
    """One integer per (key, strip), for the detections and the (GT, strip) entries;
    ranked densely when the raw numbers get large, which drops the entries whose
    (key, strip) no detection has. Returns the detections' and the kept entries'
    numbers, and the kept entries (GT and strip)."""
    if _abs_max(det_key, gt_key) + 1 >= _DENSE_LIMIT // num_strips:
        det_key, gt_key = _dense_keys(det_key, gt_key)  # absent GT keys: -1, no strip hits
    det_ck = det_key * num_strips + (det_strip - s0).astype(np.int64)
    rep_ck = gt_key[rep] * num_strips + (rep_strip - s0).astype(np.int64)
    if _abs_max(det_ck) + 1 >= _DENSE_LIMIT:
        det_ck, rep_ck = _dense_keys(det_ck, rep_ck)
        found = rep_ck >= 0
        rep, rep_strip, rep_ck = rep[found], rep_strip[found], rep_ck[found]
    return det_ck, rep_ck, rep, rep_strip


def _band_half_widths(gt_x, gt_y, gt_w, gt_h, rep, rep_strip, strip, tau2):
    """The half width in x of the band of each (GT, strip) entry, from the least y
    distance between the GT centre and the strip."""
    rep_y, rep_h = gt_y[rep], gt_h[rep]
    gap = np.maximum(rep_strip * strip - rep_y, rep_y - (rep_strip + 1) * strip)
    gap = np.maximum(gap - 1e-9 * (1 + np.abs(rep_y) + strip * (np.abs(rep_strip) + 1)), 0.0)
    rep_x = gt_x[rep]
    with np.errstate(over="ignore"):
        return np.minimum(gt_w[rep] * np.sqrt(np.maximum(tau2 * (1 + 1e-9) - (gap / rep_h) ** 2, 0.0))
                          * (1 + 1e-9) + 1e-9 * (1 + np.abs(rep_x)), _REACH_LIMIT)


def _locate_bands(det_x, gt_x, det_ck, rep, rep_ck, half):
    """Every band's detections, by one sort of the detections and the band ends.

    Sort keys: x relative to the leftmost detection, plus (key, strip) times a span
    wider than all of them. A band is clipped to the detections' x range first, so
    it cannot reach a neighbouring (key, strip); margin covers the rounding. Returns
    each band's first position and length in ``by_x`` (the detections in (key,
    strip, x) order), ``by_x`` and the margin.
    """
    num_dets = det_x.size
    x0 = float(det_x.min())
    width = float(det_x.max()) - x0
    span = width + 4.0
    ck_abs = _abs_max(det_ck)
    coord_abs = max(float(np.abs(det_x).max()), float(np.abs(gt_x).max()))
    margin = ((ck_abs + 2) * span + 2 * coord_abs) * 2.0 ** -44
    rel_x = gt_x[rep] - x0
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
    return lo, count, merged[is_det], margin


def _measure_bands(det_pts, det_ck, gt_centers, gt_wh, rep, rep_ck, lo, count, by_x, margin,
                   tau2):
    """Every detection in each band, measured exactly, in chunks that stay in cache:
    the ``(det, gt, d2)`` pairs with ``d2 <= tau2``. With a margin under 1 px no band
    reaches another (key, strip) (they are 3 px apart); otherwise the (key, strip)
    is compared too."""
    sorted_x, sorted_y, sorted_ck = det_pts[by_x, 0], det_pts[by_x, 1], det_ck[by_x]
    gt_cx, gt_cy, gt_w, gt_h = gt_centers[:, 0], gt_centers[:, 1], gt_wh[:, 0], gt_wh[:, 1]
    check_ck = margin >= 1.0
    num_reps = rep.size
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
    if det_key.size == 0 or gt_key.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    tau2 = max_tau * max_tau
    # Searched on coordinates clipped to +-2^40 px: clipping never moves two points
    # apart, so it loses no pair, and it bounds every number below.
    det_x = np.clip(det_pts[:, 0], -_COORD_LIMIT, _COORD_LIMIT)
    det_y = np.clip(det_pts[:, 1], -_COORD_LIMIT, _COORD_LIMIT)
    gt_x = np.clip(gt_centers[:, 0], -_COORD_LIMIT, _COORD_LIMIT)
    gt_y = np.clip(gt_centers[:, 1], -_COORD_LIMIT, _COORD_LIMIT)
    gt_w, gt_h = gt_wh[:, 0], gt_wh[:, 1]
    strip, det_strip, s0, num_strips, rep, rep_strip = _strips(det_y, gt_y, gt_h, max_tau)
    det_ck, rep_ck, rep, rep_strip = _strip_keys(det_key, gt_key, det_strip, s0, num_strips,
                                                 rep, rep_strip)
    half = _band_half_widths(gt_x, gt_y, gt_w, gt_h, rep, rep_strip, strip, tau2)
    lo, count, by_x, margin = _locate_bands(det_x, gt_x, det_ck, rep, rep_ck, half)
    return _measure_bands(det_pts, det_ck, gt_centers, gt_wh, rep, rep_ck, lo, count, by_x,
                          margin, tau2)


# ----------------------------------------------------------------------------- matching


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


def _prioritised_pairs(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, max_tau):
    """Candidate pairs within ``max_tau``, in matching priority: block, distance,
    detection, GT (the closest pair of a block first; one-detection blocks take their
    closest GT; remaining ties go to the earlier detection, then the earlier GT).

    Returns the detections that have a pair (``det_ids``), and per pair the compact
    id of its detection (its index in ``det_ids``), its GT and its d2.
    """
    pair_det, pair_gt, pair_d2 = _candidate_pairs(det_key, det_xy, gt_key, gt_xy, gt_wh, max_tau)
    prio = _pair_priority(det_block[pair_det], pair_d2, pair_det, pair_gt)
    has_pair = np.zeros(det_key.size, bool)
    has_pair[pair_det] = True
    det_loc = (np.cumsum(has_pair) - 1)[pair_det[prio]]
    return np.flatnonzero(has_pair), det_loc, pair_gt[prio], pair_d2[prio]


def _pairs_within_taus(det_loc, pair_gt, pair_d2, taus):
    """``{t: (det_loc, gt)}``: the pairs within each tau, still in priority order (each
    tau's pairs are a subset of the next larger tau's, so they are taken from those)."""
    within_tau = {}
    t_loc, t_gt, t_d2 = det_loc, pair_gt, pair_d2
    for t in sorted(range(len(taus)), key=lambda i: -taus[i]):
        within = t_d2 <= taus[t] * taus[t]
        if not within.all():
            within = np.flatnonzero(within)
            t_loc, t_gt, t_d2 = t_loc[within], t_gt[within], t_d2[within]
        within_tau[t] = t_loc, t_gt
    return within_tau


def point_ap_match_reference(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore, taus):
    """numpy reference of :func:`point_ap_match` (same arguments, same results)."""
    _check_shapes(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore)
    _check_values(det_key, det_xy, det_block, gt_xy, gt_wh, taus)
    num_dets = det_key.size
    tp = np.zeros((len(taus), ignore.shape[0], num_dets), bool)
    ignore_d2 = np.full((ignore.shape[0], num_dets), np.inf)
    det_ids, det_loc, pair_gt, pair_d2 = _prioritised_pairs(
        det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, max(taus))
    num_gt_loc = int(pair_gt.max()) + 1 if pair_gt.size else 0
    within_tau = _pairs_within_taus(det_loc, pair_gt, pair_d2, taus)
    gt_paired = np.zeros(gt_key.size, bool)
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


# ----------------------------------------------------------------------------- compiled


def _compiled_matcher(backend, device):
    """torch.ops.cpr_d2.point_ap_match if ``backend`` asks for it and it serves
    ``device``, else None (numpy)."""
    if backend == "numpy":
        return None
    try:
        where = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from e
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use device='cpu'")
    probe = torch.empty(0, dtype=torch.float64, device=where)
    op = _ext.compiled_op("point_ap_match", probe)
    if op is None and backend == "compiled":
        raise RuntimeError(
            f"backend='compiled' but cpr_d2._C has no point_ap_match kernel for {probe.device}; "
            "rebuild it (`CPR_D2_REBUILD=1 bash tools/setup_env.sh`, then "
            "`python -m cpr_d2.collect_env`) or use backend='numpy'"
        )
    return op


def _match_compiled(op, device, det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore, taus):
    """The compiled matcher's results. It wants the GTs sorted by key (a stable sort
    keeps the GT order that breaks distance ties) and runs each distinct row of
    ``ignore`` once. The kernel checks the values (ValueError, TypeError)."""
    gt_order = np.argsort(gt_key, kind="stable")
    ignore = ignore[:, gt_order]
    # Each distinct ignore mask once (np.unique(axis=0) is slow on bool rows).
    distinct, inverse = {}, np.zeros(len(ignore), np.int64)
    for r, row in enumerate(ignore):
        inverse[r] = distinct.setdefault(row.tobytes(), len(distinct))
    rows = ignore[[inverse.tolist().index(k) for k in range(len(distinct))]]

    def tensor(a, dtype):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(device or "cpu")

    tp, ignore_d2 = op(
        tensor(det_key, np.int64), tensor(det_xy, np.float64), tensor(det_block, np.int64),
        tensor(gt_key[gt_order], np.int64), tensor(gt_xy[gt_order], np.float64),
        tensor(gt_wh[gt_order], np.float64), tensor(rows, np.bool_), [float(t) for t in taus],
    )
    return tp.cpu().numpy()[:, inverse], ignore_d2.cpu().numpy()[inverse]


def point_ap_match(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore, taus, *,
                   backend="auto", device=None):
    """Greedy matching of detections to GTs, per distance threshold and size range
    (the rules: see the module docstring).

    Args:
        det_key: (D,) int64 key (image and class) of every detection, sorted.
        det_xy: (D, 2) float64 detection points.
        det_block: (D,) int64 tie block of every detection: 0, 1, 2, ... in order.
        gt_key: (G,) int64 key of every GT, in any order.
        gt_xy, gt_wh: (G, 2) float64 GT centres and box sizes (finite, sizes > 0).
        ignore: (R, G) bool, the GTs each size range ignores.
        taus: the T distance thresholds (finite, > 0).
        backend: ``"auto"``: the compiled matcher when cpr_d2._C has it for
            ``device``, else numpy (logged once); ``"compiled"``: the compiled
            matcher or an error; ``"numpy"``: :func:`point_ap_match_reference`.
        device: where the compiled matcher runs (default ``"cpu"``).

    Returns:
        numpy arrays tp (T, R, D) bool and ignore_d2 (R, D) float64, the same
        bit for bit whichever matcher ran.
    """
    check_backend(backend)
    _check_shapes(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore)
    op = _compiled_matcher(backend, device)
    if op is None:
        return point_ap_match_reference(det_key, det_xy, det_block, gt_key, gt_xy, gt_wh,
                                        ignore, taus)
    return _match_compiled(op, device, det_key, det_xy, det_block, gt_key, gt_xy, gt_wh, ignore,
                           taus)
