"""CPRNet's losses against values computed by hand (the refinement rule:
test_cpr_refine.py)."""
import math

import pytest
import torch

from cpr_d2.modeling.cpr_losses import (annotation_loss, mil_loss, negative_loss,
                                        quality_focal_loss, quality_focal_loss_with_logits,
                                        score_variance_loss)


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return (p / (1 - p)).log()


def test_quality_focal_loss_by_hand():
    # |0.8 - 1|^2 * -log(0.8)
    assert quality_focal_loss(torch.tensor(0.8, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64),
                              2.0).item() == pytest.approx(0.04 * -math.log(0.8))
    # q = 0: |0.3|^2 * -log(0.7)
    assert quality_focal_loss(torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                              2.0).item() == pytest.approx(0.09 * -math.log(0.7))


def test_logit_and_probability_forms_agree(gen):
    x = torch.randn(1000, generator=gen, dtype=torch.float64) * 4
    q = torch.rand(1000, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(quality_focal_loss_with_logits(x, q, 2.0),
                               quality_focal_loss(x.sigmoid(), q, 2.0, eps=1e-12))


def _bag():
    # One object of class 0, a bag of 3 points (the last is the annotated point), 2 classes.
    cls = torch.stack([logit([0.8, 0.2, 0.5]), logit([0.1, 0.1, 0.1])], dim=1)[None]  # (1, 3, 2)
    ins = torch.stack([torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64).log(),
                       torch.zeros(3, dtype=torch.float64)], dim=1)[None]
    return cls, ins


def test_mil_loss_by_hand():
    cls, ins = _bag()
    labels = torch.tensor([0])
    # class 0: softmax of log(2, 1, 1) = (0.5, 0.25, 0.25); P = 0.8*0.5 + 0.2*0.25 + 0.5*0.25 = 0.575
    # class 1: uniform weights, P = 0.1
    expected = (0.425 ** 2) * -math.log(0.575) + (0.1 ** 2) * -math.log(0.9)
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert mil_loss(cls, ins, valid, labels, 2.0).item() == pytest.approx(expected)
    # Point 1 off the image: weights over points 0 and 2 = (2/3, 1/3); P0 = 0.8*2/3 + 0.5/3 = 0.7
    valid[0, 1] = False
    expected = (0.3 ** 2) * -math.log(0.7) + (0.1 ** 2) * -math.log(0.9)
    assert mil_loss(cls, ins, valid, labels, 2.0).item() == pytest.approx(expected)


def test_mil_loss_keeps_the_annotated_point_even_if_marked_invalid():
    cls, ins = _bag()
    valid = torch.tensor([[True, True, False]])
    # The annotated point always takes part: same as all valid.
    assert mil_loss(cls, ins, valid, torch.tensor([0]), 2.0).item() == pytest.approx(
        mil_loss(cls, ins, torch.ones(1, 3, dtype=torch.bool), torch.tensor([0]), 2.0).item())


def test_annotation_loss_by_hand():
    ann = logit([[0.9, 0.3], [0.2, 0.6]])
    labels = torch.tensor([0, 1])
    first = 0.01 * -math.log(0.9) + 0.09 * -math.log(0.7)
    second = 0.04 * -math.log(0.8) + 0.16 * -math.log(0.6)
    assert annotation_loss(ann, labels, 2.0).item() == pytest.approx((first + second) / 2)


def test_negative_loss_is_normalised_by_objects_not_negatives():
    neg = logit([0.5, 0.2])
    total = 0.25 * -math.log(0.5) + 0.04 * -math.log(0.8)
    assert negative_loss(neg, 2, 2.0).item() == pytest.approx(total / 2)
    assert negative_loss(neg, 0, 2.0).item() == pytest.approx(total)  # no objects: divide by 1


def test_losses_without_objects_are_zero_and_differentiable():
    cls = torch.zeros(0, 5, 3, requires_grad=True)
    ins = torch.zeros(0, 5, 3, requires_grad=True)
    loss = mil_loss(cls, ins, torch.zeros(0, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.long), 2.0)
    loss = loss + annotation_loss(cls[:, -1], torch.zeros(0, dtype=torch.long), 2.0)
    assert loss.item() == 0
    loss.backward()
    assert cls.grad is not None


def test_score_variance_loss_by_hand():
    # One object, three bag points (the centre last): equal instance logits, class scores
    # 0.5, 0.5 and 0 (logit -inf via a large negative) at x = -2, +2 and 0.
    coords = torch.tensor([[[-2.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
    cls = torch.tensor([[[0.0], [0.0], [-60.0]]])
    ins = torch.zeros(1, 3, 1)
    valid = torch.ones(1, 3, dtype=torch.bool)
    # q = (0.5, 0.5, 0): mean 0, spread 4 px^2; region 4 px -> 4 / 16.
    loss = score_variance_loss(cls, ins, valid, coords, torch.tensor([0]), torch.tensor([4.0]))
    assert loss.item() == pytest.approx(0.25, abs=1e-6)
    # All the mass on one point: no spread. An invalid point takes no part.
    cls2 = torch.tensor([[[5.0], [-60.0], [-60.0]]])
    assert score_variance_loss(cls2, ins, valid, coords, torch.tensor([0]),
                               torch.tensor([4.0])).item() == pytest.approx(0.0, abs=1e-6)
    valid[0, 1] = False
    assert score_variance_loss(cls, ins, valid, coords, torch.tensor([0]),
                               torch.tensor([4.0])).item() == pytest.approx(0.0, abs=1e-6)
    # Gradients reach both logit sets; an empty batch gives 0.
    cls.requires_grad_(True)
    ins.requires_grad_(True)
    score_variance_loss(cls, ins, torch.ones(1, 3, dtype=torch.bool), coords,
                        torch.tensor([0]), torch.tensor([4.0])).backward()
    assert cls.grad.abs().sum() > 0
    empty = score_variance_loss(torch.zeros(0, 3, 1), torch.zeros(0, 3, 1),
                                torch.zeros(0, 3, dtype=torch.bool), torch.zeros(0, 3, 2),
                                torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.item() == 0
