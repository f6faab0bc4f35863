"""Every wrapper rejects bad arguments with a clear error before any kernel runs."""
import pytest
import torch

import cpr_d2.layers as L

P = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
F = torch.zeros(2, 3, 4, 4)
B = torch.tensor([0, 1])
S = torch.tensor([[32, 32], [32, 32]])
LAB = torch.tensor([0, 1])

CASES = [
    # (callable, exception, message fragment)
    (lambda: L.bag_points(torch.zeros(3), 1, 8, (4, 4)), ValueError, r"shape \(N, 2\)"),
    (lambda: L.bag_points(torch.zeros(3, 2, dtype=torch.long), 1, 8, (4, 4)), TypeError, "floating"),
    (lambda: L.bag_points(P.half(), 1, 8, (4, 4)), TypeError, "float32 or float64"),
    (lambda: L.bag_points(P, -1, 8, (4, 4)), ValueError, "radius R"),
    (lambda: L.bag_points(P, 2.5, 8, (4, 4)), TypeError, "radius R"),
    (lambda: L.bag_points(P, True, 8, (4, 4)), TypeError, "radius R"),
    (lambda: L.bag_points(P, 1, 0, (4, 4)), ValueError, "stride"),
    (lambda: L.bag_points(P, 1, float("nan"), (4, 4)), ValueError, "stride"),
    (lambda: L.bag_points(P, 1, 8, (4,)), ValueError, "image_size"),
    (lambda: L.bag_points(P, 1, 8, (-4, 4)), ValueError, "image_size"),
    (lambda: L.bag_points([[1.0, 2.0]], 1, 8, (4, 4)), TypeError, "torch.Tensor"),
    (lambda: L.negative_mask(P, torch.tensor([0, 5]), (4, 4), 8, 1, 3), ValueError,
     r"labels values must lie in \[0, 3\)"),
    (lambda: L.negative_mask(P, torch.tensor([0]), (4, 4), 8, 1, 3), ValueError, "labels"),
    (lambda: L.negative_mask(P, LAB.int(), (4, 4), 8, 1, 3), TypeError, "int64"),
    (lambda: L.negative_mask(P, LAB, (4, 4), 8, 1, -1), ValueError, "num_classes"),
    (lambda: L.bilinear_gather(F[0], P, B, 8), ValueError, r"\(B, C, H, W\)"),
    (lambda: L.bilinear_gather(F.long(), P, B, 8), TypeError, "floating"),
    (lambda: L.bilinear_gather(F, P, torch.tensor([0, 2]), 8), ValueError,
     r"batch_idx values must lie in \[0, 2\)"),
    (lambda: L.bilinear_gather(F, P, torch.tensor([0]), 8), ValueError, "batch_idx"),
    (lambda: L.bilinear_gather(F, P, B, -8), ValueError, "stride"),
    (lambda: L.bag_gather(F, P, B, S[:1], 1, 8), ValueError, "image_sizes"),
    (lambda: L.bag_gather(F, P, B, S.float(), 1, 8), TypeError, "image_sizes must be int64"),
    (lambda: L.bag_gather(F, P, B, S, -2, 8), ValueError, "radius R"),
    (lambda: L.bag_gather(F, P, B, S, 5000, 8), ValueError, "radius R"),
]


@pytest.mark.parametrize("call,error,message", CASES)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_kernels_check_arguments_too():
    # torch.ops.cpr_d2.* called directly (not through the wrappers) still refuse.
    with pytest.raises(RuntimeError, match="batch_idx values must lie"):
        torch.ops.cpr_d2.bilinear_gather(F, P, torch.tensor([0, 7]), 8.0)
    with pytest.raises(RuntimeError, match="labels must lie"):
        torch.ops.cpr_d2.negative_mask(P, torch.tensor([0, 9]), 4, 4, 8.0, 1, 3)
    with pytest.raises(RuntimeError, match="radius R must be >= 0"):
        torch.ops.cpr_d2.bag_gather(F, P, B, S, -1, 8.0)
    with pytest.raises(RuntimeError, match="grad_out holds"):
        torch.ops.cpr_d2.bag_gather_backward(torch.zeros(2, 9, 4), P, B, 1, 8.0, [2, 3, 4, 4])
