"""Point AP evaluation vs pycocotools' COCOeval (bbox), same detections, one process.

    python benchmarks/bench_eval.py [--images 5000] [--per-image 100] [--classes 80]
                                    [--seed 0] [--repeats 3] [--skip-coco]

Synthetic data (seeded): images of 640 x 480, about 7 GT objects per image
(Poisson) with random classes and random boxes (sides log-uniform in
[8, 300] px). Each image has ``--per-image`` detections: about two per GT
near its centre with its class, the rest at random places with random
classes; scores uniform in [0, 1).

Point AP (``cpr_d2.evaluation.point_ap.evaluate_point_ap``) runs with its
defaults: taus 0.5 / 1 / 2, the four COCO size ranges, max_dets 100, i.e. 12
settings. COCOeval gets the same detections as 16 x 16 boxes centred on the
points and the GT boxes as they are; it runs evaluate() + accumulate() (10
IoUs x 4 areas x 3 maxDets, pure Python: detectron2's C++ COCOeval is not
built here). Building the COCO objects (loadRes) is timed on its own.
Times are medians; ratio = point AP / COCOeval (lower is better).
"""
import argparse
import contextlib
import io
import statistics
import time

import numpy as np

from cpr_d2.evaluation.point_ap import evaluate_point_ap

WIDTH, HEIGHT = 640, 480


def make_data(images, per_image, classes, seed):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(images):
        n = int(rng.poisson(7))
        wh = np.exp(rng.uniform(np.log(8), np.log(300), (n, 2)))
        xy = rng.uniform(0, 1, (n, 2)) * np.maximum([WIDTH, HEIGHT] - wh, 1)
        gt_cls = rng.integers(0, classes, n)
        crowd = rng.random(n) < 0.02
        gts.append({"boxes": np.hstack([xy, wh]), "classes": gt_cls, "iscrowd": crowd})

        near = min(per_image, 2 * n)
        src = rng.integers(0, max(n, 1), near)
        pts = np.empty((per_image, 2))
        cls = rng.integers(0, classes, per_image)
        if near:
            pts[:near] = xy[src] + wh[src] / 2 + rng.normal(0, 0.4, (near, 2)) * wh[src]
            cls[:near] = gt_cls[src]
        pts[near:] = rng.uniform(0, 1, (per_image - near, 2)) * [WIDTH, HEIGHT]
        dets.append({"points": pts, "scores": rng.random(per_image), "classes": cls})
    return gts, dets


def to_coco(gts, dets, classes):
    images, annotations, results = [], [], []
    for i, (g, d) in enumerate(zip(gts, dets)):
        images.append({"id": i + 1, "width": WIDTH, "height": HEIGHT})
        for box, c, crowd in zip(g["boxes"].tolist(), g["classes"].tolist(), g["iscrowd"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(crowd)})
        for (x, y), s, c in zip(d["points"].tolist(), d["scores"].tolist(), d["classes"].tolist()):
            results.append({"image_id": i + 1, "category_id": c + 1, "bbox": [x - 8, y - 8, 16, 16],
                            "score": s})
    dataset = {"images": images, "annotations": annotations,
               "categories": [{"id": c + 1, "name": str(c)} for c in range(classes)]}
    return dataset, results


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--coco-repeats", type=int, default=1)
    parser.add_argument("--skip-coco", action="store_true")
    args = parser.parse_args(argv)

    gts, dets = make_data(args.images, args.per_image, args.classes, args.seed)
    n_gt = sum(len(g["classes"]) for g in gts)
    print(f"{args.images} images, {args.images * args.per_image} detections, {n_gt} GT, "
          f"{args.classes} classes")

    ours, result = median_time(lambda: evaluate_point_ap(gts, dets, args.classes), args.repeats)
    m = result.metrics()
    print(f"point AP:  {ours:8.2f} s   (mAP {100 * m['mAP']:.2f}, AP@0.5 {100 * m['AP@0.5']:.2f}, "
          f"AP@1 {100 * m['AP@1']:.2f}, AP@2 {100 * m['AP@2']:.2f}, MAE {m['MAE']:.2f})")
    if args.skip_coco:
        return

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, results = to_coco(gts, dets, args.classes)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
    load = time.perf_counter() - start

    def run_cocoeval():
        with contextlib.redirect_stdout(io.StringIO()):
            e = COCOeval(coco_gt, coco_dt, "bbox")
            e.evaluate()
            e.accumulate()
        return e

    theirs, _ = median_time(run_cocoeval, args.coco_repeats)
    print(f"COCOeval:  {theirs:8.2f} s   (evaluate + accumulate; "
          f"building COCO objects {load:.2f} s more)")
    print(f"ratio point AP / COCOeval: {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
