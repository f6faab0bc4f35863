#!/usr/bin/env python
"""Where a P2PNet's duplicate points lie, and what the NMS box and score-map peaks do to them.

    .venv/bin/python benchmarks/p2p_duplicates.py RUN_DIR [RUN_DIR ...] \\
        --datasets forest forest_test [--boxes 12 16 20 24 28] [--peaks]

Each RUN_DIR is a P2PNet training run (its config.yaml and model_final.pth). Every image
of each dataset is predicted the way the config predicts (its NMS box, vote and test-time
flips). Then, per run and dataset:

- the kept points sorted, by decreasing score, into: "found" (the first point within
  d <= 0.5 of a tree no point found yet, d the point AP distance), "duplicate" (within
  d <= 1 of a tree a higher-scoring point found), "near" (within d <= 1 of a tree none
  found) and "elsewhere"; crowd and ignore regions are left out;
- the distance (Chebyshev, px, the metric of the NMS boxes) of each duplicate to its
  tree's found point, and of each found point to the nearest other found point
  (quartiles, and the share of found points with another within 24 px);
- AP@0.5 (all sizes, and < 32 / 32-96 px) with each NMS box of --boxes in place of the
  config's (the vote and the flips as configured), and with --peaks also with the
  config's box after keeping only candidates whose anchor scores the most of its 3 x 3
  anchors (one anchor per cell only).

Run on the training and the test datasets: a setting chosen on the training images is
one a new dataset could choose too (docs/p2pnet.md, "Post-processing against
duplicates").
"""
import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def predict(cfg, model, dataset):
    """[(points (N, 2), scores (N,), classes (N,))] per image of `dataset`, in its order,
    with the model's own inference."""
    import torch
    from detectron2.data import DatasetCatalog, build_detection_test_loader

    from cpr_d2.data.mapper import PointDatasetMapper

    loader = build_detection_test_loader(DatasetCatalog.get(dataset),
                                         mapper=PointDatasetMapper(cfg, is_train=False),
                                         num_workers=0)
    out = []
    model.eval()
    with torch.no_grad():
        for inputs in loader:
            for o in model(inputs):
                inst = o["instances"].to("cpu")
                out.append((inst.pred_points.double().numpy(), inst.scores.numpy(),
                            inst.pred_classes.numpy()))
    return out


def sort_points(points, scores, boxes):
    """(kinds, duplicate distances, found points' indices) of one image's kept points
    against its non-crowd true boxes (x, y, w, h): kinds[k] is "found", "duplicate",
    "near" or "elsewhere" (the module docstring); every duplicate's Chebyshev distance
    (px) to the found point of its tree."""
    kinds = np.full(len(points), "elsewhere", dtype=object)
    if not len(boxes):
        return kinds, np.zeros(0), np.zeros(0, dtype=np.int64)
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    d = np.sqrt((((points[:, None] - centres[None]) / boxes[None, :, 2:]) ** 2).sum(-1))
    owner = np.full(len(boxes), -1)
    dup = []
    for k in np.argsort(-scores, kind="stable"):
        free = np.flatnonzero((d[k] <= 0.5) & (owner < 0))
        if len(free):
            owner[free[np.argmin(d[k, free])]] = k
            kinds[k] = "found"
            continue
        g = int(np.argmin(d[k]))
        if d[k, g] <= 1.0 and owner[g] >= 0:
            kinds[k] = "duplicate"
            dup.append(np.abs(points[k] - points[owner[g]]).max())
        elif d[k, g] <= 1.0:
            kinds[k] = "near"
    return kinds, np.asarray(dup, dtype=np.float64), owner[owner >= 0]


def nearest_other(points):
    """Each point's Chebyshev distance (px) to the nearest other point (inf alone)."""
    if len(points) < 2:
        return np.full(len(points), np.inf)
    d = np.abs(points[:, None] - points[None]).max(-1)
    np.fill_diagonal(d, np.inf)
    return d.min(1)


@contextlib.contextmanager
def score_peaks(model_class):
    """Within the block, P2PNet keeps only candidates whose anchor's logit is the
    largest of its 3 x 3 anchors (per class); one anchor per cell only."""
    import torch
    import torch.nn.functional as F

    original = model_class._predict

    def predict_peaks(self, batched_inputs):
        images, logits, points, anchors = original(self, batched_inputs)
        if self.anchor_rows * self.anchor_cols != 1:
            raise ValueError("--peaks needs one anchor per cell (ANCHOR_ROWS = COLS = 1)")
        height, width = (int(s // self.stride) for s in images.tensor.shape[2:])
        b, a, c = logits.shape
        grid = logits.reshape(b, height, width, c).permute(0, 3, 1, 2)
        peak = grid >= F.max_pool2d(grid, 3, stride=1, padding=1)
        grid = torch.where(peak, grid, torch.full_like(grid, -1e4))
        return images, grid.permute(0, 2, 3, 1).reshape(b, a, c), points, anchors

    model_class._predict = predict_peaks
    try:
        yield
    finally:
        model_class._predict = original


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", required=True,
                        help="registered datasets (e.g. the training and the test set)")
    parser.add_argument("--boxes", type=float, nargs="+", default=[12.0, 16.0, 20.0, 24.0, 28.0],
                        help="NMS box sizes in px (default: 12 16 20 24 28)")
    parser.add_argument("--peaks", action="store_true",
                        help="also AP@0.5 with the 3 x 3 score-map peaks")
    parser.add_argument("runs", nargs="+", help="P2PNet run directories")
    args = parser.parse_args(argv)

    from count_rules import load_run  # this folder's; registers the datasets too

    from cpr_d2.evaluation.evaluator import load_point_ground_truth
    from cpr_d2.evaluation.point_ap import evaluate_point_ap
    from cpr_d2.modeling.p2pnet import P2PNet

    def ap(dets, gts, num_classes):
        m = evaluate_point_ap(gts, [{"points": p, "scores": s, "classes": c}
                                    for p, s, c in dets], num_classes).metrics()
        return "%.1f (%.1f / %.1f)" % tuple(100 * m[k] for k in
                                            ("AP@0.5", "AP@0.5/small", "AP@0.5/medium"))

    for run in args.runs:
        cfg, model = load_run(run)
        for dataset in args.datasets:
            names, _, gts = load_point_ground_truth(dataset)
            dets = predict(cfg, model, dataset)
            counts = dict.fromkeys(("found", "duplicate", "near", "elsewhere"), 0)
            dups, neighbours = [], []
            for gt, (points, scores, _) in zip(gts, dets):
                kinds, dup, found = sort_points(points, scores, gt["boxes"][~gt["iscrowd"]])
                for kind in counts:
                    counts[kind] += int((kinds == kind).sum())
                dups.append(dup)
                neighbours.append(nearest_other(points[found]))
            dups, neighbours = np.concatenate(dups), np.concatenate(neighbours)
            neighbours = neighbours[np.isfinite(neighbours)]
            q = (lambda v: "/".join(f"{x:.1f}" for x in np.percentile(v, [25, 50, 75]))
                 if len(v) else "-")
            print(f"{run} on {dataset}: kept points {counts}; duplicate to its tree's point "
                  f"(px, quartiles) {q(dups)}; found tree to the nearest other {q(neighbours)}, "
                  f"{100 * np.mean(neighbours < 24) if len(neighbours) else 0:.1f}% within 24 px")
            saved = model.nms_box_size
            try:
                for box in args.boxes:
                    model.nms_box_size = box
                    # The config's own box: the predictions above.
                    boxed = dets if box == saved else predict(cfg, model, dataset)
                    print(f"  NMS box {box:g} px: AP@0.5 (< 32 / 32-96 px) "
                          f"{ap(boxed, gts, len(names))}")
            finally:
                model.nms_box_size = saved
            if args.peaks:
                with score_peaks(P2PNet):
                    print(f"  3 x 3 peaks, NMS box {saved:g} px: AP@0.5 (< 32 / 32-96 px) "
                          f"{ap(predict(cfg, model, dataset), gts, len(names))}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
