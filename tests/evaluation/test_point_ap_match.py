"""The compiled point AP matcher (torch.ops.cpr_d2.point_ap_match) against its numpy
reference, bit for bit, on fresh random inputs: dense images, exact tau boundaries,
tie blocks, huge and tiny coordinates and boxes, many strips and keys; its CUDA
kernel against its CPU kernel; the argument checks of the kernel, the wrapper and
the reference; and the backends of evaluate_point_ap."""
import importlib

import numpy as np
import pytest
import torch

from cpr_d2.evaluation.point_ap import evaluate_point_ap
from cpr_d2.layers import _ext, point_ap_match, point_ap_match_reference

# The module (cpr_d2.layers.point_ap_match, the attribute, is the function).
matcher = importlib.import_module("cpr_d2.layers.point_ap_match")

from ..conftest import requires_cuda

TAUS = (0.5, 1.0, 2.0)


def dense(rng):
    n, k = int(rng.integers(1, 400)), int(rng.integers(1, 900))
    ctr = rng.uniform(-20, 500, (n, 2))
    wh = np.exp(rng.uniform(np.log(2), np.log(200), (n, 2)))  # tiny to huge boxes
    pts = np.concatenate([ctr[rng.integers(0, n, k // 2)] + rng.normal(0, 10, (k // 2, 2)),
                          rng.uniform(-50, 550, (k - k // 2, 2))])
    if rng.random() < 0.5:  # exact distance ties, points on strip and band edges
        ctr, wh, pts = np.round(ctr), np.maximum(np.round(wh), 1), np.round(pts)
    return rng.integers(0, 3, k), pts, rng.integers(0, 3, n), ctr, wh


def at_tau(rng):
    """Detections exactly tau box sizes from a GT centre, and one ulp further."""
    n = int(rng.integers(1, 200))
    ctr = rng.integers(0, 300, (n, 2)).astype(np.float64)
    wh = rng.integers(1, 40, (n, 2)).astype(np.float64)
    src = rng.integers(0, n, 4 * n)
    step = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [0.6, 0.8], [-0.8, 0.6]])
    offset = step[rng.integers(0, len(step), 4 * n)] * rng.choice(TAUS, (4 * n, 1)) * wh[src]
    pts = ctr[src] + offset
    further = rng.random(4 * n) < 0.3
    pts[further] = np.nextafter(pts[further], pts[further] + offset[further])
    return np.zeros(4 * n, np.int64), pts, np.zeros(n, np.int64), ctr, wh


def far_and_wide(rng):
    """Coordinates beyond the search's 2^40 px clip, boxes as wide as the spread."""
    n, k = 120, 400
    ctr = np.stack([rng.uniform(-3e12, 3e12, n), rng.uniform(0, 4000, n)], 1)
    wh = np.where(rng.random((n, 1)) < 0.3, [[1e13, 1000.0]], [[10.0, 10.0]])
    pts = np.stack([rng.uniform(-3e12, 3e12, k), rng.uniform(0, 4000, k)], 1)
    pts[: k // 4, 0] = -3e12
    return rng.integers(0, 3, k), pts, rng.integers(0, 3, n), ctr, wh


def many_strips_and_keys(rng):
    """About 2^20 strips, 1,100 keys (as large as 2^60, negative too), GT keys no
    detection has."""
    k = 1100
    pts = np.stack([rng.uniform(0, 100, k), rng.uniform(0, 5e6, k)], 1)
    det_key = (rng.permutation(k) - 500) * (1 << 50)
    src = rng.integers(0, k, 800)
    ctr = pts[src] + rng.normal(0, 1, (800, 2))
    wh = rng.uniform(0.5, 2, (800, 2))
    gt_key = np.where(rng.random(800) < 0.8, det_key[src], (k + 5) * (1 << 50))
    return det_key, pts, gt_key, ctr, wh


def subnormal_boxes(rng):
    """Boxes of 5e-324 px: only a detection exactly on the centre line is in reach."""
    n, k = 50, 200
    ctr = rng.integers(0, 20, (n, 2)).astype(np.float64)
    wh = np.where(rng.random((n, 2)) < 0.3, 5e-324, rng.uniform(1, 5, (n, 2)))
    pts = ctr[rng.integers(0, n, k)] + rng.integers(-2, 3, (k, 2))
    return rng.integers(0, 2, k), pts, rng.integers(0, 2, n), ctr, wh


def lattice(rng):
    """GTs on a lattice, detections at the centres of its cells: every detection is
    equally far from 4 GTs, so the GT order breaks the ties."""
    side = int(rng.integers(2, 12))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * 10.0
    ctr = grid[rng.permutation(len(grid))]
    wh = np.full_like(ctr, 20.0)  # d = 0.35 to the 4 nearest GTs: within every tau
    pts = grid[rng.integers(0, len(grid), 3 * len(grid))] + 5.0
    return np.zeros(len(pts), np.int64), pts, np.zeros(len(ctr), np.int64), ctr, wh


def huge_boxes(rng):
    """Some boxes as large as floats go (1e308 px): their reach is capped, not infinite."""
    n, k = 60, 300
    ctr = rng.uniform(0, 500, (n, 2))
    wh = np.where(rng.random((n, 2)) < 0.2, 1e308, rng.uniform(2, 30, (n, 2)))
    wh[: n // 2] = np.where(rng.random((n // 2, 1)) < 0.5, 1e308, wh[: n // 2])  # both sides
    pts = np.concatenate([ctr[rng.integers(0, n, k // 2)] + rng.normal(0, 5, (k // 2, 2)),
                          rng.uniform(-1e6, 1e6, (k - k // 2, 2))])
    return rng.integers(0, 2, k), pts, rng.integers(0, 2, n), ctr, wh


LAYOUTS = [dense, at_tau, far_and_wide, many_strips_and_keys, subnormal_boxes, lattice,
           huge_boxes]


def matcher_inputs(rng, layout):
    """A layout's points as the matchers take them: detections sorted by key, tie
    blocks (all singletons, some, or large), and ignore rows (with an all-False, an
    all-True and a repeated row)."""
    det_key, pts, gt_key, ctr, wh = layout(rng)
    order = np.argsort(det_key, kind="stable")
    det_key, pts = det_key[order], pts[order]
    new = rng.random(det_key.size) < rng.choice([1.0, 0.5, 0.05])
    if det_key.size:
        new[0] = True
        new[1:] |= det_key[1:] != det_key[:-1]
    block = np.cumsum(new) - 1
    n = gt_key.size
    ignore = np.stack([np.zeros(n, bool), rng.random(n) < 0.3, np.ones(n, bool),
                       rng.random(n) < 0.7])
    ignore = ignore[rng.integers(0, 4, 5)]
    taus = tuple(rng.permutation(TAUS)[: int(rng.integers(1, 4))].tolist())
    return det_key, pts, block, gt_key, ctr, wh, ignore, taus


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def op_or_skip(device):
    op = _ext.compiled_op("point_ap_match", torch.empty(0, dtype=torch.float64, device=device))
    assert op is not None, "cpr_d2._C has no point_ap_match kernel; rebuild the extension"
    return op


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_compiled_matcher_equals_numpy(layout, np_rng):
    op_or_skip("cpu")
    matched = 0
    for _ in range(10):
        args = matcher_inputs(np_rng, layout)
        want = point_ap_match_reference(*args)
        matched += int(want[0].sum())
        assert_same(point_ap_match(*args, backend="compiled"), want)
    assert matched > 0, "no detection matched in any case: the layout tests nothing"


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_cuda_matcher_equals_cpu(layout, np_rng):
    op_or_skip("cpu"), op_or_skip("cuda")
    for _ in range(10):
        args = matcher_inputs(np_rng, layout)
        assert_same(point_ap_match(*args, backend="compiled", device="cuda"),
                    point_ap_match(*args, backend="compiled", device="cpu"))


def op_args(**change):
    args = dict(
        det_key=torch.tensor([0, 0, 1]), det_xy=torch.zeros(3, 2, dtype=torch.float64),
        det_block=torch.tensor([0, 1, 2]), gt_key=torch.tensor([0, 1]),
        gt_xy=torch.zeros(2, 2, dtype=torch.float64), gt_wh=torch.ones(2, 2, dtype=torch.float64),
        ignore=torch.zeros(1, 2, dtype=torch.bool), taus=[0.5, 1.0],
    )
    args.update(change)
    return list(args.values())


BAD_ARGUMENTS = [
    (dict(gt_key=torch.tensor([1, 0])), ValueError, "gt_key must be sorted"),
    (dict(det_key=torch.tensor([1, 0, 0])), ValueError, "det_key must be sorted"),
    (dict(det_block=torch.tensor([1, 2, 3])), ValueError, "det_block must start at 0"),
    (dict(det_block=torch.tensor([0, 2, 3])), ValueError, "number the blocks"),
    (dict(det_block=torch.tensor([0, 1, 1])), ValueError, "must not span two keys"),
    (dict(taus=[]), ValueError, "taus must not be empty"),
    (dict(taus=[1.0, -1.0]), ValueError, "finite and positive"),
    (dict(det_xy=torch.full((3, 2), float("nan"), dtype=torch.float64)), ValueError,
     "det_xy must be finite"),
    (dict(gt_wh=torch.zeros(2, 2, dtype=torch.float64)), ValueError,
     "gt_wh must be finite and positive"),
    (dict(det_xy=torch.zeros(3, 2)), TypeError, "det_xy must be Double"),
    (dict(ignore=torch.zeros(1, 3, dtype=torch.bool)), ValueError, "ignore must have 2 columns"),
    (dict(gt_xy=torch.zeros(3, 2, dtype=torch.float64)), ValueError,
     "gt_xy has 3 rows, expected 2"),
    (dict(det_block=torch.tensor([[0, 1, 2]])), ValueError, "det_block must have 1 dimension"),
]
# What only the kernel refuses: the wrapper sorts the GTs and converts the dtypes.
KERNEL_ONLY = ("gt_key must be sorted", "det_xy must be Double")


@pytest.mark.parametrize("change, error, message", BAD_ARGUMENTS)
def test_compiled_matcher_checks_its_arguments(change, error, message):
    op = op_or_skip("cpu")
    with pytest.raises(error, match=message):
        op(*op_args(**change))
    tp, ignore_d2 = op(*op_args())  # the unchanged arguments are fine
    assert tp.shape == (2, 1, 3) and ignore_d2.shape == (1, 3)


def numpy_args(**change):
    return [a.numpy() if isinstance(a, torch.Tensor) else a for a in op_args(**change)]


@pytest.mark.parametrize("backend", ["numpy", "compiled"])
@pytest.mark.parametrize("change, error, message",
                         [case for case in BAD_ARGUMENTS if case[2] not in KERNEL_ONLY])
def test_matcher_wrapper_and_reference_check_their_arguments(change, error, message, backend):
    """Both faces of point_ap_match (and the reference itself) refuse what the kernel
    refuses, with the kernel's error type and message."""
    with pytest.raises(error, match=message):
        point_ap_match(*numpy_args(**change), backend=backend)
    if backend == "numpy":
        with pytest.raises(error, match=message):
            point_ap_match_reference(*numpy_args(**change))


@pytest.mark.parametrize("change", [c for c, _, message in BAD_ARGUMENTS if message in KERNEL_ONLY])
def test_matcher_wrapper_sorts_the_gts_and_converts_dtypes(change):
    want = point_ap_match(*numpy_args(**change), backend="numpy")
    assert_same(point_ap_match(*numpy_args(**change), backend="compiled"), want)
    assert want[0].shape == (2, 1, 3) and want[1].shape == (1, 3)


def dense_images(rng, num_images=3, num_classes=3):
    gts, dets = [], []
    for _ in range(num_images):
        n = int(rng.integers(0, 400))
        wh = rng.uniform(4, 120, (n, 2))
        xy = rng.uniform(0, 600, (n, 2))
        k = 2 * n + int(rng.integers(0, 20))
        src = rng.integers(0, max(n, 1), k)
        pts = (xy[src] + wh[src] / 2 + rng.normal(0, 0.4, (k, 2)) * wh[src] if n
               else rng.uniform(0, 600, (k, 2)))
        scores = rng.choice(np.array([0.9, 0.5, 0.3], np.float32), k)
        scores = np.where(rng.random(k) < 0.5, rng.random(k), scores)
        gts.append({"boxes": np.hstack([xy, wh]), "classes": rng.integers(0, num_classes, n),
                    "iscrowd": rng.random(n) < 0.1})
        dets.append({"points": pts, "scores": scores, "classes": rng.integers(0, num_classes, k)})
    return gts, dets, num_classes


@pytest.mark.parametrize("size_ranges", ["coco", "tinyperson"])
def test_evaluate_point_ap_backends_agree(size_ranges, np_rng):
    for _ in range(5):
        gts, dets, num_classes = dense_images(np_rng)
        kw = dict(size_ranges=size_ranges, max_dets=int(np_rng.choice([5, 1000])))
        want = evaluate_point_ap(gts, dets, num_classes, backend="numpy", **kw)
        for backend in ("compiled", "auto"):
            got = evaluate_point_ap(gts, dets, num_classes, backend=backend, **kw)
            np.testing.assert_array_equal(got.ap, want.ap)
            np.testing.assert_array_equal(got.num_positives, want.num_positives)


def test_evaluate_point_ap_without_the_compiled_matcher(monkeypatch, np_rng):
    """"auto" falls back to numpy; "compiled" says how to get the kernel back."""
    gts, dets, num_classes = dense_images(np_rng)
    want = evaluate_point_ap(gts, dets, num_classes, backend="compiled")
    monkeypatch.setattr(_ext, "compiled_op", lambda name, tensor: None)
    calls = []
    monkeypatch.setattr(matcher, "point_ap_match_reference",
                        lambda *a: calls.append(1) or point_ap_match_reference(*a))
    got = evaluate_point_ap(gts, dets, num_classes)
    assert calls, "auto did not fall back to the numpy matcher"
    np.testing.assert_array_equal(got.ap, want.ap)
    with pytest.raises(RuntimeError, match="rebuild it"):
        evaluate_point_ap(gts, dets, num_classes, backend="compiled")
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluate_point_ap(gts, dets, num_classes, backend="cuda")


def test_evaluate_point_ap_checks_the_device():
    one_gt = {"boxes": np.array([[0.0, 0.0, 10.0, 10.0]]), "classes": np.array([0])}
    one_det = {"points": np.array([[5.0, 5.0]]), "scores": np.array([0.9]),
               "classes": np.array([0])}
    with pytest.raises(ValueError, match="must name a torch device"):
        evaluate_point_ap([one_gt], [one_det], 1, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            evaluate_point_ap([one_gt], [one_det], 1, device="cuda")
    else:
        assert evaluate_point_ap([one_gt], [one_det], 1, device="cuda").ap[0, 0, 0] == 100 / 101
