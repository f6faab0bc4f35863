import pytest
import torch

import cpr_d2.layers as L
from tests.conftest import requires_cuda

from .inputs import random_points

kernel = torch.ops.cpr_d2.negative_mask


def test_by_hand():
    # Grid 5 x 8 at stride 8 (cell centres at 4, 12, 20, ...), R = 1 (8 px).
    pts = torch.tensor([[10.0, 10.0], [50.0, 20.0]])
    mask = L.negative_mask(pts, torch.tensor([0, 1]), (5, 8), 8.0, 1, 3).view(5, 8, 3)
    not_neg_0 = {(i, j) for i in range(5) for j in range(8) if not mask[i, j, 0]}
    not_neg_1 = {(i, j) for i in range(5) for j in range(8) if not mask[i, j, 1]}
    # (10,10) is within 8 px of centres (12,4), (4,12), (12,12) but not (4,4) (8.49 px).
    assert not_neg_0 == {(0, 1), (1, 0), (1, 1)}
    # (50,20) is within 8 px of (44,20) and (52,20); (52,12) is sqrt(68) = 8.25 px away.
    assert not_neg_1 == {(2, 5), (2, 6)}
    assert mask[:, :, 2].all()  # a class absent from the image: every cell is a negative


def test_distance_exactly_r_times_s_is_negative():
    # Cell centre (12, 4); a point exactly 16 px below it, R*s = 2*8 = 16.
    mask = L.negative_mask(torch.tensor([[12.0, 20.0]]), torch.tensor([0]), (4, 4), 8.0, 2, 1)
    assert mask.view(4, 4)[0, 1]  # d == R*s -> negative
    assert not mask.view(4, 4)[1, 1]  # d = 8 < 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,classes,grid,stride,radius", [
    (1, 1, (5, 7), 8.0, 1), (20, 80, (50, 84), 8.0, 8), (300, 1, (160, 160), 4.0, 5),
    (40, 3, (13, 29), 2.5, 3), (7, 5, (1, 1), 16.0, 2), (64, 2, (30, 40), 8.0, 0),
])
def test_kernel_matches_reference(gen, dtype, n, classes, grid, stride, radius):
    points = random_points(n, int(grid[0] * stride), int(grid[1] * stride), gen, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=gen)
    mask = kernel(points, labels, grid[0], grid[1], stride, radius, classes)
    ref = L.negative_mask_reference(points, labels, grid, stride, radius, classes)
    assert mask.shape == (grid[0] * grid[1], classes) and mask.dtype == torch.bool
    assert torch.equal(mask, ref)


def test_radius_zero_makes_every_cell_negative(gen):
    pts = random_points(30, 80, 80, gen)
    assert L.negative_mask(pts, torch.zeros(30, dtype=torch.long), (10, 10), 8.0, 0, 2).all()


def test_per_class_not_per_cell():
    # Two classes on the same spot: the cell is not a negative for either,
    # but stays a negative for the third.
    pts = torch.tensor([[4.0, 4.0], [4.0, 4.0]])
    mask = L.negative_mask(pts, torch.tensor([0, 1]), (3, 3), 8.0, 1, 3)
    assert mask[0].tolist() == [False, False, True]


def test_no_points_and_empty_grid():
    none = L.negative_mask(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), (4, 6), 8.0, 2, 3)
    assert none.shape == (24, 3) and none.all()
    empty = L.negative_mask(torch.tensor([[1.0, 2.0]]), torch.tensor([0]), (0, 6), 8.0, 2, 3)
    assert empty.shape == (0, 3)


def test_points_far_outside_do_not_touch_the_grid():
    pts = torch.tensor([[-1e30, 5.0], [5.0, 1e30], [float("nan"), 4.0]])
    mask = L.negative_mask(pts, torch.tensor([0, 0, 0]), (4, 4), 8.0, 3, 1)
    assert mask.all()


@requires_cuda
@pytest.mark.parametrize("n,classes,grid,stride,radius", [
    (20, 80, (50, 84), 8.0, 8), (300, 1, (160, 160), 4.0, 5), (1000, 3, (64, 64), 4.0, 2),
])
def test_cuda_matches_cpu(gen, n, classes, grid, stride, radius):
    points = random_points(n, int(grid[0] * stride), int(grid[1] * stride), gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    cpu = L.negative_mask(points, labels, grid, stride, radius, classes)
    cuda = L.negative_mask(points.cuda(), labels.cuda(), grid, stride, radius, classes)
    assert torch.equal(cuda.cpu(), cpu)
