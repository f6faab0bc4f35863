import os
import shutil
import subprocess
import sys

import pytest
import torch

import cpr_d2.layers as L
from cpr_d2.layers import _ext

OPS = ["bag_points", "negative_mask", "bilinear_gather", "bilinear_gather_backward",
       "bag_gather", "bag_gather_backward", "point_ap_match"]


def nvcc_available():
    return bool(shutil.which("nvcc") or os.path.isfile("/usr/local/cuda/bin/nvcc")
                or os.environ.get("CUDA_HOME"))


def test_extension_is_built():
    status = L.extension_status()
    assert status["built"], (
        f"cpr_d2._C failed to import ({status['error']}); run `CPR_D2_REBUILD=1 bash "
        "tools/setup_env.sh`")


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cpr_d2::{op}", "CPU")


def test_cuda_built_wherever_nvcc_exists():
    # A CUDA toolkit present at build time must give a CUDA build, so a broken
    # CUDA build cannot pass as a CPU-only one.
    if os.environ.get("CPR_D2_NO_CUDA", "0") == "1" or not nvcc_available():
        pytest.skip("no CUDA toolkit here, or CPR_D2_NO_CUDA=1: a CPU-only build is expected")
    assert L.extension_status()["with_cuda"]


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered_when_built_with_cuda(op):
    if not L.extension_status()["with_cuda"]:
        pytest.skip("CPU-only build")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cpr_d2::{op}", "CUDA")


FALLBACK_SCRIPT = r"""
import sys, importlib.abc

class BlockExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cpr_d2._C":
            raise ImportError("blocked for the test")

sys.meta_path.insert(0, BlockExtension())
import torch
import cpr_d2
import cpr_d2.layers as L
assert not L.extension_status()["built"]
f = torch.randn(2, 3, 8, 8, requires_grad=True)
p = torch.rand(5, 2) * 64
b = torch.tensor([0, 1, 1, 0, 1])
sizes = torch.tensor([[64, 64], [60, 50]])
for _ in range(3):
    out, valid = L.bag_gather(f, p, b, sizes, 2, 8)
ref, ref_valid = L.bag_gather_reference(f, p, b, sizes, 2, 8)
assert torch.equal(out, ref) and torch.equal(valid, ref_valid)
out.sum().backward()
assert f.grad is not None
L.negative_mask(p, torch.zeros(5, dtype=torch.long), (8, 8), 8, 2, 1)
import numpy as np
from cpr_d2.evaluation.point_ap import evaluate_point_ap
one_gt = {"boxes": np.array([[0.0, 0.0, 10.0, 10.0]]), "classes": np.array([0])}
one_det = {"points": np.array([[5.0, 5.0]]), "scores": np.array([0.9]), "classes": np.array([0])}
assert evaluate_point_ap([one_gt], [one_det], 1).ap[0, 0, 0] == 100 / 101  # numpy matcher
print("FALLBACK-OK")
"""


def test_import_and_fallback_without_extension():
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "FALLBACK-OK" in proc.stdout
    # Logged once, however many calls fell back.
    assert proc.stderr.count("cpr_d2._C is not available") == 1, proc.stderr


def test_unsupported_dtype_falls_back_to_reference(caplog):
    f = torch.randn(1, 2, 4, 4).to(torch.bfloat16)
    p = torch.tensor([[3.0, 5.0]])
    out = L.bilinear_gather(f, p, torch.tensor([0]), 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), L.bilinear_gather(f.float(), p, torch.tensor([0]), 4),
                               rtol=1e-2, atol=1e-2)
    assert ("dtype", "bilinear_gather", "cpu", torch.bfloat16) in _ext._logged
