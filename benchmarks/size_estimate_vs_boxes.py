#!/usr/bin/env python
"""Judge CPRNet's label-free size estimate against the true boxes it never sees.

    .venv/bin/python benchmarks/size_estimate_vs_boxes.py --config-file OUTPUT_DIR/config.yaml \\
        --dataset forest MODEL.WEIGHTS OUTPUT_DIR/model_final.pth

Give the config a training run wrote (OUTPUT_DIR/config.yaml: its class count is
resolved) and a registered dataset with true boxes. The model refines every object
(cpr_d2.engine.refine.refine_dataset) and reports the size it estimates from its kept
points (what the trust report's ranges and the adaptive regions use). The script
prints the correlation of that estimate with the true size sqrt(w h), that of the
distance to the nearest other annotated point of the class (the neighbour bound),
and the estimate's mean and quartiles per range of the true size (the evaluator's
ranges, cpr_d2.evaluation.semantic_variance.DEFAULT_SIZE_RANGES).
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def collect(dicts, rows):
    """(estimated size, true size, neighbour distance) arrays over the refined objects."""
    import torch

    from cpr_d2.data.point_json import true_box
    from cpr_d2.modeling.cpr_refine import nearest_neighbour_distance

    est, true, nn = [], [], []
    for record in dicts:
        anns = [a for a in record["annotations"] if a.get("id") in rows]
        if not anns:
            continue
        points = torch.tensor([rows[a["id"]]["coarse_point"] for a in anns], dtype=torch.float64)
        labels = torch.tensor([a["category_id"] for a in anns])
        for ann, dist in zip(anns, nearest_neighbour_distance(points, labels).tolist()):
            box = true_box(ann)
            if box is None or rows[ann["id"]]["size"] <= 0:
                continue
            est.append(rows[ann["id"]]["size"])
            true.append(math.sqrt(box[2] * box[3]))
            nn.append(dist)
    return np.array(est), np.array(true), np.array(nn)


def correlation(a, b):
    keep = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[keep], b[keep])[0, 1]) if keep.sum() > 2 else math.nan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a training run's config.yaml")
    parser.add_argument("--dataset", required=True, help="a registered dataset with true boxes")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    args = parser.parse_args(argv)

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.engine.refine import refine_dataset
    from cpr_d2.evaluation.semantic_variance import DEFAULT_SIZE_RANGES

    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    rows = refine_dataset(cfg, model, args.dataset)
    est, true, nn = collect(DatasetCatalog.get(args.dataset), rows)
    print(f"\n{args.dataset}: {len(est)} objects with a size estimate and a true box")
    print(f"correlation with the true size sqrt(w h): estimated size {correlation(est, true):+.2f}, "
          f"nearest-neighbour distance {correlation(nn, true):+.2f}")
    print("| true size | objects | estimate mean | estimate quartiles |")
    print("| --- | ---: | ---: | --- |")
    for name, lo, hi in DEFAULT_SIZE_RANGES:
        m = (true >= lo) & (true < hi)
        if not m.any():
            print(f"| {name} | 0 | - | - |")
            continue
        q = np.percentile(est[m], [25, 50, 75])
        print(f"| {name} | {m.sum()} | {est[m].mean():.1f} | {q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f} |")


if __name__ == "__main__":
    main()
