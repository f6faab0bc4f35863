import pytest
import torch

import cpr_d2.layers as L
from tests.conftest import requires_cuda

from .inputs import assert_same_forward_backward, random_batch
from .test_bilinear_gather import DEVICE_TOL, TOL

CASES = [  # num_images, channels, height, width, stride, points, radius
    (1, 1, 1, 1, 8, 3, 1), (1, 4, 7, 9, 8, 10, 0), (2, 16, 50, 84, 8, 40, 8),
    (1, 8, 40, 40, 4, 60, 5), (3, 5, 11, 7, 4, 12, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(gen, dtype, case):
    b, c, h, w, s, n, r = case
    features, points, batch_idx, sizes = random_batch(b, c, h, w, s, n, gen, dtype=dtype)
    assert_same_forward_backward(
        lambda f: L.bag_gather_reference(f, points, batch_idx, sizes, r, s)[0], features,
        lambda f: L.bag_gather(f, points, batch_idx, sizes, r, s)[0], features, gen, TOL[dtype])
    feats, valid = L.bag_gather(features, points, batch_idx, sizes, r, s)
    assert feats.shape == (n, L.bag_size(r), c)
    ref_valid = L.bag_gather_reference(features, points, batch_idx, sizes, r, s)[1]
    assert torch.equal(valid, ref_valid)


def test_equals_bag_points_then_gather(gen):
    # The fused op is exactly the composition of the two plain ops.
    features, points, batch_idx, sizes = random_batch(2, 6, 20, 30, 8, 15, gen)
    feats, valid = L.bag_gather(features, points, batch_idx, sizes, 3, 8)
    for n in range(15):
        h, w = sizes[batch_idx[n]].tolist()
        coords, v = L.bag_points(points[n : n + 1], 3, 8, (h, w))
        plain = L.bilinear_gather(features, coords[0], batch_idx[n].repeat(coords.shape[1]), 8)
        assert torch.equal(feats[n], plain)
        assert torch.equal(valid[n], v[0])


def test_validity_uses_each_images_own_size():
    features = torch.zeros(2, 1, 10, 10)
    pts = torch.tensor([[70.0, 10.0], [70.0, 10.0]])
    sizes = torch.tensor([[80, 80], [80, 72]])
    _, valid = L.bag_gather(features, pts, torch.tensor([0, 1]), sizes, 1, 4)
    # slot 0 is 4 px to the right: x = 74 fits a 80 px wide image, not a 72 px one.
    assert valid[0, 0] and not valid[1, 0]


def test_gradcheck(gen):
    features, points, batch_idx, sizes = random_batch(2, 3, 6, 5, 4, 6, gen, dtype=torch.float64)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: L.bag_gather(f, points, batch_idx, sizes, 2, 4)[0], (features,))


def test_valid_is_not_differentiable(gen):
    features, points, batch_idx, sizes = random_batch(1, 2, 4, 4, 4, 3, gen)
    feats, valid = L.bag_gather(features.requires_grad_(True), points, batch_idx, sizes, 1, 4)
    assert feats.requires_grad and not valid.requires_grad


def test_no_points_and_empty_map():
    sizes = torch.tensor([[32, 32]])
    feats, valid = L.bag_gather(torch.randn(1, 3, 4, 4), torch.zeros(0, 2),
                                torch.zeros(0, dtype=torch.long), sizes, 2, 8)
    assert feats.shape == (0, 25, 3) and valid.shape == (0, 25)
    f = torch.randn(1, 3, 0, 4, requires_grad=True)
    args = (torch.tensor([[4.0, 4.0]]), torch.tensor([0]), sizes, 1, 8)
    feats, valid = L.bag_gather(f, *args)
    assert feats.shape == (1, 9, 3) and not feats.any()
    # Validity depends on the image, not the (empty) map: ring 1 pokes out left and up.
    assert valid[0].tolist() == [True, True, True, False, False, False, False, False, True]
    assert torch.equal(valid, L.bag_gather_reference(f, *args)[1])
    feats.sum().backward()
    assert f.grad.shape == f.shape


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_cpu(gen, dtype, case):
    b, c, h, w, s, n, r = case
    features, points, batch_idx, sizes = random_batch(b, c, h, w, s, n, gen, dtype=dtype)
    cuda_args = (points.cuda(), batch_idx.cuda(), sizes.cuda(), r, s)
    assert_same_forward_backward(
        lambda f: L.bag_gather(f, points, batch_idx, sizes, r, s)[0], features,
        lambda f: L.bag_gather(f, *cuda_args)[0], features.cuda(), gen, DEVICE_TOL[dtype])
    valid_cuda = L.bag_gather(features.cuda(), *cuda_args)[1]
    assert torch.equal(valid_cuda.cpu(), L.bag_gather(features, points, batch_idx, sizes, r, s)[1])
