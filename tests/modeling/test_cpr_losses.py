"""CPRNet's losses and refinement rule against values computed by hand."""
import math

import pytest
import torch

from cpr_d2.modeling.cpr_losses import (annotation_loss, mil_loss, negative_loss,
                                        quality_focal_loss, quality_focal_loss_with_logits,
                                        score_variance_loss)
from cpr_d2.modeling.cpr_refine import refine_points


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


# ---- refinement: one object of class 0 annotated at (10, 10); a bag of 3 points.

def _refine(probs0, probs1=None, coords=None, valid=None, extra=None):
    """Refine object 0 (class 0). `extra`: more objects as (point, label), each with a
    bag of three copies of its point and low scores."""
    coords = coords or [(12.0, 10.0), (8.0, 10.0), (10.0, 10.0)]
    probs1 = probs1 or [0.05, 0.05, 0.05]
    bags = [torch.tensor(coords, dtype=torch.float64)]
    prob = [torch.tensor([probs0, probs1], dtype=torch.float64).t()]
    points, labels = [(10.0, 10.0)], [0]
    for point, label in extra or []:
        bags.append(torch.tensor([point] * 3, dtype=torch.float64))
        prob.append(torch.full((3, 2), 0.01, dtype=torch.float64))
        points.append(point)
        labels.append(label)
    bag_valid = torch.ones(len(points), 3, dtype=torch.bool)
    if valid is not None:
        bag_valid[0] = torch.tensor(valid)
    refined, score, kept, mask = refine_points(
        torch.stack(bags), bag_valid, torch.stack(prob), torch.tensor(points, dtype=torch.float64),
        torch.tensor(labels), 0.1, 0.5)
    return refined[0].tolist(), score[0].item(), kept[0].item(), bool(mask[0])


def test_refine_weighted_mean_of_kept_points():
    point, score, kept, refined = _refine([0.6, 0.3, 0.4])
    assert point == pytest.approx([(0.6 * 12 + 0.3 * 8 + 0.4 * 10) / 1.3, 10.0])
    assert score == pytest.approx(1.3 / 3) and kept == 3 and refined


def test_refine_rule_inside_image():
    point, _, kept, _ = _refine([0.6, 0.3, 0.4], valid=[False, True, True])
    assert kept == 2 and point == pytest.approx([(0.3 * 8 + 0.4 * 10) / 0.7, 10.0])


def test_refine_rule_top_class():
    point, _, kept, _ = _refine([0.6, 0.3, 0.4], probs1=[0.7, 0.05, 0.05])
    assert kept == 2 and point == pytest.approx([(0.3 * 8 + 0.4 * 10) / 0.7, 10.0])


def test_refine_rule_absolute_threshold():
    # Relative threshold 0.5 * 0.12 = 0.06 passes 0.08, the absolute 0.1 does not.
    point, _, kept, _ = _refine([0.6, 0.08, 0.12])
    assert kept == 2 and point == pytest.approx([(0.6 * 12 + 0.12 * 10) / 0.72, 10.0])


def test_refine_rule_relative_threshold():
    # 0.25 passes the absolute 0.1 but not 0.5 * 0.6 = 0.3.
    point, _, kept, _ = _refine([0.6, 0.25, 0.6])
    assert kept == 2 and point == pytest.approx([(0.6 * 12 + 0.6 * 10) / 1.2, 10.0])


def test_refine_rule_nearest_annotated_point_of_the_same_class():
    # Another class-0 object at (14, 10): (13, 10) is nearer to it; (12, 10) is a tie (kept).
    coords = [(13.0, 10.0), (8.0, 10.0), (10.0, 10.0)]
    _, _, kept, _ = _refine([0.6, 0.3, 0.4], coords=coords, extra=[((14.0, 10.0), 0)])
    assert kept == 2
    _, _, kept, _ = _refine([0.6, 0.3, 0.4], extra=[((14.0, 10.0), 0)])
    assert kept == 3
    # An object of another class does not compete.
    _, _, kept, _ = _refine([0.6, 0.3, 0.4], coords=coords, extra=[((14.0, 10.0), 1)])
    assert kept == 3


def test_refine_falls_back_to_the_annotated_point():
    point, score, kept, refined = _refine([0.05, 0.08, 0.09])
    assert point == [10.0, 10.0] and kept == 0 and score == 0 and not refined


def test_refine_no_objects():
    refined, score, kept, mask = refine_points(torch.zeros(0, 9, 2), torch.zeros(0, 9, dtype=torch.bool),
                                               torch.zeros(0, 9, 3), torch.zeros(0, 2),
                                               torch.zeros(0, dtype=torch.long))
    assert refined.shape == (0, 2) and score.shape == kept.shape == mask.shape == (0,)


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
