"""The markdown tables of the pipeline's results (tools/run_pipeline.py): how the
training points changed (semantic variance and distance per size range, coarse ->
refined), the localizers' point-AP and counting metrics, and both over several seeds
(mean ± std)."""
import math

from cpr_d2.evaluation.seed_stats import aggregate_seeds
from cpr_d2.evaluation.semantic_variance import compare_point_jsons

__all__ = ["LOCALIZER_METRICS", "change_percent", "localizer_rows", "localizer_table",
           "markdown_table", "seeds_localizer_rows", "seeds_training_rows", "summarize_seeds",
           "training_points_rows"]

LOCALIZER_METRICS = ("AP@0.5", "AP@1", "AP@2", "mAP", "MAE", "RMSE")
# Column of the localizer tables that shows the score threshold counting used.
COUNT_THRESHOLD_COLUMN = "count thresh"


def _pct(new, old):
    if not (old and math.isfinite(old) and math.isfinite(new)):
        return ""
    return f"{100 * (new / old - 1):+.1f}%"


def training_points_rows(coarse, refined):
    """Rows (range, RSV coarse, RSV refined, change, |o| coarse, |o| refined, change) from
    two point jsons with true boxes, matched by annotation id."""
    comparison = compare_point_jsons(coarse, refined, sources=("coarse", "refined"))
    rows = []
    for name in comparison.a:
        a, b = comparison.a[name], comparison.b[name]
        rows.append({
            "range": name, "objects": a.objects,
            "rsv_coarse": a.rsv, "rsv_refined": b.rsv, "rsv_change_%": _pct(b.rsv, a.rsv),
            "dist_coarse": a.mean_distance, "dist_refined": b.mean_distance,
            "dist_change_%": _pct(b.mean_distance, a.mean_distance),
            "worse_%": comparison.worse[name],
        })
    return rows


def localizer_rows(metrics_by_name):
    """Rows of the localizer table from {name: point-AP metrics dict (or None)}. The
    counting threshold and its source (the metrics' ``count_threshold`` and
    ``count_threshold_source``) are None when the metrics do not have them."""
    rows = []
    for name, metrics in metrics_by_name.items():
        metrics = metrics or {}
        rows.append({"trained on": name, **{k: metrics.get(k) for k in LOCALIZER_METRICS},
                     "count threshold": metrics.get("count_threshold"),
                     "count threshold source": metrics.get("count_threshold_source"),
                     "count rule": metrics.get("count_rule")})
    return rows


def _threshold_cell(value, rule=None):
    """The counting threshold; with the soft count (the metrics' ``count_rule`` "soft"),
    which counts without it, marked as such."""
    cell = "n/a" if value is None else _cell(value)
    return f"{cell}, soft count" if rule == "soft" else cell


def localizer_table(rows):
    """The markdown localizer table of ``localizer_rows``: the metrics and the counting
    threshold ("n/a" when the metrics do not record it)."""
    shown = [{**{k: r.get(k) for k in ("trained on",) + LOCALIZER_METRICS},
              COUNT_THRESHOLD_COLUMN: _threshold_cell(r.get("count threshold"),
                                                      r.get("count rule"))} for r in rows]
    return markdown_table(shown)


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}" if abs(value) >= 100 \
            else f"{value:.2f}"
    return str(value)


def markdown_table(rows, columns=None):
    if not rows:
        return ""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _is_finite(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def summarize_seeds(per_seed):
    """``{name: {"mean", "std", "n", "values"}}`` over seeds from ``{seed: {name: value}}``
    (``aggregate_seeds``). A metric that is missing or not a finite number in some seed
    (e.g. the RSV change of a size range without objects) keeps its values, with None
    in their place, and gets mean and std None."""
    seeds = list(per_seed)
    names = []
    for seed in seeds:
        names += [n for n in per_seed[seed] if n not in names]
    complete = [n for n in names if all(_is_finite(per_seed[s].get(n)) for s in seeds)]
    done = aggregate_seeds({s: {n: per_seed[s][n] for n in complete} for s in seeds}) \
        if complete else {}
    out = {}
    for name in names:
        out[name] = done.get(name) or {
            "mean": None, "std": None, "n": len(seeds),
            "values": [per_seed[s].get(name) if _is_finite(per_seed[s].get(name)) else None
                       for s in seeds]}
    return out


def _mean_std_cell(summary):
    if summary["mean"] is None:
        return "-"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def seeds_localizer_rows(metrics_by_seed):
    """The localizer table over seeds.

    Args:
        metrics_by_seed: ``{seed: {localizer name: point-AP metrics dict}}``.

    Returns:
        ``(rows, summary)``: markdown rows (per localizer, one row per seed, then its
        mean ± std over the seeds) and ``{localizer name: summarize_seeds(...)}`` of
        ``LOCALIZER_METRICS``.
    """
    seeds = list(metrics_by_seed)
    names = list(metrics_by_seed[seeds[0]])
    rows, summary = [], {}
    for name in names:
        per_seed = {}
        for seed in seeds:
            metrics = metrics_by_seed[seed].get(name) or {}
            per_seed[seed] = {k: metrics.get(k) for k in LOCALIZER_METRICS}
            rows.append({"trained on": name, "seed": seed, **per_seed[seed],
                         COUNT_THRESHOLD_COLUMN: _threshold_cell(metrics.get("count_threshold"),
                                                                 metrics.get("count_rule"))})
        summary[name] = summarize_seeds(per_seed)
        rows.append({"trained on": name, "seed": "mean ± std",
                     **{k: _mean_std_cell(summary[name][k]) for k in LOCALIZER_METRICS},
                     COUNT_THRESHOLD_COLUMN: ""})
    return rows, summary


def change_percent(new, old):
    """``100 (new / old - 1)``, or None when either is missing or not finite or old is 0."""
    if not (_is_finite(new) and _is_finite(old)) or old == 0:
        return None
    return 100.0 * (new / old - 1.0)


def seeds_training_rows(points_by_seed):
    """The training-points table over seeds: the change coarse -> refined, in %, of RSV
    and ``|o|`` per size range.

    Args:
        points_by_seed: ``{seed: training_points_rows(...)}``.

    Returns:
        ``(rows, summary)``: markdown rows (a range per row; a column per seed, then
        mean ± std) and ``{range: {"objects", "rsv_change_%": ..., "dist_change_%": ...}}``
        with ``summarize_seeds`` summaries.
    """
    seeds = list(points_by_seed)
    by_range = {seed: {r["range"]: r for r in rows} for seed, rows in points_by_seed.items()}
    ranges = [r["range"] for r in points_by_seed[seeds[0]]]
    rows, summary = [], {}
    for name in ranges:
        per_seed = {}
        for seed in seeds:
            r = by_range[seed].get(name, {})
            per_seed[seed] = {"rsv_change_%": change_percent(r.get("rsv_refined"),
                                                             r.get("rsv_coarse")),
                              "dist_change_%": change_percent(r.get("dist_refined"),
                                                              r.get("dist_coarse"))}
        stats = summarize_seeds(per_seed)
        summary[name] = {"objects": by_range[seeds[0]][name].get("objects"), **stats}
        row = {"range": name, "objects": summary[name]["objects"]}
        for key, label in (("rsv_change_%", "RSV"), ("dist_change_%", "\\|o\\|")):
            for seed, value in zip(seeds, stats[key]["values"]):
                row[f"{label} seed {seed}"] = "-" if value is None else f"{value:+.1f}%"
            row[f"{label} mean ± std"] = (
                "-" if stats[key]["mean"] is None
                else f"{stats[key]['mean']:+.1f} ± {stats[key]['std']:.1f}%")
        rows.append(row)
    return rows, summary
