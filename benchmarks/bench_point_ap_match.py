"""Point AP with the compiled matcher vs the numpy matcher, one process.

    python benchmarks/bench_point_ap_match.py [--counts 1000 10000] [--images 5000]
                                              [--repeats 5] [--device cpu]

Cases:
  * dense N: one 2048 x 2048 px image with N GT boxes of 16 x 16 px and 2N
    detections (two per GT, 3 px off), as the ap part of bench_scale.py;
  * coco: bench_eval.py's ``--images`` synthetic COCO-like images (80 classes,
    ~7 GTs and 100 detections per image).
Each runs evaluate_point_ap with backend="numpy" and backend="compiled" (on
``--device``; add "cuda" to time the CUDA kernel too), checks that the AP
arrays are equal bit for bit, and prints median times and the ratio
compiled / numpy (lower is better). Set OMP_NUM_THREADS=1 for single-core numbers.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cpr_step import median_ms  # noqa: E402
from bench_eval import make_data  # noqa: E402
from bench_scale import SIDE, ap_case  # noqa: E402

from cpr_d2.evaluation.point_ap import evaluate_point_ap  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", nargs="+", default=["cpu"])
    args = parser.parse_args(argv)

    cases = []
    for n in args.counts:
        gts, dets = ap_case(n, 1, 0, SIDE)
        cases.append((f"dense {n:,}", gts, dets, 1, dict(max_dets=2 * n)))
    if args.images:
        gts, dets = make_data(args.images, 100, 80, 0)
        cases.append((f"coco {args.images:,} images", gts, dets, 80, {}))

    print(f"{'case':<22} {'numpy ms':>10} " + " ".join(
        f"{'compiled ' + d + ' ms':>18} {'ratio':>6}" for d in args.device))
    for name, gts, dets, classes, kw in cases:
        want = evaluate_point_ap(gts, dets, classes, backend="numpy", **kw)
        numpy_ms = median_ms(lambda: evaluate_point_ap(gts, dets, classes, backend="numpy", **kw),
                             args.repeats)
        cells = []
        for device in args.device:
            got = evaluate_point_ap(gts, dets, classes, backend="compiled", device=device, **kw)
            if not np.array_equal(got.ap, want.ap, equal_nan=True):
                raise SystemExit(f"{name}: compiled ({device}) and numpy AP differ")
            ms = median_ms(lambda: evaluate_point_ap(gts, dets, classes, backend="compiled",
                                                     device=device, **kw), args.repeats)
            cells.append(f"{ms:>18.2f} {ms / numpy_ms:>6.2f}")
        print(f"{name:<22} {numpy_ms:>10.2f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
