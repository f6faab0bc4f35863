"""The data layer's speed: loading and evaluation, each against its detectron2 /
pycocotools counterpart, in one process.

    python benchmarks/bench_data.py [--images 118000] [--annotations 860000] [--skip-eval]

1. Loading: cpr_d2's load_point_json vs detectron2's load_coco_json on the same
   generated COCO-size point json (every annotation has a true box and a
   point); ratio ours / detectron2's (goal <= 1.5).
2. Evaluation: point AP on 5,000 images x 100 predictions vs pycocotools'
   COCOeval on the same detections as boxes (bench_eval.py; goal <= 2).
"""
import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np
from detectron2.data.datasets import load_coco_json

from cpr_d2.data import load_point_json


def make_json(path, num_images, num_annotations, num_classes=80, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(300, 641, size=(num_images, 2))
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": int(h), "width": int(w)}
              for i, (h, w) in enumerate(sizes)]
    owner = rng.integers(0, num_images, size=num_annotations)
    wh = rng.uniform(4, 200, size=(num_annotations, 2))
    xy = rng.uniform(0, 1, size=(num_annotations, 2)) * np.maximum(sizes[owner][:, ::-1] - wh, 1)
    classes = rng.integers(1, num_classes + 1, size=num_annotations)
    anns = [{"id": k + 1, "image_id": int(owner[k]) + 1, "category_id": int(classes[k]),
             "bbox": [round(float(xy[k, 0]), 2), round(float(xy[k, 1]), 2),
                      round(float(wh[k, 0]), 2), round(float(wh[k, 1]), 2)],
             "area": float(wh[k, 0] * wh[k, 1]), "iscrowd": 0,
             "point": [round(float(xy[k, 0] + wh[k, 0] / 2), 2), round(float(xy[k, 1] + wh[k, 1] / 2), 2)]}
            for k in range(num_annotations)]
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=118_000)
    parser.add_argument("--annotations", type=int, default=860_000)
    parser.add_argument("--skip-eval", action="store_true", help="only the loading comparison")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # detectron2 logs per-call details
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "points.json")
        t_make, _ = timed(lambda: make_json(path, args.images, args.annotations))
        print(f"generated {args.images} images, {args.annotations} annotations "
              f"({os.path.getsize(path) / 1e6:.0f} MB) in {t_make:.1f} s")
        t_d2, d2 = timed(lambda: load_coco_json(path, tmp))
        t_ours, ours = timed(lambda: load_point_json(path, tmp))
    n_d2 = sum(len(r["annotations"]) for r in d2)
    n_ours = sum(len(r["annotations"]) for r in ours)
    print(f"{'loader':28} {'seconds':>8} {'annotations':>12}")
    print(f"{'detectron2 load_coco_json':28} {t_d2:8.2f} {n_d2:12d}")
    print(f"{'cpr_d2 load_point_json':28} {t_ours:8.2f} {n_ours:12d}")
    print(f"ratio ours / detectron2: {t_ours / t_d2:.2f} (goal <= 1.5)")
    if not args.skip_eval:
        from bench_eval import main as bench_eval

        print()
        bench_eval(["--repeats", "1"])


if __name__ == "__main__":
    main()
