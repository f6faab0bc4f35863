#!/usr/bin/env python
"""Candidate per-object trust signals of cross-fitted refinement, judged against true
boxes the signals never see (docs/cprnet.md, "Trusting a refinement without true
boxes": "Other signals tried").

    .venv/bin/python benchmarks/trust_signals.py \\
        --crossfit DIR/refine_export/crossfit_2 [--second-seed DIR2/refine_export/crossfit_2] \\
        [--dataset forest]

DIR/refine_export/crossfit_2 is what `refine_export --folds 2` leaves (folds.json, with
the source json and the fold of each image; fold_<k>/config.yaml and model_final.pth);
--dataset is the registered dataset it refined, whose json (folds.json's source_json)
holds true boxes. Each fold model refines every training image twice, as it
is and averaged with its left-right flip; the flipped view alone is recovered from the
two (the average of two views). For each image, the written point is the flip-averaged
point of the model that never saw it (what refine_export --folds 2 writes with the
flip config), s its move from the coarse point. Per moved object it computes:

* support: <o, s> / |s|, o the move of the model that saw the image (the report's);
* away: how far s heads away from the nearest coarse point of another object (the
  report's);
* view disagreement: -|s0 - sh| / |s|, the written model's two views (s0, sh);
* score, num_kept, size, move: what the row holds;
* improvement over o: |o| - |s - o|, how much nearer the written point lies to the
  other model's point than the coarse point does (that point taken for the truth);
* move / neighbour distance: |s| over the distance from the coarse point to the
  nearest other coarse point on its image (0 without one), the move on the
  objects' own scale (the report's since it was confirmed on two more seeds);
  the report's trust is the mean rank of support, away and this one;
* with --second-seed (the fold models of another seed, same folds): support from both
  models that saw the image, and from all three other models;

and prints the area under the ROC curve of each (high = trusted) as a predictor of
"made worse" against "made better" (cpr_d2.evaluation.semantic_variance.made_worse),
alone, as the mean rank with support and away, and as the mean rank with the
report's three (support, away, move / neighbour distance). No signal is fitted:
ranks only.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

# Scripts in benchmarks/ run with this folder on sys.path.
from trust_vs_boxes import auc  # noqa: E402

import cpr_d2  # noqa: E402,F401  (registers the datasets and models)
from cpr_d2.config import get_cpr_d2_cfg  # noqa: E402
from cpr_d2.data.classes import resolve_num_classes  # noqa: E402
from cpr_d2.data.point_json import read_json, true_box  # noqa: E402
from cpr_d2.engine.checkpoint import load_inference_weights  # noqa: E402
from cpr_d2.engine.refine import refine_dataset  # noqa: E402
from cpr_d2.engine.trust import _nearest_neighbours  # noqa: E402
from cpr_d2.evaluation.semantic_variance import made_worse  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

FOLDS = 2


def views(crossfit_dir, dataset):
    """{(fold, views): refine_dataset rows}: views 1 = the image as it is, 2 = averaged
    with its left-right flip."""
    out = {}
    for k in range(FOLDS):
        fold_dir = os.path.join(crossfit_dir, f"fold_{k}")
        for flips in ([], ["horizontal"]):
            cfg = get_cpr_d2_cfg()
            cfg.merge_from_file(os.path.join(fold_dir, "config.yaml"))
            cfg.MODEL.CPR.REFINE_FLIPS = flips
            cfg.DATALOADER.NUM_WORKERS = 0
            cfg.DATASETS.TRAIN = (dataset,)
            if cfg.MODEL.CPR.NUM_CLASSES == 0:
                resolve_num_classes(cfg, training=False)
            model = build_model(cfg)
            load_inference_weights(model, os.path.join(fold_dir, "model_final.pth"))
            out[(k, 1 + len(flips))] = refine_dataset(cfg, model, dataset, progress=False)
            print(f"  refined {dataset} with fold {k}'s model, {1 + len(flips)} view(s)",
                  flush=True)
    return out


def signals(rows_a, rows_b, anns, folds):
    """(names -> (M,) arrays of the moved objects, (M,) made worse, (M,) made better)."""
    ids = sorted(i for i in rows_a[(0, 2)] if i in anns and true_box(anns[i]) is not None)
    obj = {}
    for i in ids:
        k = folds[anns[i]["image_id"]]
        coarse = np.asarray(rows_a[(k, 2)][i]["coarse_point"], float)
        mean = np.asarray(rows_a[(k, 2)][i]["point"], float)
        plain = np.asarray(rows_a[(k, 1)][i]["point"], float)
        o = {"s": mean - coarse, "s0": plain - coarse, "sh": mean + (mean - plain) - coarse,
             "o": np.asarray(rows_a[(1 - k, 2)][i]["point"], float) - coarse,
             "coarse_point": coarse, "image_id": anns[i]["image_id"], "box": true_box(anns[i]),
             **{f: rows_a[(k, 2)][i][f] for f in ("score", "num_kept", "size")}}
        if rows_b is not None:
            o["b_out"] = np.asarray(rows_b[(k, 2)][i]["point"], float) - coarse
            o["b_in"] = np.asarray(rows_b[(1 - k, 2)][i]["point"], float) - coarse
        obj[i] = o
    nearest = _nearest_neighbours(obj, {})  # (direction, distance), as the report's trust
    moved = [i for i in ids if np.linalg.norm(obj[i]["s"]) > 0]
    out = {}
    for i in moved:
        o = obj[i]
        s = o["s"]
        length = float(np.linalg.norm(s))
        d, spacing = nearest[i]
        values = {"support": o["o"] @ s / length,
                  "away": 0.0 if d is None else -float(s @ d) / length,
                  "view disagreement": -float(np.linalg.norm(o["s0"] - o["sh"])) / length,
                  "score": o["score"], "num_kept": o["num_kept"], "size": o["size"],
                  "move": length,
                  "improvement over o": float(np.linalg.norm(o["o"]) - np.linalg.norm(s - o["o"])),
                  "move / neighbour distance": 0.0 if spacing is None else length / spacing}
        if rows_b is not None:
            values["support, both that saw it"] = np.mean([o["o"], o["b_in"]], axis=0) @ s / length
            values["support, all three others"] = (
                np.mean([o["o"], o["b_in"], o["b_out"]], axis=0) @ s / length)
        for name, v in values.items():
            out.setdefault(name, []).append(float(v))
    coarse = np.array([obj[i]["coarse_point"] for i in moved])
    point = coarse + np.array([obj[i]["s"] for i in moved])
    boxes = np.array([obj[i]["box"] for i in moved])
    return ({k: np.array(v) for k, v in out.items()}, made_worse(coarse, point, boxes),
            made_worse(point, coarse, boxes))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crossfit", required=True,
                        help="refine_export's OUTPUT_DIR/refine_export/crossfit_2")
    parser.add_argument("--second-seed", default=None,
                        help="the crossfit_2 folder of another seed's fold models")
    parser.add_argument("--dataset", default="forest", help="registered point dataset")
    args = parser.parse_args(argv)
    settings = read_json(os.path.join(args.crossfit, "folds.json"), "folds.json")
    if settings.get("folds") != FOLDS:
        sys.exit(f"{args.crossfit}: fold models of --folds {settings.get('folds')}; this "
                 f"benchmark judges --folds {FOLDS}")
    source = read_json(settings["source_json"], "point json")
    anns = {a["id"]: a for a in source["annotations"] if not a.get("iscrowd")}
    folds = {im["id"]: settings["images"][str(im["id"])] for im in source["images"]}
    rows_a = views(args.crossfit, args.dataset)
    rows_b = None
    if args.second_seed:
        other = read_json(os.path.join(args.second_seed, "folds.json"), "folds.json")
        if other.get("images") != settings["images"]:
            sys.exit(f"{args.second_seed}: its folds differ from {args.crossfit}'s; give the "
                     "fold models of the same json and --folds")
        rows_b = views(args.second_seed, args.dataset)
    values, worse, better = signals(rows_a, rows_b, anns, folds)
    judged = worse | better
    print(f"\n{args.crossfit}: {len(worse)} moved objects, {int(worse.sum())} made worse, "
          f"{int(better.sum())} made better")
    ranks = {k: rankdata(v) for k, v in values.items()}
    base = ranks["support"] + ranks["away"]
    trust = base + ranks["move / neighbour distance"]
    trust_ranks = ("support", "away", "move / neighbour distance")
    print("| signal (high = trusted) | AUC alone | AUC, mean rank with support and away | "
          "AUC, mean rank with the report's three |")
    print("| --- | ---: | ---: | ---: |")
    for name, v in values.items():
        with_base = (math.nan if name in ("support", "away")
                     else auc(-(base + ranks[name])[judged], worse[judged]))
        with_trust = (math.nan if name in trust_ranks
                      else auc(-(trust + ranks[name])[judged], worse[judged]))
        print(f"| {name} | {auc(-v[judged], worse[judged]):.3f} | {with_base:.3f} | "
              f"{with_trust:.3f} |")
    print(f"| support and away (the report's trust before 2026-12-07) | "
          f"{auc(-base[judged], worse[judged]):.3f} | | |")
    print(f"| trust (the report's: support, away, move / neighbour distance) | "
          f"{auc(-trust[judged], worse[judged]):.3f} | | |")


if __name__ == "__main__":
    main()
