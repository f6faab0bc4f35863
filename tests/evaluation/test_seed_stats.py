"""Statistics over seeds and the paired bootstrap over test images
(cpr_d2/evaluation/seed_stats.py), on constructed values whose answers are known."""
import math

import numpy as np
import pytest

from cpr_d2.evaluation.point_ap import evaluate_point_ap
from cpr_d2.evaluation.seed_stats import aggregate_seeds, mean_std, paired_bootstrap_ap

# The published evaluator's recall quirk: a perfect detector scores 100/101.
PERFECT = 100 / 101


def test_mean_std_known_values():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5 / 3), rel=1e-15)  # ddof=1: 5 / (4 - 1)
    assert mean_std([2, 2, 2]) == (2.0, 0.0)
    assert mean_std(np.array([10.0, 20.0])) == (15.0, pytest.approx(math.sqrt(50)))
    mean, std = mean_std([7.5])
    assert mean == 7.5 and math.isnan(std)


@pytest.mark.parametrize("values, message", [
    ([], "no values"),
    ([1.0, float("nan")], "value #1 is nan"),
    ([1.0, float("inf"), 2.0], "value #1 is inf"),
    ([None, 1.0], "value #0 is None"),
    (["3"], "value #0 is '3', not a number"),
])
def test_mean_std_refuses_what_it_would_have_to_drop(values, message):
    with pytest.raises(ValueError, match=message):
        mean_std(values)


def test_aggregate_seeds_known_values_in_seed_order():
    per_seed = {2: {"AP@0.5": 30.0, "MAE": 1.0}, 0: {"AP@0.5": 10.0, "MAE": 3.0},
                1: {"AP@0.5": 20.0, "MAE": 2.0}}
    out = aggregate_seeds(per_seed)
    assert list(out) == ["AP@0.5", "MAE"]
    assert out["AP@0.5"] == {"mean": 20.0, "std": 10.0, "n": 3, "values": [30.0, 10.0, 20.0]}
    assert out["MAE"] == {"mean": 2.0, "std": 1.0, "n": 3, "values": [1.0, 3.0, 2.0]}
    one = aggregate_seeds({5: {"x": 4.0}})["x"]
    assert one["mean"] == 4.0 and one["n"] == 1 and math.isnan(one["std"])


def test_aggregate_seeds_errors_name_the_seed_and_metric():
    with pytest.raises(ValueError, match="seed 1 has no metric 'MAE' \\(seed 0 has it\\)"):
        aggregate_seeds({0: {"AP@0.5": 1.0, "MAE": 2.0}, 1: {"AP@0.5": 1.0}})
    with pytest.raises(ValueError, match="seed 0 has no metric 'RMSE' \\(seed 1 has it\\)"):
        aggregate_seeds({0: {"AP@0.5": 1.0}, 1: {"AP@0.5": 1.0, "RMSE": 2.0}})
    with pytest.raises(ValueError, match="seed 3, metric 'AP@1' is nan"):
        aggregate_seeds({0: {"AP@1": 1.0}, 3: {"AP@1": float("nan")}})
    with pytest.raises(ValueError, match="no seeds"):
        aggregate_seeds({})


# ----------------------------------------------------------------------------- bootstrap


def _image(k, n=4):
    """GT of one image: n disjoint 10 x 10 boxes, one class."""
    xy = np.stack([np.arange(n) * 40.0 + 5, np.full(n, 5.0 + k)], axis=1)
    return {"boxes": np.concatenate([xy, np.full((n, 2), 10.0)], axis=1),
            "classes": np.zeros(n, np.int64), "iscrowd": np.zeros(n, bool)}


def _perfect(gt, score0=0.9):
    n = len(gt["boxes"])
    return {"points": gt["boxes"][:, :2] + 5.0,
            "scores": (score0 - 0.01 * np.arange(n)).astype(np.float32),
            "classes": np.zeros(n, np.int64)}


EMPTY = {"points": np.zeros((0, 2)), "scores": np.zeros(0, np.float32),
         "classes": np.zeros(0, np.int64)}


def _noisy(gt, rng, extra=3):
    """Points near the centres (some outside tau) plus a few false positives."""
    centres = gt["boxes"][:, :2] + 5.0
    points = np.concatenate([centres + rng.normal(0, 4, centres.shape),
                             rng.uniform(0, 160, (extra, 2))])
    return {"points": points, "scores": rng.uniform(0, 1, len(points)).astype(np.float32),
            "classes": np.zeros(len(points), np.int64)}


def test_b_perfect_a_empty_gives_exactly_the_known_difference():
    gts = [_image(k) for k in range(5)]
    result = paired_bootstrap_ap(gts, [EMPTY] * 5, [_perfect(g) for g in gts], 1,
                                 num_samples=200)
    assert result.estimate == PERFECT
    assert result.lower == PERFECT and result.upper == PERFECT
    assert (result.samples == PERFECT).all()
    assert result.ap_a == (0.0,) and result.ap_b == (PERFECT,)
    assert (result.num_samples, result.seed, result.num_images, result.num_seeds) == (200, 0, 5, 1)
    clean = paired_bootstrap_ap(gts, [EMPTY] * 5, [_perfect(g) for g in gts], 1,
                                num_samples=50, clean=True)
    assert (clean.estimate, clean.lower, clean.upper) == (1.0, 1.0, 1.0)
    worse = paired_bootstrap_ap(gts, [_perfect(g) for g in gts], [EMPTY] * 5, 1, num_samples=50)
    assert (worse.estimate, worse.lower, worse.upper) == (-PERFECT, -PERFECT, -PERFECT)


def test_identical_localizers_give_exactly_zero(np_rng):
    gts = [_image(k) for k in range(6)]
    dets = [_noisy(g, np_rng) for g in gts]
    result = paired_bootstrap_ap(gts, dets, list(dets), 1, num_samples=300)
    assert 0 < result.ap_a[0] < 1  # a non-trivial AP, the same on both sides
    assert (result.estimate, result.lower, result.upper) == (0.0, 0.0, 0.0)


def _split_case():
    """b perfect and a empty on images 0-2, the reverse on images 3-5."""
    gts = [_image(k) for k in range(6)]
    a = [EMPTY] * 3 + [_perfect(g) for g in gts[3:]]
    b = [_perfect(g) for g in gts[:3]] + [EMPTY] * 3
    return gts, a, b


def test_better_on_some_images_worse_on_others_straddles_zero():
    gts, a, b = _split_case()
    result = paired_bootstrap_ap(gts, a, b, 1, num_samples=1000)
    assert result.estimate == 0.0  # the two halves are mirror images
    assert result.lower < 0 < result.upper
    assert result.lower == pytest.approx(-result.upper, abs=0.15)


def test_every_sample_is_evaluate_point_ap_on_the_resampled_images(np_rng):
    gts = [_image(k, n=3 + k % 3) for k in range(5)]
    a = [_noisy(g, np_rng) for g in gts]
    b = [_noisy(g, np_rng, extra=1) for g in gts]
    result = paired_bootstrap_ap(gts, a, b, 1, tau=1.0, num_samples=20, seed=7)
    # The point estimate is the full evaluator's AP@1 difference (all taus, all ranges).
    full = [evaluate_point_ap(gts, d, 1).metrics()["AP@1"] for d in (a, b)]
    assert result.estimate == full[1] - full[0]
    assert result.ap_a == (full[0],) and result.ap_b == (full[1],)
    draws = np.random.default_rng(7).integers(0, 5, size=(20, 5))
    for k in (0, 7, 19):
        idx = draws[k]
        ap = [evaluate_point_ap([gts[i] for i in idx], [d[i] for i in idx], 1,
                                taus=(1.0,)).metrics()["AP@1"] for d in (a, b)]
        assert result.samples[k] == ap[1] - ap[0]
    assert result.lower == np.percentile(result.samples, 2.5)
    assert result.upper == np.percentile(result.samples, 97.5)


def test_the_same_seed_reproduces_and_another_does_not(np_rng):
    gts = [_image(k) for k in range(6)]
    a = [_noisy(g, np_rng) for g in gts]
    b = [_noisy(g, np_rng) for g in gts]
    one = paired_bootstrap_ap(gts, a, b, 1, num_samples=100, seed=3)
    two = paired_bootstrap_ap(gts, a, b, 1, num_samples=100, seed=3)
    other = paired_bootstrap_ap(gts, a, b, 1, num_samples=100, seed=4)
    assert np.array_equal(one.samples, two.samples)
    assert (one.lower, one.upper) == (two.lower, two.upper)
    assert not np.array_equal(one.samples, other.samples)
    assert one.to_dict() == two.to_dict() and "samples" not in one.to_dict()


def test_pooled_seeds_share_the_resample_and_average_the_difference():
    gts, a, b = _split_case()
    # Seed 2 is seed 1 with a and b swapped: with the same images drawn for both seeds,
    # every sample's mean difference is exactly 0; independent draws would not cancel.
    mirrored = paired_bootstrap_ap([(gts, a, b), (gts, b, a)], num_classes=1, num_samples=300)
    assert (mirrored.samples == 0).all()
    assert (mirrored.estimate, mirrored.lower, mirrored.upper) == (0.0, 0.0, 0.0)
    assert mirrored.num_seeds == 2
    # A seed with a constant difference and one with none average to half of it.
    perfect = [_perfect(g) for g in gts]
    half = paired_bootstrap_ap([(gts, [EMPTY] * 6, perfect), (gts, perfect, perfect)],
                               num_classes=1, num_samples=100)
    assert (half.estimate, half.lower, half.upper) == (PERFECT / 2,) * 3
    assert half.ap_a == (0.0, PERFECT) and half.ap_b == (PERFECT, PERFECT)
    # One triple pooled is the single-seed form.
    single = paired_bootstrap_ap(gts, a, b, 1, num_samples=100, seed=5)
    pooled = paired_bootstrap_ap([(gts, a, b)], num_classes=1, num_samples=100, seed=5)
    assert np.array_equal(single.samples, pooled.samples)


def test_pooled_samples_are_the_mean_of_the_per_seed_samples(np_rng):
    gts = [_image(k) for k in range(4)]
    runs = [(gts, [_noisy(g, np_rng) for g in gts], [_noisy(g, np_rng) for g in gts])
            for _ in range(3)]
    pooled = paired_bootstrap_ap(runs, num_classes=1, num_samples=40, seed=11)
    each = [paired_bootstrap_ap(*run, 1, num_samples=40, seed=11) for run in runs]
    assert np.allclose(pooled.samples, np.mean([r.samples for r in each], axis=0),
                       rtol=0, atol=1e-15)
    assert pooled.estimate == pytest.approx(np.mean([r.estimate for r in each]), abs=1e-15)


def test_bootstrap_input_errors():
    gts, a, b = _split_case()
    with pytest.raises(ValueError, match="dets_a for 5 and dets_b for 6"):
        paired_bootstrap_ap(gts, a[:5], b, 1)
    with pytest.raises(ValueError, match="pass both dets_a and dets_b"):
        paired_bootstrap_ap(gts, a, None, 1)
    with pytest.raises(ValueError, match="num_classes is required"):
        paired_bootstrap_ap(gts, a, b)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        paired_bootstrap_ap(gts, a, b, 1, num_samples=0)
    with pytest.raises(ValueError, match="seed entry 1 has GT for 5 images, entry 0 for 6"):
        paired_bootstrap_ap([(gts, a, b), (gts[:5], a[:5], b[:5])], num_classes=1)
    with pytest.raises(ValueError, match="entry 0 is not a \\(gts, dets_a, dets_b\\) triple"):
        paired_bootstrap_ap([(gts, a)], num_classes=1)
    with pytest.raises(ValueError, match="no images"):
        paired_bootstrap_ap([], [], [], 1)
