#!/usr/bin/env python
"""Judge the trust report of cross-fitted refinement against true boxes it never saw.

    .venv/bin/python benchmarks/trust_vs_boxes.py refined_seed0.json [refined_seed1.json ...]

Each json is refine_export --folds K output (either --keep-unreliable mode) whose
annotations have true boxes. Per json it prints:

* the area under the ROC curve of each per-object signal as a predictor of "made
  worse" against "made better" (cpr_d2.evaluation.semantic_variance.made_worse, both
  directions; objects neither worse nor better are left out): 1 - refine_reliability,
  refine_disagreement, the move length, both over the size estimated from the kept
  points (refine_size), 1 - refine_agreement and 1 - refine_trust;
* the semantic variance change, the mean distance change and the share made worse,
  per size range of the true box, for the points each --keep-unreliable mode writes
  (refined, coarse, agreed: rebuilt from the json's fields, so a json written in any
  mode judges all three), against the coarse points.
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
    """(coarse, refined, safe, agreed) jsons: the coarse points, every refined point, the
    refined points with the coarse point kept where refine_reliable is False
    (--keep-unreliable coarse), and every point moved by refine_agreement of its move
    (--keep-unreliable agreed), whichever mode wrote `data`; in both safe modes the
    annotations marked refine_distrusted keep their coarse points."""
    out = [copy.deepcopy(data) for _ in range(4)]
    for coarse, refined, safe, agreed in zip(*(d["annotations"] for d in out)):
        if "coarse_point" not in coarse:
            continue
        start = np.asarray(coarse["coarse_point"], float)
        point = coarse.get("refine_point", coarse["point"])
        coarse["point"] = coarse["coarse_point"]
        refined["point"] = point
        # A class a dataset-level warning distrusts keeps its coarse points in both safe modes.
        distrusted = bool(coarse.get("refine_distrusted"))
        safe["point"] = (coarse["coarse_point"] if distrusted or coarse.get("refine_reliable")
                         is False else point)
        share = coarse.get("refine_agreement")
        share = 0.0 if distrusted else 1.0 if share is None else share
        agreed["point"] = (start + share * (np.asarray(point, float) - start)).tolist()
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
        agreement = ann.get("refine_agreement")
        trust = ann.get("refine_trust")
        rows.append((coarse, point, box, ann["refine_reliability"], disagreement, move,
                     disagreement / size if size else math.inf, move / size if size else 0.0,
                     math.nan if agreement is None else agreement,
                     math.nan if trust is None else trust))
    coarse, point, boxes = (np.array([r[k] for r in rows]) for k in range(3))
    worse = made_worse(coarse, point, boxes)
    better = made_worse(point, coarse, boxes)
    judged = worse | better
    named = (("1 - reliability", 3, -1), ("disagreement", 4, 1), ("move", 5, 1),
             ("disagreement / size", 6, 1), ("move / size", 7, 1), ("1 - agreement", 8, -1),
             ("1 - trust", 9, -1))
    aucs = {name: auc(np.array([r[k] for r in rows])[judged] * sign, worse[judged])
            for name, k, sign in named}
    return aucs, int(worse.sum()), int(better.sum())


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
        coarse, refined, safe, agreed = variants(data)
        kept = sum(a.get("refine_reliable") is False for a in data["annotations"])
        print(f"--keep-unreliable coarse keeps the coarse point of {kept} objects; "
              "agreed moves every object by refine_agreement of its move")
        modes = ("refined", "coarse", "agreed")
        print("| size range | objects | " + " | ".join(
            f"{what} {mode} %" for what in ("RSV", "|o|", "worse") for mode in modes) + " |")
        print("| --- | ---: | " + " | ".join(["---:"] * 9) + " |")
        changes = [compare_point_jsons(coarse, written) for written in (refined, safe, agreed)]
        for name in RANGES:
            cells = ([f"{c.change(name, 'rsv'):+.1f}" for c in changes]
                     + [f"{c.change(name, 'mean_distance'):+.1f}" for c in changes]
                     + [f"{c.worse[name]:.1f}" for c in changes])
            print(f"| {name} | {changes[0].a[name].objects} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
