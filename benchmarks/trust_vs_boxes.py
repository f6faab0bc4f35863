#!/usr/bin/env python
"""Judge the trust report of cross-fitted refinement against true boxes it never saw.

    .venv/bin/python benchmarks/trust_vs_boxes.py refined_seed0.json [refined_seed1.json ...]

Each json is refine_export --folds K output (either --keep-unreliable mode) whose
annotations have true boxes. Per json it prints:

* the area under the ROC curve of each per-object signal as a predictor of "made
  worse" against "made better" (cpr_d2.evaluation.semantic_variance.made_worse, both
  directions; objects neither worse nor better are left out): 1 - refine_reliability,
  refine_disagreement, the move length, and both over the size estimated from the
  kept points (refine_size), for comparison;
* the semantic variance change and the share made worse, per size range of the true
  box, for the refinement as written by --keep-unreliable refined and by safe mode
  (--keep-unreliable coarse), both against the coarse points.
"""
import argparse
import copy
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpr_d2.data.point_json import read_json, true_box  # noqa: E402
from cpr_d2.evaluation.semantic_variance import (  # noqa: E402
    DEFAULT_SIZE_RANGES, compare_point_jsons, made_worse)

RANGES = tuple(name for name, _, _ in DEFAULT_SIZE_RANGES)


def auc(scores, positive):
    """Area under the ROC curve of `scores` for the bool labels `positive` (ties count
    half); nan without both kinds."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def variants(data):
    """(coarse, refined, safe) jsons: the coarse points, every refined point, and the
    refined points with the coarse point kept where refine_reliable is False."""
    out = [copy.deepcopy(data) for _ in range(3)]
    for coarse, refined, safe in zip(*(d["annotations"] for d in out)):
        if "coarse_point" not in coarse:
            continue
        point = coarse.get("refine_point", coarse["point"])
        coarse["point"] = coarse["coarse_point"]
        refined["point"] = point
        safe["point"] = coarse["coarse_point"] if coarse.get("refine_reliable") is False else point
    return out


def signals(data):
    rows = []
    for ann in data["annotations"]:
        box = true_box(ann)
        if box is None or ann.get("refine_reliability") is None or ann.get("iscrowd"):
            continue
        point = np.asarray(ann.get("refine_point", ann["point"]), float)
        coarse = np.asarray(ann["coarse_point"], float)
        move = float(np.linalg.norm(point - coarse))
        size = ann.get("refine_size") or 0.0
        disagreement = ann.get("refine_disagreement") or 0.0
        rows.append((coarse, point, box, ann["refine_reliability"], disagreement, move,
                     disagreement / size if size else math.inf, move / size if size else 0.0))
    coarse, point, boxes = (np.array([r[k] for r in rows]) for k in range(3))
    worse = made_worse(coarse, point, boxes)
    better = made_worse(point, coarse, boxes)
    judged = worse | better
    return {name: auc(np.array([r[k] for r in rows])[judged] * sign, worse[judged])
            for name, k, sign in (("1 - reliability", 3, -1), ("disagreement", 4, 1),
                                  ("move", 5, 1), ("disagreement / size", 6, 1),
                                  ("move / size", 7, 1))}, int(worse.sum()), int(better.sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsons", nargs="+", help="refine_export --folds K outputs")
    args = parser.parse_args(argv)
    for path in args.jsons:
        data = read_json(path, "refined json")
        aucs, worse, better = signals(data)
        print(f"\n{path}: {worse} objects made worse, {better} made better")
        print("AUC (worse vs better): " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
        coarse, refined, safe = variants(data)
        kept = sum(a.get("refine_reliable") is False for a in data["annotations"])
        print(f"safe mode keeps the coarse point of {kept} objects")
        print("| size range | objects | RSV refined % | RSV safe % | |o| refined % | |o| safe % "
              "| worse refined % | worse safe % |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        full = compare_point_jsons(coarse, refined)
        guarded = compare_point_jsons(coarse, safe)
        for name in RANGES:
            cells = [full.change(name, "rsv"), guarded.change(name, "rsv"),
                     full.change(name, "mean_distance"), guarded.change(name, "mean_distance"),
                     full.worse[name], guarded.worse[name]]
            print(f"| {name} | {full.a[name].objects} | "
                  + " | ".join(f"{c:+.1f}" if k < 4 else f"{c:.1f}" for k, c in enumerate(cells))
                  + " |")


if __name__ == "__main__":
    main()
