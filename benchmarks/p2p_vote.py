#!/usr/bin/env python
"""Point AP of P2PNet runs under other NMS boxes and point votes, on the same predictions.

    .venv/bin/python benchmarks/p2p_vote.py --test forest_test RUN_DIR [RUN_DIR ...] \\
        [--boxes 16 20] [--radii 0 8]

Each RUN_DIR is a P2PNet training run (its config.yaml and model_final.pth, e.g. the
pipeline's seed_0/p2p_centres). The model predicts every test image once, without NMS
(every candidate above MODEL.P2PNET.SCORE_THRESH, at most TOPK_CANDIDATES); each
(NMS box, vote radius) pair is then applied to those candidates with the package's own
nms_and_vote, the post-processing of P2PNet.inference (MODEL.P2PNET.NMS_BOX_SIZE and
VOTE_RADIUS), and scored with point AP. So the rows of one run differ by the
post-processing alone. The script prints AP@0.5 / AP@1 / AP@2 (and AP@0.5 of the COCO
small and medium ranges) per run and pair, then per pair the mean over the runs and the
mean change from the first box without a vote (the forest config's 16 px by default).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ("AP@0.5", "AP@1", "AP@2", "AP@0.5/small", "AP@0.5/medium")


def candidates(cfg, model, dataset):
    """Per image of `dataset` (in its order) the candidate points, scores and classes of
    the model's inference before any NMS, by decreasing score."""
    import torch
    from detectron2.data import DatasetCatalog, build_detection_test_loader

    from cpr_d2.data.mapper import PointDatasetMapper

    loader = build_detection_test_loader(DatasetCatalog.get(dataset),
                                         mapper=PointDatasetMapper(cfg, is_train=False),
                                         num_workers=0)
    saved = model.nms_box_size, model.detections_per_image, model.vote_radius
    model.nms_box_size, model.detections_per_image, model.vote_radius = 0.0, 10 ** 9, 0.0
    out = []
    model.eval()
    try:
        with torch.no_grad():
            for inputs in loader:
                out += [o["instances"].to("cpu") for o in model(inputs)]
    finally:
        model.nms_box_size, model.detections_per_image, model.vote_radius = saved
    return out


def post_process(instances, box, radius, nms_thresh, max_points):
    """point AP detections of every image after NMS (box) and vote (radius)."""
    from cpr_d2.modeling.p2pnet import nms_and_vote

    dets = []
    for inst in instances:
        kept, points = nms_and_vote(inst.pred_points, inst.scores, inst.pred_classes, box,
                                    nms_thresh, max_points, radius)
        dets.append({"points": points.double().numpy(), "scores": inst.scores[kept].numpy(),
                     "classes": inst.pred_classes[kept].numpy()})
    return dets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", required=True, help="the registered test dataset")
    parser.add_argument("--boxes", type=float, nargs="+", default=[16.0, 20.0],
                        help="NMS box sizes in px (default: 16 20)")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.0, 8.0],
                        help="vote radii in px, 0 = no vote (default: 0 8)")
    parser.add_argument("runs", nargs="+", help="P2PNet run directories")
    args = parser.parse_args(argv)

    from count_rules import load_run  # this folder's; registers the datasets too

    from cpr_d2.evaluation.evaluator import load_point_ground_truth
    from cpr_d2.evaluation.point_ap import evaluate_point_ap

    names, _, gts = load_point_ground_truth(args.test)
    pairs = [(b, r) for b in args.boxes for r in [0.0] + [r for r in args.radii if r != 0]]
    results = {}
    print("| run | NMS box | vote radius | " + " | ".join(COLUMNS) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |")
    for run in args.runs:
        cfg, model = load_run(run)
        inst = candidates(cfg, model, args.test)
        c = cfg.MODEL.P2PNET
        for box, radius in pairs:
            dets = post_process(inst, box, radius, c.NMS_THRESH, c.DETECTIONS_PER_IMAGE)
            m = evaluate_point_ap(gts, dets, len(names)).metrics()
            row = [100 * m[k] for k in COLUMNS]
            results.setdefault((box, radius), []).append(row)
            print(f"| {run} | {box:g} | {radius:g} | " + " | ".join(f"{v:.1f}" for v in row)
                  + " |")
    base = np.asarray(results[pairs[0]])
    print(f"\nMean over {len(args.runs)} runs (change from NMS box {pairs[0][0]:g} px, no vote, "
          "on the same run)")
    print("| NMS box | vote radius | " + " | ".join(COLUMNS) + " |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |")
    for (box, radius), rows in results.items():
        rows = np.asarray(rows)
        print(f"| {box:g} | {radius:g} | " + " | ".join(
            f"{m:.1f} ({d:+.1f})" for m, d in zip(rows.mean(0), (rows - base).mean(0))) + " |")


if __name__ == "__main__":
    main()
