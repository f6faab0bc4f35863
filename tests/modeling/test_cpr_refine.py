"""CPRNet's refinement rule (cpr_d2/modeling/cpr_refine.py, refine_points) against values
computed by hand."""
import pytest
import torch

from cpr_d2.modeling.cpr_refine import refine_points


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
