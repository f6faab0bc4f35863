import math

import pytest
import torch

import cpr_d2.layers as L
from tests.conftest import requires_cuda

from .inputs import random_points

kernel = torch.ops.cpr_d2.bag_points


def test_bag_size():
    assert [L.bag_size(r) for r in (0, 1, 2, 5, 7, 8)] == [1, 9, 25, 121, 225, 289]


def test_ring_geometry_by_hand():
    coords, valid = L.bag_points(torch.tensor([[100.0, 50.0]]), 2, 8.0, (200, 300))
    assert coords.shape == (1, 25, 2) and valid.all()
    c = coords[0].double()
    # Ring 1 (8 points, radius 8), ring 2 (16 points, radius 16), then the point itself.
    radii = (c - torch.tensor([100.0, 50.0], dtype=torch.float64)).norm(dim=1)
    assert torch.allclose(radii[:8], torch.full((8,), 8.0, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(radii[8:24], torch.full((16,), 16.0, dtype=torch.float64), atol=1e-4)
    assert c[24].tolist() == [100.0, 50.0]
    # Angles 2*pi*t/(8k), counter-clockwise from +x in image axes (y down).
    assert torch.allclose(c[0], torch.tensor([108.0, 50.0], dtype=torch.float64))
    assert torch.allclose(c[2], torch.tensor([100.0, 58.0], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(c[8 + 3], torch.tensor([100 + 16 * math.cos(math.pi * 3 / 8),
                                                  50 + 16 * math.sin(math.pi * 3 / 8)],
                                                 dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,radius,stride,size", [
    (1, 0, 8.0, (40, 60)), (17, 1, 4.0, (33, 65)), (50, 5, 4.0, (640, 480)),
    (200, 8, 8.0, (400, 667)), (13, 3, 2.5, (30, 20)), (5, 7, 16.0, (1, 1)),
])
def test_kernel_matches_reference(gen, dtype, n, radius, stride, size):
    points = random_points(n, size[0], size[1], gen, dtype=dtype)
    coords, valid = kernel(points, radius, stride, size[0], size[1])
    ref_coords, ref_valid = L.bag_points_reference(points, radius, stride, size)
    assert coords.dtype == dtype and valid.dtype == torch.bool
    assert torch.equal(coords, ref_coords)
    assert torch.equal(valid, ref_valid)


def test_points_on_image_edges_are_valid():
    # Closed image: x = width and y = height are still on it; a hair beyond is not.
    pts = torch.tensor([[0.0, 0.0], [60.0, 40.0], [60.0, 0.0], [60.001, 10.0], [-0.001, 5.0]])
    _, valid = L.bag_points(pts, 0, 8.0, (40, 60))
    assert valid[:, 0].tolist() == [True, True, True, False, False]


def test_points_outside_the_image_and_nan():
    pts = torch.tensor([[-100.0, 20.0], [30.0, 1e9], [float("nan"), 3.0]])
    coords, valid = L.bag_points(pts, 2, 8.0, (40, 60))
    assert not valid.any()
    assert torch.isnan(coords[2, :, 0]).all()


def test_partially_valid_bag():
    # A point 8 px from the left edge: ring 2 (16 px) pokes out on the left only.
    coords, valid = L.bag_points(torch.tensor([[8.0, 20.0]]), 2, 8.0, (40, 60))
    assert torch.equal(valid[0], (coords[0, :, 0] >= 0) & (coords[0, :, 1] >= 0)
                       & (coords[0, :, 1] <= 40))
    assert 0 < valid.sum() < 25


def test_no_points():
    coords, valid = L.bag_points(torch.zeros(0, 2), 3, 8.0, (40, 60))
    assert coords.shape == (0, 49, 2) and valid.shape == (0, 49)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(gen, dtype):
    points = random_points(300, 400, 667, gen, dtype=dtype)
    coords, valid = L.bag_points(points, 8, 8.0, (400, 667))
    coords_cuda, valid_cuda = L.bag_points(points.cuda(), 8, 8.0, (400, 667))
    # The offsets come from one float64 table and are added without FMA, so
    # the devices agree exactly.
    assert torch.equal(coords_cuda.cpu(), coords)
    assert torch.equal(valid_cuda.cpu(), valid)
