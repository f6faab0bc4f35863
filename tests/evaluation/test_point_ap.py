"""Point AP: hand-computed cases for every rule, plus random cases against a
straightforward loop implementation of the same rules.

Reminders for the hand computations (official conventions): 101 recall
thresholds j/100; at each, the precision at the first rank whose recall
TP / (npos + 1e-12) reaches it, else 0. With npos positives, k TPs reach the
thresholds j/100 < k/npos (strictly), never j = 100. Under ``clean`` they
reach j/100 <= k/npos.
"""
import importlib
import math
import os

import numpy as np
import pytest

from cpr_d2.evaluation import point_ap
from cpr_d2.evaluation.point_ap import (
    SIZE_RANGE_PRESETS,
    _matching_order,
    _tie_blocks,
    evaluate_point_ap,
)
from cpr_d2.layers.point_ap_match import _candidate_pairs, _greedy_match, _pair_priority

# The module (cpr_d2.layers.point_ap_match, the attribute, is the function).
matcher = importlib.import_module("cpr_d2.layers.point_ap_match")

PERFECT = 100 / 101  # official: the r = 1 threshold is never reached


def gt(boxes, classes, iscrowd=None):
    out = {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "classes": np.asarray(classes),
    }
    if iscrowd is not None:
        out["iscrowd"] = np.asarray(iscrowd)
    return out


def det(points, scores, classes):
    return {
        "points": np.asarray(points, dtype=np.float64).reshape(-1, 2),
        "scores": np.asarray(scores, dtype=np.float64),
        "classes": np.asarray(classes),
    }


def ap(result, tau, size_range="all", cls=0):
    return float(result.per_class(tau, size_range)[cls])


def single(boxes, points, scores, **kw):
    """One image, one class."""
    return evaluate_point_ap(
        [gt(boxes, [0] * len(boxes))], [det(points, scores, [0] * len(points))], 1, **kw
    )


# ----------------------------------------------------------------------------- basics


def test_perfect_predictions():
    gts = [
        gt([[0, 0, 10, 10], [30, 30, 20, 8], [100, 50, 50, 60]], [0, 1, 2]),
        gt([[5, 5, 12, 12], [60, 0, 7, 9]], [0, 0]),
    ]
    dets = [
        det([[5, 5], [40, 34], [125, 80]], [0.9, 0.8, 0.7], [0, 1, 2]),
        det([[11, 11], [63.5, 4.5]], [0.6, 0.55], [0, 0]),
    ]
    official = evaluate_point_ap(gts, dets, 3)
    clean = evaluate_point_ap(gts, dets, 3, clean=True)
    for tau in (0.5, 1, 2):
        np.testing.assert_allclose(official.per_class(tau), [PERFECT] * 3, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(clean.per_class(tau), [1.0, 1.0, 1.0])
    m = official.metrics()
    for name in ("mAP", "AP@0.5", "AP@1", "AP@2"):
        assert m[name] == pytest.approx(PERFECT, abs=1e-12)
        assert clean.metrics()[name] == 1.0
    assert m["MAE"] == 0 and m["RMSE"] == 0


def test_no_predictions():
    gts = [gt([[0, 0, 10, 10], [20, 20, 10, 10]], [0, 1]), gt([[0, 0, 10, 10]], [0])]
    dets = [det([], [], []), det([], [], [])]
    official = evaluate_point_ap(gts, dets, 3)
    for tau in (0.5, 1, 2):
        # class 2 has no GT and no detection: 1 under the official conventions
        np.testing.assert_array_equal(official.per_class(tau), [0.0, 0.0, 1.0])
    assert official.metrics()["mAP"] == pytest.approx(1 / 3)
    clean = evaluate_point_ap(gts, dets, 3, clean=True)
    np.testing.assert_array_equal(clean.per_class(1)[:2], [0.0, 0.0])
    assert math.isnan(clean.per_class(1)[2])
    assert clean.metrics()["mAP"] == 0.0
    # counting: predicted 0 per image vs 2 and 1 GT
    assert official.mae == pytest.approx(1.5)
    assert official.rmse == pytest.approx(math.sqrt(2.5))


def test_duplicate_detection_is_false_positive():
    # GT A centre (5, 5), GT B centre (45, 5). Ranked: on A (TP), again on A (FP: A is
    # taken and B is 3.9 box widths away), on B (TP). npos = 2.
    boxes = [[0, 0, 10, 10], [40, 0, 10, 10]]
    points = [[5, 5], [6, 5], [45, 5]]
    scores = [0.9, 0.8, 0.7]
    official = single(boxes, points, scores)
    clean = single(boxes, points, scores, clean=True)
    # official: 1 TP reaches j = 0..49 at rank 1 (P = 1); 2 TPs reach j = 50..99 at
    # rank 3 (P = 2/3); j = 100 never.
    expected_official = (50 * 1 + 50 * (2 / 3)) / 101
    # clean: 1 TP reaches j = 0..50 (P = 1); 2 TPs reach j = 51..100 (P = 2/3).
    expected_clean = (51 * 1 + 50 * (2 / 3)) / 101
    for tau in (0.5, 1, 2):
        assert ap(official, tau) == pytest.approx(expected_official, abs=1e-12)
        assert ap(clean, tau) == pytest.approx(expected_clean, abs=1e-12)


@pytest.mark.parametrize(
    "extra_point, extra_score, expected",
    [
        # the top-ranked detection lies on the crowd GT: dropped, the rest is perfect
        ((45, 5), 0.9, PERFECT),
        # the same detection far from everything is a FP ranked first:
        # j = 0 -> P = 0 at rank 1; j = 1..99 -> P = 1/2 at rank 2; j = 100 never
        ((200, 200), 0.9, 99 * 0.5 / 101),
    ],
)
def test_detection_near_crowd_is_dropped(extra_point, extra_score, expected):
    gts = [gt([[0, 0, 10, 10], [40, 0, 10, 10]], [0, 0], iscrowd=[0, 1])]
    dets = [det([extra_point, (5, 5)], [extra_score, 0.8], [0, 0])]
    result = evaluate_point_ap(gts, dets, 1)
    for tau in (0.5, 1, 2):
        assert ap(result, tau) == pytest.approx(expected, abs=1e-12)
    assert result.num_positives[0, 0] == 1


def test_matched_detection_near_crowd_stays_true_positive():
    # The regular GT and the crowd GT overlap; the detection matches the regular one.
    gts = [gt([[0, 0, 10, 10], [0, 0, 12, 12]], [0, 0], iscrowd=[0, 1])]
    dets = [det([(5.5, 5.5), (6, 6)], [0.9, 0.8], [0, 0])]
    result = evaluate_point_ap(gts, dets, 1, clean=True)
    # rank 1 TP (regular GT), rank 2 unmatched but on the crowd GT: dropped -> perfect
    assert ap(result, 1) == 1.0


def test_size_range_turns_gt_into_ignore():
    # class 0: small GT (size 10, centre (5, 5)) and large GT (size 100, centre (250, 250))
    # class 1: GT of size exactly 32 (16 x 64): medium, not small.
    gts = [gt([[0, 0, 10, 10], [200, 200, 100, 100], [400, 400, 16, 64]], [0, 0, 1])]
    # The detection on the large GT ranks first, so counting it as a FP in "small"
    # would give 99 * 0.5 / 101 instead of a perfect score.
    dets = [det([(250, 250), (5, 5)], [0.9, 0.8], [0, 0])]
    official = evaluate_point_ap(gts, dets, 2)
    clean = evaluate_point_ap(gts, dets, 2, clean=True)
    assert official.range_names == ("all", "small", "medium", "large")
    np.testing.assert_array_equal(official.num_positives, [[2, 1], [1, 0], [0, 1], [1, 0]])
    for tau in (0.5, 1, 2):
        assert ap(official, tau, "all") == pytest.approx(PERFECT, abs=1e-12)
        assert ap(official, tau, "small") == pytest.approx(PERFECT, abs=1e-12)
        assert ap(official, tau, "large") == pytest.approx(PERFECT, abs=1e-12)
        # medium: both GTs of class 0 are ignore, both detections dropped, none left
        assert ap(official, tau, "medium") == 1.0
        assert math.isnan(ap(clean, tau, "medium"))
        assert ap(clean, tau, "small") == 1.0
        # class 1 has a GT but no detection
        assert ap(official, tau, "medium", cls=1) == 0.0
        assert ap(official, tau, "small", cls=1) == 1.0  # no positive, no detection
    # the same layout with the tinyperson preset: GT of size 0.5 is outside [1, 1e5)
    tiny = evaluate_point_ap(
        [gt([[0, 0, 0.5, 0.5], [20, 20, 4, 4]], [0, 0])],
        [det([(0.25, 0.25), (22, 22)], [0.9, 0.8], [0, 0])],
        1,
        size_ranges="tinyperson",
    )
    assert tiny.range_names == tuple(SIZE_RANGE_PRESETS["tinyperson"])
    assert tiny.num_positives[0, 0] == 1
    assert ap(tiny, 1, "all") == pytest.approx(PERFECT, abs=1e-12)  # first one dropped
    assert ap(tiny, 1, "tiny1") == pytest.approx(PERFECT, abs=1e-12)
    assert ap(tiny, 1, "tiny2") == 1.0  # nothing in [8, 12), both detections dropped


# ----------------------------------------------------------------------------- ties


def _tie_layout(score_a, score_b):
    # G1 centre (50, 50), G2 centre (60, 50), boxes 10 x 10.
    # d_a (54, 50): 0.4 from G1, 0.6 from G2.  d_b (49, 50): 0.1 from G1, 1.1 from G2.
    # d_a comes first in the input; with equal scores it also ranks first.
    gts = [gt([[45, 45, 10, 10], [55, 45, 10, 10]], [0, 0])]
    dets = [det([(54, 50), (49, 50)], [score_a, score_b], [0, 0])]
    return evaluate_point_ap(gts, dets, 1)


def test_equal_scores_match_closest_pair_first():
    result = _tie_layout(0.7, 0.7)
    # Block rule: (d_b, G1) at 0.1 first, then d_a takes G2 at 0.6.
    # tau = 1: both TP -> perfect. (d_a first would take G1 and leave d_b 1.1 from G2:
    # TP, FP -> 50 / 101.)
    assert ap(result, 1) == pytest.approx(PERFECT, abs=1e-12)
    # tau = 0.5: d_b TP, d_a FP (G2 is 0.6 away). Ranked d_a (FP), d_b (TP):
    # j = 0 -> 0, j = 1..49 -> 1/2. (d_a first: TP, FP -> 50 / 101.)
    assert ap(result, 0.5) == pytest.approx(49 * 0.5 / 101, abs=1e-12)
    # tau = 2: both TP either way.
    assert ap(result, 2) == pytest.approx(PERFECT, abs=1e-12)


def test_scores_within_eps_form_a_block():
    base = np.float32(0.05)
    nearly = float(np.nextafter(base, np.float32(1)))  # about 3.7e-9 above: same block
    assert ap(_tie_layout(nearly, float(base)), 1) == pytest.approx(PERFECT, abs=1e-12)
    # 1e-7 apart: separate blocks, d_a (higher) first takes G1, d_b is a FP
    assert ap(_tie_layout(0.0501, 0.05), 1) == pytest.approx(50 / 101, abs=1e-12)
    assert ap(_tie_layout(0.0500001, 0.05), 1) == pytest.approx(50 / 101, abs=1e-12)


def test_tie_blocks_are_anchored_at_their_first_score():
    s = np.float32(0.05)
    step = np.float32(6e-9)  # two steps exceed 1e-8, one does not
    scores = np.array([0.9, 0.9, s, s - step, s - 2 * step, 0.9, 0.8], dtype=np.float32)
    group_start = np.array([1, 0, 0, 0, 0, 1, 0], dtype=bool)
    blocks = _tie_blocks(scores, group_start)
    # [0.9 0.9] [s s-step] [s-2step] | [0.9] [0.8]
    np.testing.assert_array_equal(blocks, [0, 0, 1, 1, 2, 3, 4])


def test_tie_blocks_equal_a_sequential_scan():
    """Random groups of descending float32 scores with steps below, at and above
    TIE_EPS, against the rule written as one loop."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    eps = np.float32(1e-8)
    for _ in range(30):
        sizes = rng.integers(1, 60, int(rng.integers(1, 8)))
        scores, group_start = [], []
        for size in sizes:
            base = np.float32(rng.choice([0.9, 0.3, 0.05, 0.001]))
            steps = rng.choice([0, 1, 2, 3, 40], size - 1)  # float32 ulps below base
            group = [base]
            for step in steps:
                value = group[-1]
                for _ in range(step):
                    value = np.nextafter(value, np.float32(0))
                group.append(value)
            scores += group
            group_start += [True] + [False] * (size - 1)
        scores = np.asarray(scores, np.float32)
        group_start = np.asarray(group_start)
        want, first, block = [], None, -1
        for k, s in enumerate(scores):
            if group_start[k] or abs(s - first) >= eps:
                block, first = block + 1, s
            want.append(block)
        np.testing.assert_array_equal(_tie_blocks(scores, group_start), want)


# ----------------------------------------------------------------------------- classes


def test_class_without_gt():
    gts = [gt([[0, 0, 10, 10]], [0])]
    # class 0: perfect; class 1: one detection, no GT; class 2: nothing at all
    dets = [det([(5, 5), (50, 50)], [0.9, 0.8], [0, 1])]
    official = evaluate_point_ap(gts, dets, 3)
    np.testing.assert_allclose(official.per_class(1), [PERFECT, 0.0, 1.0], rtol=0, atol=1e-12)
    assert official.metrics()["AP@1"] == pytest.approx((PERFECT + 0 + 1) / 3, abs=1e-12)
    clean = evaluate_point_ap(gts, dets, 3, clean=True)
    assert clean.per_class(1)[0] == 1.0
    assert np.isnan(clean.per_class(1)[1:]).all()
    assert clean.metrics()["AP@1"] == 1.0


def test_per_class_results_and_metric_names():
    gts = [gt([[0, 0, 10, 10], [100, 0, 10, 10]], [0, 1])]
    # class 0 perfect; class 1: FP (rank 1) then TP -> (0 + 99 / 2) / 101
    dets = [det([(5, 5), (150, 150), (105, 5)], [0.9, 0.8, 0.7], [0, 1, 1])]
    ranges = {"all": (0, 1e5), "s": (0, 32)}
    result = evaluate_point_ap(gts, dets, 2, taus=(1, 2), size_ranges=ranges)
    for tau in (1, 2):
        for name in ("all", "s"):
            np.testing.assert_allclose(
                result.per_class(tau, name), [PERFECT, 49.5 / 101], rtol=0, atol=1e-12
            )
    assert result.ap.shape == (2, 2, 2)
    m = result.metrics()
    assert list(m) == ["mAP", "AP@1", "AP@2", "mAP/s", "AP@1/s", "AP@2/s", "MAE", "RMSE"]
    assert m["mAP"] == pytest.approx((PERFECT + 49.5 / 101) / 2, abs=1e-12)
    with pytest.raises(KeyError):
        result.per_class(0.5)
    with pytest.raises(KeyError):
        result.per_class(1, "medium")
    names = list(evaluate_point_ap(gts, dets, 2).metrics())
    assert names[:8] == ["mAP", "AP@0.5", "AP@1", "AP@2", "mAP/small", "AP@0.5/small", "AP@1/small",
                         "AP@2/small"]
    assert names[-2:] == ["MAE", "RMSE"]


# ----------------------------------------------------------------------------- AP rule


def test_no_monotone_envelope():
    # npos = 2, ranked FP, TP, TP: precisions 0, 1/2, 2/3.
    boxes = [[0, 0, 10, 10], [40, 0, 10, 10]]
    points = [(200, 200), (5, 5), (45, 5)]
    scores = [0.9, 0.8, 0.7]
    official = ap(single(boxes, points, scores), 1)
    clean = ap(single(boxes, points, scores, clean=True), 1)
    # no envelope (official recall): j = 0 -> 0 (rank 1), j = 1..49 -> 1/2, j = 50..99 -> 2/3
    assert official == pytest.approx((49 * 0.5 + 50 * (2 / 3)) / 101, abs=1e-12)
    # COCO's envelope would read max precision at or after the rank: 2/3 for j = 0..99
    with_envelope = 100 * (2 / 3) / 101
    assert abs(official - with_envelope) > 0.05
    # clean: j = 0 -> 0, j = 1..50 -> 1/2, j = 51..100 -> 2/3 (envelope: 2/3 everywhere)
    assert clean == pytest.approx((50 * 0.5 + 50 * (2 / 3)) / 101, abs=1e-12)


def test_tau_boundary_matches():
    # Four classes, each one GT box (0, 0, 4, 2): centre (2, 1), normalisers 4 and 2.
    boxes = [[0, 0, 4, 2]] * 4
    gts = [gt(boxes, [0, 1, 2, 3])]
    points = [
        (4.0, 1.0),  # class 0: d = 2/4 = 0.5 exactly
        (2.0, 3.0),  # class 1: d = 2/2 = 1 exactly
        (10.0, 1.0),  # class 2: d = 8/4 = 2 exactly
        (float(np.nextafter(4.0, 5.0)), 1.0),  # class 3: just over 0.5
    ]
    dets = [det(points, [0.9, 0.8, 0.7, 0.6], [0, 1, 2, 3])]
    result = evaluate_point_ap(gts, dets, 4)
    p = PERFECT
    np.testing.assert_allclose(result.per_class(0.5), [p, 0, 0, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.per_class(1), [p, p, 0, p], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.per_class(2), [p, p, p, p], rtol=0, atol=1e-12)


def test_max_dets_truncation_is_per_image_and_class():
    # Per class: three FPs above one TP. Two classes in one image: 8 detections.
    gts = [gt([[0, 0, 10, 10], [50, 50, 10, 10]], [0, 1])]
    points = [(100, 100), (200, 200), (300, 300), (5, 5)]
    points += [(400, 400), (500, 500), (600, 600), (55, 55)]
    scores = [0.9, 0.8, 0.7, 0.6] * 2
    dets = [det(points, scores, [0] * 4 + [1] * 4)]
    cut = evaluate_point_ap(gts, dets, 2, max_dets=3)
    np.testing.assert_array_equal(cut.per_class(1), [0.0, 0.0])  # the TPs are cut
    kept = evaluate_point_ap(gts, dets, 2, max_dets=4)
    # TP at rank 4: j = 0 -> 0, j = 1..99 -> 1/4
    np.testing.assert_allclose(kept.per_class(1), [99 * 0.25 / 101] * 2, rtol=0, atol=1e-12)
    # the count does not depend on max_dets
    assert cut.mae == kept.mae == 6.0


def test_counting_mae_rmse():
    gts = [
        gt(
            [[0, 0, 5, 5], [10, 0, 5, 5], [20, 0, 5, 5], [30, 0, 5, 5]],
            [0, 0, 1, 0],
            iscrowd=[0, 0, 0, 1],
        ),
        gt([], []),
        gt([[0, 0, 5, 5]], [1]),
    ]
    dets = [
        det([(0, 0)] * 3, [0.9, 0.5, 0.2], [0, 0, 1]),  # 1 above 0.5 (strictly) vs 3 GT
        det([(0, 0)] * 2, [0.7, 0.8], [1, 0]),  # 2 vs 0
        det([(0, 0)] * 2, [0.51, 0.3], [1, 0]),  # 1 vs 1
    ]
    r = evaluate_point_ap(gts, dets, 2)
    assert r.mae == pytest.approx(4 / 3)  # |-2|, |2|, 0
    assert r.rmse == pytest.approx(math.sqrt(8 / 3))
    assert r.metrics()["MAE"] == r.mae and r.metrics()["RMSE"] == r.rmse
    r = evaluate_point_ap(gts, dets, 2, count_score_thresh=0.25)
    assert r.mae == pytest.approx(4 / 3)  # -1, 2, 1
    assert r.rmse == pytest.approx(math.sqrt(2))


def test_pooling_across_images():
    # One class, two images, one GT each. Ranked: img0 TP (0.9), img1 FP (0.8), img1 TP
    # (0.7): like the duplicate case, (50 + 50 * 2/3) / 101.
    gts = [gt([[0, 0, 10, 10]], [0]), gt([[0, 0, 10, 10]], [0])]
    dets = [det([(5, 5)], [0.9], [0]), det([(80, 80), (5, 5)], [0.8, 0.7], [0, 0])]
    r = evaluate_point_ap(gts, dets, 1)
    assert ap(r, 1) == pytest.approx((50 + 50 * 2 / 3) / 101, abs=1e-12)


def test_input_validation():
    good_gt, good_det = gt([[0, 0, 10, 10]], [0]), det([(5, 5)], [0.9], [0])
    with pytest.raises(ValueError, match="images"):
        evaluate_point_ap([good_gt], [good_det, good_det], 1)
    with pytest.raises(ValueError, match="class 1"):
        evaluate_point_ap([good_gt], [det([(5, 5)], [0.9], [1])], 1)
    with pytest.raises(ValueError, match="class 3"):
        evaluate_point_ap([gt([[0, 0, 10, 10]], [3])], [good_det], 1)
    with pytest.raises(ValueError, match="image 1: GT box .* no area"):
        evaluate_point_ap([good_gt, gt([[0, 0, 0, 10]], [0])], [good_det, good_det], 1)
    with pytest.raises(ValueError, match="shape"):
        evaluate_point_ap([{"boxes": np.zeros((1, 3)), "classes": [0]}], [good_det], 1)
    with pytest.raises(ValueError, match="entries"):
        evaluate_point_ap([good_gt], [det([(5, 5)], [0.9, 0.8], [0])], 1)
    with pytest.raises(ValueError, match="preset"):
        evaluate_point_ap([good_gt], [good_det], 1, size_ranges="voc")
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_point_ap([good_gt], [good_det], 1, max_dets=0)
    with pytest.raises(ValueError, match="taus"):
        evaluate_point_ap([good_gt], [good_det], 1, taus=(1, 1.0))


# ----------------------------------------------------------------------------- random cases


def reference_point_ap(gts, dets, num_classes, taus, ranges, max_dets, clean):
    """The rules written as plain loops, one (tau, range, class, image) at a time."""
    thresholds = np.linspace(0.0, 1.0, 101)
    eps = np.float32(1e-8)
    out = np.zeros((len(taus), len(ranges), num_classes))
    for t, tau in enumerate(taus):
        for r, (lo, hi) in enumerate(ranges):
            for c in range(num_classes):
                pool, npos = [], 0
                for i, (g, d) in enumerate(zip(gts, dets)):
                    sel = np.asarray(g["classes"]) == c
                    boxes = np.asarray(g["boxes"], dtype=np.float64).reshape(-1, 4)[sel]
                    crowd = np.asarray(g.get("iscrowd", np.zeros(sel.size)))[sel] != 0
                    size = np.sqrt(boxes[:, 2] * boxes[:, 3])
                    ignore = crowd | (size < lo) | (size >= hi)
                    npos += int((~ignore).sum())
                    centre = boxes[:, :2] + boxes[:, 2:] / 2
                    dsel = np.flatnonzero(np.asarray(d["classes"]) == c)
                    scores = np.asarray(d["scores"], dtype=np.float64).astype(np.float32)[dsel]
                    points = np.asarray(d["points"], dtype=np.float64).reshape(-1, 2)[dsel]
                    order = sorted(range(len(dsel)), key=lambda k: -float(scores[k]))[:max_dets]
                    s, p = scores[order], points[order]

                    def d2(k, j):
                        dx = (p[k, 0] - centre[j, 0]) / boxes[j, 2]
                        dy = (p[k, 1] - centre[j, 1]) / boxes[j, 3]
                        return dx * dx + dy * dy

                    blocks, start = [], 0
                    for k in range(1, len(s) + 1):
                        if k == len(s) or abs(s[k] - s[start]) >= eps:
                            blocks.append(list(range(start, k)))
                            start = k
                    matched, taken = [False] * len(s), set()
                    for block in blocks:
                        free = list(block)
                        while True:
                            best = None
                            for k in free:
                                for j in range(len(boxes)):
                                    if ignore[j] or j in taken:
                                        continue
                                    v = d2(k, j)
                                    if v <= tau * tau and (best is None or v < best[0]):
                                        best = (v, k, j)
                            if best is None:
                                break
                            matched[best[1]] = True
                            taken.add(best[2])
                            free.remove(best[1])
                    for k in range(len(s)):
                        dropped = not matched[k] and any(
                            ignore[j] and d2(k, j) <= tau * tau for j in range(len(boxes))
                        )
                        if not dropped:
                            pool.append((float(s[k]), matched[k]))
                pool.sort(key=lambda e: -e[0])
                if npos == 0:
                    out[t, r, c] = np.nan if clean else float(not pool)
                    continue
                tp = np.cumsum([m for _, m in pool])
                total = 0.0
                for j, thr in enumerate(thresholds):
                    for rank, k in enumerate(tp):
                        reached = k * 100 >= j * npos if clean else k / (npos + 1e-12) >= thr
                        if reached:
                            total += k / (rank + 1)
                            break
                out[t, r, c] = total / 101
    return out


def random_case(rng):
    num_classes = int(rng.integers(1, 4))
    gts, dets = [], []
    score_levels = np.array([0.9, 0.7, 0.5, 0.3, 0.05], dtype=np.float32)
    integer_grid = rng.random() < 0.5
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.integers(0, 7))
        wh = rng.uniform(4, 130, (n, 2))
        xy = rng.uniform(0, 80, (n, 2))
        k = int(rng.integers(0, 10))
        if n:  # most detections near a GT centre, so that they compete
            src = rng.integers(0, n, k)
            pts = xy[src] + wh[src] / 2 + rng.normal(0, 0.6, (k, 2)) * wh[src]
        else:
            pts = rng.uniform(0, 150, (k, 2))
        far = rng.random(k) < 0.2
        pts[far] = rng.uniform(0, 300, (int(far.sum()), 2))
        if integer_grid:  # exact distance ties between pairs
            xy, wh, pts = np.round(xy), np.round(wh), np.round(pts)
        scores = score_levels[rng.integers(0, len(score_levels), k)]
        # some scores within 1e-8 of a level, some just outside
        nudge = rng.random(k)
        scores = np.where(nudge < 0.1, np.nextafter(scores, np.float32(1)), scores)
        scores = np.where(nudge > 0.9, rng.random(k).astype(np.float32), scores)
        gts.append(gt(np.hstack([xy, wh]), rng.integers(0, num_classes, n), rng.random(n) < 0.15))
        dets.append(det(pts, scores, rng.integers(0, num_classes, k)))
    return gts, dets, num_classes


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
@pytest.mark.parametrize("clean", [False, True])
def test_random_cases_agree_with_loop_reference(clean, backend):
    taus = (0.5, 1.0, 2.0)
    ranges = {"all": (0, 1e5), "small": (0, 32), "medium": (32, 96), "large": (96, 1e5)}
    for seed in range(150):
        rng = np.random.default_rng(seed)
        gts, dets, num_classes = random_case(rng)
        max_dets = int(rng.choice([1, 2, 3, 100]))
        got = evaluate_point_ap(
            gts, dets, num_classes, taus=taus, size_ranges=ranges, max_dets=max_dets, clean=clean,
            backend=backend,
        )
        want = reference_point_ap(
            gts, dets, num_classes, taus, list(ranges.values()), max_dets, clean
        )
        np.testing.assert_allclose(got.ap, want, rtol=0, atol=1e-12, err_msg=f"seed {seed}")


@pytest.mark.parametrize("chunk", [1, 7, 8192])
def test_greedy_match_equals_the_sequential_walk(monkeypatch, chunk):
    """Edges in priority order, accepted when both ends are free: the rounds, run on
    chunks of `chunk` edges, against the walk itself on fresh random edge lists."""
    monkeypatch.setattr(matcher, "_MATCH_CHUNK", chunk)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for _ in range(10):
        num_dets, num_gts = int(rng.integers(1, 400)), int(rng.integers(1, 300))
        num_edges = int(rng.integers(0, 12 * num_dets))
        dets = rng.integers(0, num_dets, num_edges)
        gts = rng.integers(0, num_gts, num_edges)
        if rng.random() < 0.5:  # each detection's edges together, as single-score blocks give
            order = np.argsort(dets, kind="stable")
            dets, gts = dets[order], gts[order]
        want = np.zeros(num_dets, bool)
        taken = np.zeros(num_gts, bool)
        for d, g in zip(dets.tolist(), gts.tolist()):
            if not want[d] and not taken[g]:
                want[d] = taken[g] = True
        np.testing.assert_array_equal(_greedy_match(dets, gts, num_dets, num_gts), want)


def test_pair_priority_equals_lexsort():
    """Fresh random pairs with exact distance ties, distances one ulp apart, and blocks
    large enough that block + d2 cannot tell close distances apart."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for _ in range(20):
        n = int(rng.integers(1, 5000))
        block = np.sort(rng.integers(0, 300, n)) * int(rng.choice([1, 1 << 20, 1 << 40]))
        d2 = rng.integers(0, 6, n) / 4.0  # many exact ties
        near = rng.random(n) < 0.3
        d2[near] = np.nextafter(d2[near], 5.0)
        if rng.random() < 0.3:
            d2 = rng.random(n) * 4.0
        det = rng.integers(0, 400, n)
        gt = rng.permutation(n)  # (det, gt) pairs are distinct
        np.testing.assert_array_equal(
            _pair_priority(block, d2, det, gt), np.lexsort((gt, det, d2, block))
        )
    assert _pair_priority(block[:0], d2[:0], det[:0], gt[:0]).size == 0
    zero = np.zeros(5)
    np.testing.assert_array_equal(_pair_priority(np.zeros(5, np.int64), zero, np.arange(5)[::-1],
                                                 np.zeros(5, np.int64)), np.arange(5)[::-1])


def brute_force_pairs(det_key, det_pts, gt_key, gt_centers, gt_wh, max_tau):
    """Every (detection, GT) pair with equal keys within max_tau, measured as the
    rules say, sorted."""
    delta = (det_pts[:, None] - gt_centers[None]) / gt_wh[None]
    full = (delta ** 2).sum(-1)
    return np.argwhere((full <= max_tau ** 2) & (det_key[:, None] == gt_key[None])), full


def assert_candidates_exact(det_key, det_pts, gt_key, gt_centers, gt_wh, max_tau):
    dets, gts, d2 = _candidate_pairs(det_key, det_pts, gt_key, gt_centers, gt_wh, max_tau)
    want, full = brute_force_pairs(det_key, det_pts, gt_key, gt_centers, gt_wh, max_tau)
    got = np.stack([dets, gts], 1)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    np.testing.assert_array_equal(d2, full[dets, gts])


def test_candidate_pairs_equal_brute_force_on_dense_images():
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for _ in range(20):
        n, k = int(rng.integers(1, 400)), int(rng.integers(1, 800))
        gt_centers = rng.uniform(-20, 500, (n, 2))
        gt_wh = np.exp(rng.uniform(np.log(2), np.log(200), (n, 2)))  # tiny to huge boxes
        det_pts = np.concatenate([gt_centers[rng.integers(0, n, k // 2)]
                                  + rng.normal(0, 10, (k // 2, 2)),
                                  rng.uniform(-50, 550, (k - k // 2, 2))])
        if rng.random() < 0.5:
            det_pts = np.round(det_pts)  # exact ties on strip and band edges
        det_key = rng.integers(0, 3, k)
        gt_key = rng.integers(0, 3, n)
        max_tau = float(rng.choice([0.5, 1.0, 2.0]))
        assert_candidates_exact(det_key, det_pts, gt_key, gt_centers, gt_wh, max_tau)


def test_candidate_pairs_keep_pairs_exactly_at_tau():
    """Integer centres and sizes, detections exactly max_tau box sizes away along an
    axis or at (3, 4, 5) offsets, and others one ulp further: the exact boundary."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for _ in range(20):
        n = int(rng.integers(1, 200))
        gt_centers = rng.integers(0, 300, (n, 2)).astype(np.float64)
        gt_wh = rng.integers(1, 40, (n, 2)).astype(np.float64)
        max_tau = float(rng.choice([0.5, 1.0, 2.0, 5.0]))
        src = rng.integers(0, n, 4 * n)
        step = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [0.6, 0.8], [-0.8, 0.6]])
        offset = step[rng.integers(0, len(step), 4 * n)] * max_tau * gt_wh[src]
        det_pts = gt_centers[src] + offset
        further = rng.random(4 * n) < 0.3
        det_pts[further] = np.nextafter(det_pts[further], det_pts[further] + offset[further])
        keys = np.zeros(n, np.int64)
        assert_candidates_exact(np.zeros(4 * n, np.int64), det_pts, keys, gt_centers, gt_wh,
                                max_tau)


@pytest.mark.parametrize("scale", [1 << 28, 1 << 60])
def test_candidate_pairs_with_huge_keys(scale):
    """Keys too large to combine with the strip number are ranked densely first; GT
    keys no detection has find nothing. With 1 << 60 and the 16 strips of 40 px
    here, key * 16 + strip would wrap around and mix keys up."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    n, k = 300, 600
    gt_centers = rng.uniform(0, 640, (n, 2))
    gt_wh = np.full((n, 2), 10.0)  # tau 2: strips of 2 * 2 * 10 px
    det_pts = np.clip(gt_centers[rng.integers(0, n, k)] + rng.normal(0, 8, (k, 2)), 0, 639)
    det_pts[:2, 1] = 0, 639  # strips 0 to 15
    det_key = rng.integers(0, 4, k) * scale - 2 * scale
    gt_key = rng.integers(0, 5, n) * scale - 2 * scale
    assert_candidates_exact(det_key, det_pts, gt_key, gt_centers, gt_wh, 2.0)


def test_candidate_pairs_with_many_strips_and_keys():
    """About 2^20 strips times 1,100 keys: the (key, strip) numbers are ranked densely
    too, and GT strips without a detection of their key are dropped."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    k = 1100
    det_pts = np.stack([rng.uniform(0, 100, k), rng.uniform(0, 5e6, k)], 1)
    det_key = rng.permutation(k)
    src = rng.integers(0, k, 800)
    gt_centers = det_pts[src] + rng.normal(0, 1, (800, 2))
    gt_wh = rng.uniform(0.5, 2, (800, 2))
    gt_key = np.where(rng.random(800) < 0.8, det_key[src], k + 5)
    assert_candidates_exact(det_key, det_pts, gt_key, gt_centers, gt_wh, 2.0)


def test_candidate_pairs_far_from_the_origin():
    """Coordinates beyond the search's clipping limit, and boxes as wide as the
    spread: the margin grows past 3 px, bands reach the neighbouring (key, strip)
    and the (key, strip) is compared pair by pair (else pairs come out twice)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    n, k = 120, 400
    gt_centers = np.stack([rng.uniform(-3e12, 3e12, n), rng.uniform(0, 4000, n)], 1)
    gt_wh = np.where(rng.random((n, 1)) < 0.3, [[1e13, 1000.0]], [[10.0, 10.0]])
    det_pts = np.stack([rng.uniform(-3e12, 3e12, k), rng.uniform(0, 4000, k)], 1)
    det_pts[: k // 4, 0] = -3e12  # at the left edge of every (key, strip)
    det_key, gt_key = rng.integers(0, 3, k), rng.integers(0, 3, n)
    assert_candidates_exact(det_key, det_pts, gt_key, gt_centers, gt_wh, 2.0)


def test_candidate_pairs_with_huge_boxes():
    """Boxes of 1e308 px (median too): the reaches are capped, so the strips stay
    finite and such a GT pairs with every detection of its key."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    n, k = 80, 300
    gt_centers = rng.uniform(0, 500, (n, 2))
    gt_wh = np.where(rng.random((n, 2)) < 0.6, 1e308, rng.uniform(2, 30, (n, 2)))
    det_pts = rng.uniform(-1e6, 1e6, (k, 2))
    det_pts[: k // 2] = gt_centers[rng.integers(0, n, k // 2)] + rng.normal(0, 5, (k // 2, 2))
    assert_candidates_exact(rng.integers(0, 2, k), det_pts, rng.integers(0, 2, n), gt_centers,
                            gt_wh, 2.0)


@pytest.mark.parametrize("limit", [1 << 30, 1])
def test_matching_order_equals_a_stable_sort(monkeypatch, limit):
    """(key, descending float32 score, index) on fresh random inputs with tied,
    negative and signed-zero scores; limit 1 takes the lexsort path."""
    monkeypatch.setattr(point_ap, "_ORDER_KEY_LIMIT", limit)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for _ in range(20):
        n = int(rng.integers(0, 3000))
        key = rng.integers(0, int(rng.choice([1, 5, 10 ** 6])), n)
        scores = rng.choice(np.array([0.9, 0.5, 0.0, -0.0, -0.3, 1e-30, -1e-30, 7.0],
                                     np.float32), n)
        rand = rng.random(n) < 0.5
        scores[rand] = rng.normal(0, 1, int(rand.sum())).astype(np.float32)
        want = np.lexsort((np.arange(n), -scores, key)) if n else np.zeros(0, np.int64)
        np.testing.assert_array_equal(_matching_order(key, scores), want)
