"""How the per-image costs grow with the number of objects in one image.

    python benchmarks/bench_scale.py [--counts 10 100 1000 10000] [--classes 1] [--seed 0]
                                     [--layout fixed-image fixed-density]

Two layouts, each with N = 10, 100, 1,000, 10,000 objects in one image:

* fixed-image: one image of 2048 x 2048 px at stride 8 (a 256 x 256 feature
  map, 65,536 anchor cells); only N grows, so the objects get denser: 10,000
  objects of 16 x 16 px cover 61% of the image.
* fixed-density: the image side grows with sqrt(N) (2048 px at 1,000 objects,
  6,480 px at 10,000), so the objects per pixel stay those of the 1,000-object
  image: more objects in a bigger scene.

GT points are uniform over the image, classes uniform in [0, --classes)
(default 1 class: images with thousands of objects are crowds, trees, tiny
persons). Four parts are measured:

* cpr:    CPRNet sampling + gather: `negative_mask` (R = 2) and the fused
          `bag_gather` forward + backward of a (1, 2C, H / 8, W / 8) map, as
          in one CPRNet training step of the image.
* match:  P2PNet matching, `PointMatcher(topk=5)` with the default settings
          (dense while P x G <= 4e6, else 64 candidates per GT, sparse): one
          prediction per anchor cell, jittered by 2 px, random class logits.
* ap:     `evaluate_point_ap` on the image: N GT boxes (16 x 16 px) and 2N
          detections (two per GT, 3 px off), max_dets = 2N so every
          detection takes part. Also reported: the (detection, GT) pairs
          within the largest tau (2) per GT, which the greedy matching rule
          has to look at (an unmatched detection is one that found every GT
          within tau taken).
* export: `refined_json` (every annotation refined) + `write_json_atomic` of a
          point json with the image's N annotations.

Each (part, N) runs in its own subprocess. Time: the median of up to 5 runs
(fewer when a run takes long), after one warm-up run on a 5-object image.
Memory: peak resident memory during the first timed run minus the resident
memory just before it (Linux: the process's VmHWM is reset through
/proc/self/clear_refs before the run, so the peak belongs to that run alone;
it counts torch, numpy and Python allocations alike). Growth = value(N) /
value(N / 10).

Goals, judged on the fixed image: every part but matching grows at most about
linearly in N (growth <= 12 per 10x at the large end, 1,000 -> 10,000
objects), and matching 10,000 objects takes < 5 s. The ap line also prints how
the pairs within tau grew and the time per pair: on the fixed image those pairs
grow about as N^2. The fixed-density lines are printed for information (there
the feature map grows with N as well).
"""
import argparse
import atexit
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SIDE, STRIDE, RADIUS, TOPK = 2048, 8, 2, 5
# fixed-density: the image holding this many objects is SIDE x SIDE px.
DENSITY_REFERENCE = 1000
PARTS = ("cpr", "match", "ap", "export")
LAYOUTS = ("fixed-image", "fixed-density")
GROWTH_GOAL, MATCH_GOAL_S = 12.0, 5.0


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def image_side(layout, n):
    """Side in px (a multiple of STRIDE) of the image holding n objects."""
    if layout == "fixed-image":
        return SIDE
    cells = max(1, round(SIDE / STRIDE * math.sqrt(n / DENSITY_REFERENCE)))
    return cells * STRIDE


def make_case(part, n, classes, seed, side=SIDE):
    """A zero-argument callable doing `part` once for an image with n objects."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed + n)
    gt_xy = rng.uniform(0, side, (n, 2))
    gt_cls = rng.integers(0, classes, n)
    cells = side // STRIDE

    if part == "cpr":
        from cpr_d2.layers import bag_gather, negative_mask

        features = torch.randn(1, 2 * classes, cells, cells, requires_grad=True)
        points = torch.as_tensor(gt_xy, dtype=torch.float32)
        labels = torch.as_tensor(gt_cls, dtype=torch.int64)
        batch_idx = torch.zeros(n, dtype=torch.int64)
        image_sizes = torch.tensor([[side, side]])

        def run():
            features.grad = None
            negative_mask(points, labels, (cells, cells), STRIDE, RADIUS, classes)
            bag, _valid = bag_gather(features, points, batch_idx, image_sizes, RADIUS, STRIDE)
            bag.sum().backward()
        return run

    if part == "match":
        from cpr_d2.modeling.p2p_matcher import PointMatcher

        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        anchors = (np.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * STRIDE
        pred = torch.as_tensor(anchors + rng.normal(0, 2, anchors.shape), dtype=torch.float32)
        logits = torch.as_tensor(rng.normal(-3, 1.5, (len(pred), classes)), dtype=torch.float32)
        gt_points = torch.as_tensor(gt_xy, dtype=torch.float32)
        gt_classes = torch.as_tensor(gt_cls, dtype=torch.int64)
        matcher = PointMatcher(topk=TOPK)
        return lambda: matcher(logits, pred, gt_classes, gt_points)

    if part == "ap":
        from cpr_d2.evaluation.point_ap import evaluate_point_ap

        gts, dets = ap_case(n, classes, seed, side)
        return lambda: evaluate_point_ap(gts, dets, classes, max_dets=2 * n)

    if part == "export":
        from cpr_d2.engine.refine import refined_json
        from cpr_d2.utils.io import write_json_atomic

        xy = gt_xy.tolist()
        source = {
            "images": [{"id": 1, "file_name": "image.jpg", "width": side, "height": side}],
            "categories": [{"id": c + 1, "name": f"class{c}"} for c in range(classes)],
            "annotations": [
                {"id": i + 1, "image_id": 1, "category_id": int(c) + 1, "point": p,
                 "bbox": [p[0] - 8, p[1] - 8, 16, 16], "area": 256, "iscrowd": 0}
                for i, (p, c) in enumerate(zip(xy, gt_cls.tolist()))],
        }
        refined = {i + 1: {"point": [p[0] + 1.5, p[1] - 0.5], "score": 0.9, "coarse_point": p,
                           "refined": True} for i, p in enumerate(xy)}
        folder = tempfile.mkdtemp(prefix="bench_scale_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        out = os.path.join(folder, "refined.json")

        def run():
            data, _count = refined_json(source, refined)
            write_json_atomic(data, out)
        return run

    raise ValueError(part)


def ap_case(n, classes, seed, side):
    """The ap part's inputs: one image's GTs (16 x 16 px boxes around the GT points of
    make_case) and 2 detections per GT, 3 px off, random scores."""
    import numpy as np

    rng = np.random.default_rng(seed + n)
    gt_xy = rng.uniform(0, side, (n, 2))  # the first draws, as in make_case
    gt_cls = rng.integers(0, classes, n)
    boxes = np.hstack([gt_xy - 8, np.full((n, 2), 16.0)])
    det_xy = np.repeat(gt_xy, 2, axis=0) + rng.normal(0, 3, (2 * n, 2))
    gts = [{"boxes": boxes, "classes": gt_cls}]
    dets = [{"points": det_xy, "scores": rng.random(2 * n), "classes": np.repeat(gt_cls, 2)}]
    return gts, dets


def pairs_per_gt(n, classes, seed, side):
    """(detection, GT) pairs within the largest tau of the ap case, per GT."""
    from cpr_d2.evaluation.point_ap import DEFAULT_TAUS, _candidate_pairs, box_centers

    (gt,), (det,) = ap_case(n, classes, seed, side)
    pairs, _gts, _d2 = _candidate_pairs(det["classes"], det["points"], gt["classes"],
                                        box_centers(gt["boxes"]), gt["boxes"][:, 2:],
                                        max(DEFAULT_TAUS))
    return pairs.size / n


def child(part, n, classes, seed, side):
    """Measure one (part, n) in this process; print one json line."""
    make_case(part, 5, classes, seed, side)()  # warm-up: imports, extension, first calls
    run = make_case(part, n, classes, seed, side)
    gc.collect()
    rss0 = _status_kb("VmRSS")
    exact = _reset_peak()
    start = time.perf_counter()
    run()
    times = [time.perf_counter() - start]
    if exact:
        peak_kb = _status_kb("VmHWM") - rss0
    else:  # the process's lifetime peak (kB on Linux): an upper bound
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    while len(times) < 5 and sum(times) < 2.0:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    record = {"part": part, "n": n, "side": side, "seconds": statistics.median(times),
              "runs": len(times), "peak_mib": max(peak_kb, 0) / 1024, "exact_peak": exact}
    if part == "ap":
        record["pairs_per_gt"] = pairs_per_gt(n, classes, seed, side)
    print(json.dumps(record))


def measure(layout, args):
    """Run every (part, n) of one layout in its own subprocess; {(part, n): record}."""
    results = {}
    print(f"{layout}:")
    for part in args.parts:
        for n in args.counts:
            side = image_side(layout, n)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", part, str(n),
                   "--side", str(side), "--classes", str(args.classes), "--seed", str(args.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"{layout}: {part} with {n} objects failed")
            r = results[part, n] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {part:6s} {n:6d} objects, {side} px: {r['seconds'] * 1e3:10.2f} ms "
                  f"({r['runs']} runs), peak +{r['peak_mib']:.1f} MiB", flush=True)
    return results


def report(layout, results, args):
    """Print the markdown table of one layout; return its (text, passed) verdicts."""
    print()
    print(f"{layout}:")
    print()
    print("| part | objects | image px | ms | growth | peak MiB | growth | pairs / GT |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for part in args.parts:
        prev = None
        for n in args.counts:
            r = results[part, n]
            grow_t = grow_m = ""
            if prev is not None and n == 10 * prev["n"]:
                grow_t = f"{r['seconds'] / prev['seconds']:.1f}"
                if prev["peak_mib"] >= 1.0:
                    grow_m = f"{r['peak_mib'] / prev['peak_mib']:.1f}"
            pairs = f"{r['pairs_per_gt']:.1f}" if "pairs_per_gt" in r else ""
            print(f"| {part} | {n:,} | {r['side']} | {r['seconds'] * 1e3:.2f} | {grow_t} | "
                  f"{r['peak_mib']:.1f} | {grow_m} | {pairs} |")
            prev = r
    verdicts = []
    top, below = args.counts[-1], args.counts[-1] // 10
    for part in args.parts:
        if part == "match" or (part, below) not in results:
            continue
        growth = results[part, top]["seconds"] / results[part, below]["seconds"]
        text = f"{layout}: {part} time growth {below:,} -> {top:,} objects = {growth:.1f}"
        if part == "ap":
            pair_growth = results[part, top]["pairs_per_gt"] / results[part, below]["pairs_per_gt"]
            text += (f" (pairs within tau x {top / below * pair_growth:.1f}, time per pair "
                     f"x {growth / (top / below * pair_growth):.2f})")
        if layout == "fixed-image":
            verdicts.append((f"{text}; goal <= {GROWTH_GOAL:.0f}", growth <= GROWTH_GOAL))
        else:
            verdicts.append((text, None))
    if layout == "fixed-image" and ("match", 10000) in results:
        seconds = results["match", 10000]["seconds"]
        verdicts.append((f"{layout}: match 10,000 objects in {seconds:.2f} s "
                         f"(goal < {MATCH_GOAL_S:.0f} s)", seconds < MATCH_GOAL_S))
    return verdicts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--classes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--child", nargs=2, metavar=("PART", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, default=SIDE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.classes, args.seed, args.side)
        return

    from cpr_d2.layers import extension_status

    status = extension_status()
    print(f"stride {STRIDE}, {args.classes} class(es), R = {RADIUS}, topk = {TOPK}; compiled "
          f"ops: {'yes' if status['built'] else 'no (PyTorch reference)'}")
    all_results = {layout: measure(layout, args) for layout in args.layout}
    verdicts = []
    for layout, results in all_results.items():
        verdicts += report(layout, results, args)
    print()
    for text, ok in verdicts:
        print(f"{'    ' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")
    if not all(r["exact_peak"] for res in all_results.values() for r in res.values()):
        print("note: /proc/self/clear_refs not writable: peaks are the process's lifetime peak "
              "RSS minus the RSS before the run (upper bounds)")


if __name__ == "__main__":
    main()
