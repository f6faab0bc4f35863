"""Every wrapper rejects bad arguments with a clear error: the same type and message
whether its compiled kernel or its PyTorch reference runs."""
import pytest
import torch

import cpr_d2.layers as L
from cpr_d2.layers import _checks

P = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
F = torch.zeros(2, 3, 4, 4)
B = torch.tensor([0, 1])
S = torch.tensor([[32, 32], [32, 32]])
LAB = torch.tensor([0, 1])

CASES = [
    # (op, arguments, exception, message fragment)
    ("bag_points", (torch.zeros(3), 1, 8, (4, 4)), ValueError, r"shape \(N, 2\)"),
    ("bag_points", (torch.zeros(3, 2, dtype=torch.long), 1, 8, (4, 4)), TypeError, "floating"),
    ("bag_points", (P.half(), 1, 8, (4, 4)), TypeError, "float32 or float64"),
    ("bag_points", (P, -1, 8, (4, 4)), ValueError, "radius R"),
    ("bag_points", (P, 2.5, 8, (4, 4)), TypeError, "radius R"),
    ("bag_points", (P, True, 8, (4, 4)), TypeError, "radius R"),
    ("bag_points", (P, 1, 0, (4, 4)), ValueError, "stride"),
    ("bag_points", (P, 1, float("nan"), (4, 4)), ValueError, "stride"),
    ("bag_points", (P, 1, 8, (4,)), ValueError, "image_size"),
    ("bag_points", (P, 1, 8, (-4, 4)), ValueError, "image_size"),
    ("bag_points", ([[1.0, 2.0]], 1, 8, (4, 4)), TypeError, "torch.Tensor"),
    ("negative_mask", (P, torch.tensor([0, 5]), (4, 4), 8, 1, 3), ValueError,
     r"labels values must lie in \[0, 3\)"),
    ("negative_mask", (P, torch.tensor([-1, 0]), (4, 4), 8, 1, 3), ValueError,
     r"labels values must lie in \[0, 3\), got \[-1, 0\]"),
    ("negative_mask", (P, torch.tensor([0]), (4, 4), 8, 1, 3), ValueError, "labels"),
    ("negative_mask", (P, LAB.int(), (4, 4), 8, 1, 3), TypeError, "int64"),
    ("negative_mask", (P, [0, 1], (4, 4), 8, 1, 3), TypeError, "torch.Tensor"),
    ("negative_mask", (P, LAB, (4, 4), 8, 1, -1), ValueError, "num_classes"),
    ("negative_mask", (P[:, :1], LAB, (4, 4), 8, 1, 3), ValueError, r"shape \(N, 2\)"),
    ("bilinear_gather", (F[0], P, B, 8), ValueError, r"\(B, C, H, W\)"),
    ("bilinear_gather", (F.long(), P, B, 8), TypeError, "floating"),
    ("bilinear_gather", (F, P.long(), B, 8), TypeError, "floating"),
    ("bilinear_gather", (F, P, torch.tensor([0, 2]), 8), ValueError,
     r"batch_idx values must lie in \[0, 2\)"),
    ("bilinear_gather", (F, P, torch.tensor([-1, 0]), 8), ValueError,
     r"batch_idx values must lie in \[0, 2\)"),
    ("bilinear_gather", (F, P, torch.tensor([0]), 8), ValueError, "batch_idx"),
    ("bilinear_gather", (F, P, B.int(), 8), TypeError, "int64"),
    ("bilinear_gather", (F, P, B, -8), ValueError, "stride"),
    ("bilinear_gather", (F, P, [0, 1], 8), TypeError, "torch.Tensor"),
    ("bag_gather", (F, P, B, S[:1], 1, 8), ValueError, "image_sizes"),
    ("bag_gather", (F, P, B, S.float(), 1, 8), TypeError, "image_sizes must be int64"),
    ("bag_gather", (F, P, B, [[32, 32], [32, 32]], 1, 8), TypeError, "torch.Tensor"),
    ("bag_gather", (F, P, B, S, -2, 8), ValueError, "radius R"),
    ("bag_gather", (F, P, B, S, 5000, 8), ValueError, "radius R"),
    ("bag_gather", (F, P.long(), B, S, 1, 8), TypeError, "floating"),
    ("bag_gather", (F, P, torch.tensor([0, 2]), S, 1, 8), ValueError,
     r"batch_idx values must lie in \[0, 2\)"),
]


@pytest.mark.parametrize("face", ["wrapper", "reference"])
@pytest.mark.parametrize("op,args,error,message", CASES)
def test_bad_arguments(op, args, error, message, face):
    # With the extension built, the wrapper face leaves the tensor checks to the kernel.
    call = getattr(L, op if face == "wrapper" else op + "_reference")
    with pytest.raises(error, match=message):
        call(*args)


def test_compiled_path_leaves_the_tensor_checks_to_the_kernels(monkeypatch):
    """No aminmax of an index (a host synchronisation on CUDA) or other tensor check
    in Python before a kernel call: the kernels make them."""
    if not L.extension_status()["built"]:
        pytest.skip("cpr_d2._C is not built")

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor check ran in Python before the kernel")

    for name in ("check_points", "check_features", "check_index", "check_region",
                 "check_image_sizes"):
        monkeypatch.setattr(_checks, name, refuse)
    monkeypatch.setattr(torch, "aminmax", refuse)
    region = torch.tensor([8.0, 16.0])
    L.bag_points(P, 1, 8, (4, 4), region=region)
    L.negative_mask(P, LAB, (4, 4), 8, 1, 2, region=region)
    L.bilinear_gather(F, P, B, 8)
    L.bag_gather(F, P, B, S, 1, 8, region)


def test_kernels_check_arguments_too():
    # torch.ops.cpr_d2.* called directly (not through the wrappers) still refuse, with
    # the wrappers' error types.
    with pytest.raises(ValueError, match="batch_idx values must lie"):
        torch.ops.cpr_d2.bilinear_gather(F, P, torch.tensor([0, 7]), 8.0)
    with pytest.raises(ValueError, match=r"batch_idx values must lie in \[0, 2\)"):
        torch.ops.cpr_d2.bilinear_gather_backward(torch.zeros(2, 3), P, torch.tensor([-3, 0]),
                                                  8.0, [2, 3, 4, 4])
    with pytest.raises(TypeError, match="batch_idx must be int64"):
        torch.ops.cpr_d2.bilinear_gather(F, P, B.int(), 8.0)
    with pytest.raises(ValueError, match=r"labels values must lie in \[0, 3\), got \[0, 9\]"):
        torch.ops.cpr_d2.negative_mask(P, torch.tensor([0, 9]), 4, 4, 8.0, 1, 3)
    with pytest.raises(TypeError, match="labels must be int64"):
        torch.ops.cpr_d2.negative_mask(P, LAB.int(), 4, 4, 8.0, 1, 3)
    with pytest.raises(ValueError, match="radius R must be >= 0"):
        torch.ops.cpr_d2.bag_gather(F, P, B, S, -1, 8.0)
    with pytest.raises(TypeError, match="points must be float32 or float64"):
        torch.ops.cpr_d2.bag_points(P.half(), 1, 8.0, 4, 4)
    with pytest.raises(ValueError, match=r"features must have shape \(B, C, H, W\)"):
        torch.ops.cpr_d2.bag_gather(F[0], P, B, S, 1, 8.0)
    with pytest.raises(ValueError, match="grad_out holds"):
        torch.ops.cpr_d2.bag_gather_backward(torch.zeros(2, 9, 4), P, B, 1, 8.0, [2, 3, 4, 4])
