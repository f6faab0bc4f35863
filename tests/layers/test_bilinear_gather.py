import pytest
import torch

import cpr_d2.layers as L
from tests.conftest import requires_cuda

from .inputs import assert_same_forward_backward, forward_backward, random_batch

# Kernel vs reference: grid_sample unnormalises coordinates in float32 itself,
# about 1e-5 of a cell off the kernels' arithmetic, so float32 needs 1e-4.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}
# CUDA vs CPU kernels: the same arithmetic; only the order of the
# gradient's atomic additions differs.
DEVICE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
              torch.float64: dict(rtol=1e-12, atol=1e-12)}

CASES = [  # num_images, channels, height, width, stride, points
    (1, 1, 1, 1, 8, 5), (1, 3, 7, 9, 8, 40), (2, 16, 50, 84, 8, 300),
    (3, 8, 13, 5, 4, 100), (2, 4, 9, 11, 3, 64),
]


def test_by_hand():
    # 1 x 1 x 2 x 2 map at stride 4: cell centres at 2 and 6 px.
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pts = torch.tensor([[2.0, 2.0], [6.0, 6.0], [4.0, 2.0], [4.0, 4.0], [0.0, 0.0], [100.0, 3.0]])
    out = L.bilinear_gather(f, pts, torch.zeros(6, dtype=torch.long), 4.0)
    # centre of (0,0); centre of (1,1); halfway along the top row; the middle;
    # clamped to the first centre; clamped right, a quarter of the way down.
    assert out[:, 0].tolist() == [1.0, 4.0, 1.5, 2.5, 1.0, 2.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(gen, dtype, case):
    b, c, h, w, s, n = case
    features, points, batch_idx, _ = random_batch(b, c, h, w, s, n, gen, dtype=dtype)
    assert_same_forward_backward(
        lambda f: L.bilinear_gather_reference(f, points, batch_idx, s), features,
        lambda f: L.bilinear_gather(f, points, batch_idx, s), features, gen, TOL[dtype])


def test_uses_the_compiled_kernel(gen):
    features, points, batch_idx, _ = random_batch(2, 4, 6, 6, 8, 20, gen)
    direct = torch.ops.cpr_d2.bilinear_gather(features, points, batch_idx, 8.0)
    assert torch.equal(L.bilinear_gather(features, points, batch_idx, 8), direct)


def test_channels_last_input(gen):
    features, points, batch_idx, _ = random_batch(2, 6, 10, 12, 8, 50, gen)
    out = L.bilinear_gather(features.contiguous(memory_format=torch.channels_last),
                            points, batch_idx, 8)
    torch.testing.assert_close(out, L.bilinear_gather(features, points, batch_idx, 8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_comes_back_in_the_input_memory_format(gen, channels_last):
    features, points, batch_idx, _ = random_batch(2, 6, 10, 12, 8, 50, gen)
    state = gen.get_state()
    ref, ref_grad = forward_backward(
        lambda f: L.bilinear_gather_reference(f, points, batch_idx, 8), features, gen)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_(True)
    out = L.bilinear_gather(features, points, batch_idx, 8)
    out.backward(torch.randn(out.shape, generator=gen.set_state(state)))
    assert features.grad.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out.detach(), ref, **TOL[torch.float32])
    torch.testing.assert_close(features.grad, ref_grad, **TOL[torch.float32])


def test_gradcheck(gen):
    features, points, batch_idx, _ = random_batch(2, 3, 5, 6, 4, 25, gen, dtype=torch.float64)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: L.bilinear_gather(f, points, batch_idx, 4), (features,))


def test_points_of_each_image_read_their_own_map(gen):
    # Map b is constant b: every point must read its own image's value.
    features = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 5).contiguous()
    _, points, batch_idx, _ = random_batch(3, 2, 4, 5, 8, 60, gen)
    out = L.bilinear_gather(features, points, batch_idx, 8)
    assert torch.equal(out, batch_idx.float()[:, None].expand(60, 2))


@pytest.mark.parametrize("shape,n", [((2, 3, 0, 5), 4), ((2, 3, 4, 0), 4), ((2, 0, 4, 5), 4),
                                     ((2, 3, 4, 5), 0), ((0, 3, 4, 5), 0)])
def test_empty_inputs(shape, n):
    features = torch.randn(shape, requires_grad=True)
    points = torch.rand(n, 2) * 10
    batch_idx = torch.zeros(n, dtype=torch.long)
    for fn in (L.bilinear_gather, L.bilinear_gather_reference):
        out = fn(features, points, batch_idx, 8)
        assert out.shape == (n, shape[1]) and not out.any()
        out.sum().backward()
        assert features.grad.shape == shape and not features.grad.any()
        features.grad = None


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_cpu(gen, dtype, case):
    b, c, h, w, s, n = case
    features, points, batch_idx, _ = random_batch(b, c, h, w, s, n, gen, dtype=dtype)
    cuda_points, cuda_idx = points.cuda(), batch_idx.cuda()
    assert_same_forward_backward(
        lambda f: L.bilinear_gather(f, points, batch_idx, s), features,
        lambda f: L.bilinear_gather(f, cuda_points, cuda_idx, s), features.cuda(), gen,
        DEVICE_TOL[dtype])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(gen, dtype):
    features, points, batch_idx, _ = random_batch(2, 16, 20, 24, 8, 200, gen)
    ref = L.bilinear_gather(features, points, batch_idx, 8)
    out = L.bilinear_gather(features.cuda().to(dtype), points.cuda(), batch_idx.cuda(), 8)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=2e-2)
