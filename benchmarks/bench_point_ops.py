"""Compiled point ops vs their PyTorch references, same inputs, one process.

    python benchmarks/bench_point_ops.py [--device cpu|cuda|all] [--repeats N]

Cases (see benchmarks/README.md):
  coco:     features 2x256x50x84 at stride 8, 20 objects per image, R = 8, 80 classes
  dense:    features 1x256x160x160 at stride 4, 300 objects, R = 5, 1 class
  adaptive: coco with a sampling region per object (MODEL.CPR.ADAPTIVE): radii drawn
            uniformly from 0.25 to 1.5 R * stride, the `region` argument of every op

"step" is what one CPRNet training step asks of the ops: the negative mask of
every image and the fused bag gather, forward and backward. Times are medians;
ratio = reference / compiled (higher is better). On CUDA, the achieved memory
bandwidth of the fused gather is estimated from the bytes it must move.
"""
import argparse
import functools
import statistics
import time

import torch

import cpr_d2.layers as L

CASES = {
    "coco": dict(batch=2, channels=256, height=50, width=84, stride=8, per_image=20, radius=8,
                 classes=80),
    "dense": dict(batch=1, channels=256, height=160, width=160, stride=4, per_image=300,
                  radius=5, classes=1),
    "adaptive": dict(batch=2, channels=256, height=50, width=84, stride=8, per_image=20,
                     radius=8, classes=80, regions=True),
}


def make_inputs(case, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w, s = case["batch"], case["channels"], case["height"], case["width"], case["stride"]
    n = b * case["per_image"]
    features = torch.randn(b, c, h, w, generator=g)
    points = torch.rand(n, 2, generator=g) * torch.tensor([w * s, h * s])
    labels = torch.randint(0, case["classes"], (n,), generator=g)
    batch_idx = torch.arange(b).repeat_interleave(case["per_image"])
    sizes = torch.tensor([[h * s, w * s]] * b)
    upstream = torch.randn(n, L.bag_size(case["radius"]), c, generator=g)
    region = None
    if case.get("regions"):
        region = (0.25 + 1.25 * torch.rand(n, generator=g)) * case["radius"] * s
    return [None if t is None else t.to(device)
            for t in (features, points, labels, batch_idx, sizes, upstream, region)]


def with_region(op, region):
    """`op` (bag_points, negative_mask, bag_gather or a reference) called with the per-object
    regions, or as it is when there are none."""
    return op if region is None else functools.partial(op, region=region)


def timed(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_fn(bag_gather, negative_mask, case, inputs, channels_last=False):
    features, points, labels, batch_idx, sizes, upstream, region = inputs
    grid = (case["height"], case["width"])
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)

    def step():
        f = features.detach().requires_grad_(True)
        for b in range(case["batch"]):
            rows = batch_idx == b
            with_region(negative_mask, None if region is None else region[rows])(
                points[rows], labels[rows], grid, case["stride"], case["radius"], case["classes"])
        feats, _ = with_region(bag_gather, region)(f, points, batch_idx, sizes, case["radius"],
                                                   case["stride"])
        feats.backward(upstream)
        return f.grad

    return step


def rows_for(case_name, device, repeats):
    case = CASES[case_name]
    inputs = make_inputs(case, device)
    features, points, labels, batch_idx, sizes, upstream, region = inputs
    r, s = case["radius"], case["stride"]
    grid = (case["height"], case["width"])
    first = batch_idx == 0
    first_region = None if region is None else region[first]
    flat_points = L.bag_points(points, r, s, (grid[0] * s, grid[1] * s), region=region)[0]
    flat_points = flat_points.reshape(-1, 2)
    flat_idx = batch_idx.repeat_interleave(L.bag_size(r))
    flat_up = upstream.reshape(-1, upstream.shape[-1])

    def gather_fb(fn):
        def run():
            f = features.detach().requires_grad_(True)
            fn(f, flat_points, flat_idx, s).backward(flat_up)
        return run

    ops = {
        "bag_points": (lambda fn: lambda: with_region(fn, region)(
            points, r, s, (grid[0] * s, grid[1] * s)), L.bag_points_reference, L.bag_points),
        "negative_mask (1 image)": (
            lambda fn: lambda: with_region(fn, first_region)(
                points[first], labels[first], grid, s, r, case["classes"]),
            L.negative_mask_reference, L.negative_mask),
        "bilinear_gather fwd": (lambda fn: lambda: fn(features, flat_points, flat_idx, s),
                                L.bilinear_gather_reference, L.bilinear_gather),
        "bilinear_gather fwd+bwd": (gather_fb, L.bilinear_gather_reference, L.bilinear_gather),
        "bag_gather fwd": (lambda fn: lambda: with_region(fn, region)(
            features, points, batch_idx, sizes, r, s), L.bag_gather_reference, L.bag_gather),
        "step: masks + bag_gather fwd+bwd": (
            False, (L.bag_gather_reference, L.negative_mask_reference),
            (L.bag_gather, L.negative_mask)),
        "step, channels-last features": (
            True, (L.bag_gather_reference, L.negative_mask_reference),
            (L.bag_gather, L.negative_mask)),
    }
    rows = []
    for name, (make, ref, ours) in ops.items():
        if isinstance(make, bool):
            ref_fn = step_fn(*ref, case, inputs, channels_last=make)
            our_fn = step_fn(*ours, case, inputs, channels_last=make)
        else:
            ref_fn, our_fn = make(ref), make(ours)
        t_ref = timed(ref_fn, device, repeats)
        t_ours = timed(our_fn, device, repeats)
        rows.append((case_name, device, name, t_ref * 1e3, t_ours * 1e3, t_ref / t_ours))
    if device == "cuda":
        fwd = timed(lambda: with_region(L.bag_gather, region)(features, points, batch_idx, sizes,
                                                              r, s), device, repeats)
        m, c = points.shape[0] * L.bag_size(r), case["channels"]
        moved = m * c * features.element_size() * (1 + 4)  # one write, four tap reads
        rows.append((case_name, device, "bag_gather fwd bandwidth (GB/s)", float("nan"),
                     fwd * 1e3, moved / fwd / 1e9))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("--device cuda: no CUDA GPU is available")
        devices.remove("cuda")
    status = L.extension_status()
    if not status["built"]:
        raise SystemExit(f"cpr_d2._C is not built ({status['error']}): nothing to compare")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU: {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    header = f"{'case':6} {'dev':4} {'op':34} {'reference ms':>13} {'compiled ms':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for device in devices:
        for case in args.cases:
            for row in rows_for(case, device, args.repeats):
                print(f"{row[0]:6} {row[1]:4} {row[2]:34} {row[3]:13.3f} {row[4]:12.3f} "
                      f"{row[5]:7.2f}")


if __name__ == "__main__":
    main()
