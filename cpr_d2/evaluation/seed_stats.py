"""Statistics over training seeds and test images: mean and spread of a metric over
seeds, and a paired bootstrap over test images of the difference in point AP between
two localizers.

The bootstrap recomputes both APs with :func:`cpr_d2.evaluation.point_ap.evaluate_point_ap`
on every resampled set of images, so each of its samples is exactly what the evaluator
reports for that set of images. Only the one distance threshold and the one size range
that the statistic needs are evaluated, which gives the same AP as a full evaluation
(thresholds and size ranges are matched independently).
"""
import math
import numbers
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from cpr_d2.evaluation.point_ap import evaluate_point_ap

__all__ = ["BootstrapResult", "aggregate_seeds", "mean_std", "paired_bootstrap_ap"]


def _finite_float(value, what):
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{what} is {value!r}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}, not a finite number")
    return value


def mean_std(values) -> Tuple[float, float]:
    """``(mean, sample standard deviation)`` of ``values``; the deviation uses ``n - 1``
    (ddof=1) and is NaN for a single value.

    Raises ``ValueError`` on an empty sequence or a value that is not a finite number
    (``None``, NaN, inf): nothing is dropped silently.
    """
    values = list(values)
    if not values:
        raise ValueError("mean_std: no values (an empty list has no mean)")
    arr = np.array([_finite_float(v, f"mean_std: value #{i}") for i, v in enumerate(values)],
                   dtype=np.float64)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return mean, std


def aggregate_seeds(per_seed: Mapping) -> Dict[str, Dict]:
    """Mean and spread over seeds of every metric.

    Args:
        per_seed: ``{seed: {metric name: value}}``. Every seed must have the same
            metrics.

    Returns:
        ``{metric name: {"mean", "std", "n", "values"}}``, metrics in the first seed's
        order, ``values`` in the order of ``per_seed`` (see :func:`mean_std`).

    Raises ``ValueError`` when there is no seed, when a seed lacks a metric another
    seed has (naming both), or when a value is not a finite number.
    """
    if not per_seed:
        raise ValueError("aggregate_seeds: no seeds")
    seeds = list(per_seed)
    names = []
    for seed in seeds:
        for name in per_seed[seed]:
            if name not in names:
                names.append(name)
    out = {}
    for name in names:
        missing = [s for s in seeds if name not in per_seed[s]]
        if missing:
            has = next(s for s in seeds if name in per_seed[s])
            raise ValueError(f"aggregate_seeds: seed {missing[0]!r} has no metric {name!r} "
                             f"(seed {has!r} has it); every seed needs the same metrics")
        values = [_finite_float(per_seed[s][name], f"aggregate_seeds: seed {s!r}, metric "
                                f"{name!r}") for s in seeds]
        mean, std = mean_std(values)
        out[name] = {"mean": mean, "std": std, "n": len(values), "values": values}
    return out


@dataclass(frozen=True)
class BootstrapResult:
    """Output of :func:`paired_bootstrap_ap`. Values are AP fractions (as
    :func:`evaluate_point_ap` gives them), differences ``AP(b) - AP(a)``.

    Attributes:
        estimate: the statistic on the full set of images: the mean over seeds of
            ``AP(b) - AP(a)``.
        lower, upper: the percentile interval of the bootstrap samples
            (``confidence`` 0.95: the 2.5th and 97.5th percentiles).
        ap_a, ap_b: ``AP`` of a and b on the full set, one per seed.
        samples: the statistic of every bootstrap sample, ``(num_samples,)``.
        num_undefined: samples without a statistic (NaN in ``samples``): with
            ``clean=True``, resamples without any GT in the size range. The interval
            is over the others; 0 with the default conventions.
        tau, confidence, num_samples, seed, num_images, num_seeds: the settings.
    """

    estimate: float
    lower: float
    upper: float
    ap_a: Tuple[float, ...]
    ap_b: Tuple[float, ...]
    samples: np.ndarray
    tau: float
    confidence: float
    num_samples: int
    seed: int
    num_images: int
    num_seeds: int
    num_undefined: int = 0

    def to_dict(self) -> Dict:
        """Everything but ``samples``, as plain json-ready values."""
        return {"estimate": self.estimate, "lower": self.lower, "upper": self.upper,
                "ap_a": list(self.ap_a), "ap_b": list(self.ap_b), "tau": self.tau,
                "confidence": self.confidence, "num_samples": self.num_samples,
                "seed": self.seed, "num_images": self.num_images, "num_seeds": self.num_seeds,
                "num_undefined": self.num_undefined}


def _runs(gts, dets_a, dets_b):
    """The list of ``(gts, dets_a, dets_b)`` triples from either calling form."""
    if dets_a is None and dets_b is None:
        runs = list(gts)
        if not runs:
            raise ValueError("paired_bootstrap_ap: no (gts, dets_a, dets_b) triples given")
        for k, run in enumerate(runs):
            if not (isinstance(run, (tuple, list)) and len(run) == 3):
                raise ValueError(
                    f"paired_bootstrap_ap: entry {k} is not a (gts, dets_a, dets_b) triple; pass "
                    "gts, dets_a and dets_b for one seed, or a list of such triples (and no "
                    "dets_a / dets_b) for several")
    elif dets_a is None or dets_b is None:
        raise ValueError("paired_bootstrap_ap: pass both dets_a and dets_b (one seed), or "
                         "neither (gts is then a list of (gts, dets_a, dets_b) triples)")
    else:
        runs = [(gts, dets_a, dets_b)]
    runs = [tuple(list(part) for part in run) for run in runs]
    num_images = len(runs[0][0])
    if num_images == 0:
        raise ValueError("paired_bootstrap_ap: no images to resample")
    for k, (g, a, b) in enumerate(runs):
        where = f" (seed entry {k})" if len(runs) > 1 else ""
        if len(g) != num_images:
            raise ValueError(
                f"paired_bootstrap_ap: seed entry {k} has GT for {len(g)} images, entry 0 for "
                f"{num_images}; every seed must be evaluated on the same images, in the same "
                "order")
        if len(a) != num_images or len(b) != num_images:
            raise ValueError(
                f"paired_bootstrap_ap{where}: GT for {num_images} images but dets_a for "
                f"{len(a)} and dets_b for {len(b)}; give one entry per image (an empty one "
                "for an image without detections)")
    return runs, num_images


def paired_bootstrap_ap(gts, dets_a: Optional[Sequence[Mapping]] = None,
                        dets_b: Optional[Sequence[Mapping]] = None,
                        num_classes: Optional[int] = None, tau: float = 0.5,
                        num_samples: int = 2000, seed: int = 0, *, confidence: float = 0.95,
                        size_range: Tuple[float, float] = (0.0, 1e5), max_dets: int = 100,
                        clean: bool = False, backend: str = "auto",
                        device: Optional[str] = None) -> BootstrapResult:
    """Paired bootstrap over test images of ``AP@tau(b) - AP@tau(a)``.

    Two calling forms:

    * one seed: ``paired_bootstrap_ap(gts, dets_a, dets_b, num_classes)``, the three
      per-image lists in the format of :func:`evaluate_point_ap`;
    * several seeds pooled: ``paired_bootstrap_ap([(gts, dets_a, dets_b), ...],
      num_classes=C)``, one triple per seed, all on the same images in the same order.

    Every bootstrap sample draws ``num_images`` image indices with replacement, once,
    and uses them for a and b and for every seed (the pairing); its statistic is the
    mean over seeds of ``AP(b) - AP(a)``, both recomputed by
    :func:`evaluate_point_ap` on the resampled images. The draws come from
    ``numpy.random.default_rng(seed)``, so the same inputs and seed give the same
    result.

    Args:
        tau: the distance threshold of the AP.
        num_samples: bootstrap samples; each costs 2-3 ms per seed for 9 images of a
            few hundred points on a 2-core CPU (3 seeds x 2000 samples: 11-18 s).
        seed: seed of the resampling.
        confidence: the interval covers this central share of the samples.
        size_range: ``(lo, hi)`` of ``sqrt(w*h)`` of the GTs that count (the evaluator's
            range ``all``; ``(1, 1e5)`` for the "tinyperson" preset).
        max_dets, clean, backend, device: as in :func:`evaluate_point_ap`.

    Returns:
        :class:`BootstrapResult`, in AP fractions.
    """
    runs, num_images = _runs(gts, dets_a, dets_b)
    num_samples = _checked_num_samples(num_classes, num_samples, confidence)
    ap = _ap_function(num_classes, tau, size_range, max_dets, clean, backend, device)
    ap_a, ap_b = _full_set_aps(runs, ap)
    estimate = float(np.mean([b - a for a, b in zip(ap_a, ap_b)]))
    samples = _bootstrap_samples(runs, ap, num_images, num_samples, seed)
    lower, upper, num_undefined = _percentile_interval(samples, confidence)
    return BootstrapResult(
        estimate=estimate, lower=lower, upper=upper, ap_a=ap_a, ap_b=ap_b, samples=samples,
        tau=float(tau), confidence=float(confidence), num_samples=num_samples, seed=seed,
        num_images=num_images, num_seeds=len(runs), num_undefined=num_undefined)


def _checked_num_samples(num_classes, num_samples, confidence):
    """paired_bootstrap_ap's settings checked; returns num_samples as an int."""
    if num_classes is None:
        raise ValueError("paired_bootstrap_ap: num_classes is required")
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"paired_bootstrap_ap: num_samples must be a positive integer, "
                         f"got {num_samples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap_ap: confidence must lie in (0, 1), got {confidence!r}")
    return int(num_samples)


def _ap_function(num_classes, tau, size_range, max_dets, clean, backend, device):
    """A function (gts, dets) -> AP@tau over size_range, as evaluate_point_ap gives it."""
    lo, hi = (float(v) for v in size_range)
    kwargs = dict(taus=(float(tau),), size_ranges={"all": (lo, hi)}, max_dets=max_dets,
                  clean=clean, backend=backend, device=device)

    def ap(g, d):
        return float(evaluate_point_ap(g, d, num_classes, **kwargs).mean_ap[0, 0])

    return ap


def _full_set_aps(runs, ap):
    """(ap_a, ap_b): the AP of a and of b on the full set, one per seed; both finite."""
    ap_a = tuple(ap(g, a) for g, a, _ in runs)
    ap_b = tuple(ap(g, b) for g, _, b in runs)
    for name, values in (("a", ap_a), ("b", ap_b)):
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"paired_bootstrap_ap: AP of {name} is not a number on the full set "
                             "(no GT in the size range, with clean=True); nothing to compare")
    return ap_a, ap_b


def _bootstrap_samples(runs, ap, num_images, num_samples, seed):
    """(num_samples,) statistic of every resample: the mean over seeds of AP(b) - AP(a),
    on the same drawn images for a, b and every seed."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, num_images, size=(num_samples, num_images))
    samples = np.empty(num_samples, dtype=np.float64)
    for k, idx in enumerate(indices):
        diffs = []
        for g, a, b in runs:
            g_k = [g[i] for i in idx]
            diffs.append(ap(g_k, [b[i] for i in idx]) - ap(g_k, [a[i] for i in idx]))
        samples[k] = np.mean(diffs)
    return samples


def _percentile_interval(samples, confidence):
    """(lower, upper, num_undefined): the percentile interval of the finite samples and the
    number of the others."""
    # With clean=True a resample without GT in the range has no AP (NaN): such samples
    # say nothing about the difference; they are left out of the interval and counted.
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        raise ValueError("paired_bootstrap_ap: no bootstrap sample has an AP (no GT in the size "
                         "range of any resample)")
    # Rounded so that 0.95 gives the percentiles 2.5 and 97.5 exactly (1 - 0.95 is not 0.05).
    tail = round(50 * (1 - confidence), 10)
    lower, upper = (float(v) for v in np.percentile(finite, [tail, 100 - tail]))
    return lower, upper, int(samples.size - finite.size)
