import numpy as np
import pytest
import torch
from detectron2.data import Metadata
from detectron2.structures import Instances

from cpr_d2.utils.visualizer import PointVisualizer, class_color


def canvas():
    return np.full((120, 160, 3), 40, np.uint8)


def changed(out, x, y, r=3):
    """Whether the drawing changed the pixels around (x, y)."""
    img = out.get_image()
    return (np.abs(img[y - r:y + r, x - r:x + r].astype(int) - 40) > 30).any()


def test_points_are_drawn_where_they_are_and_only_there():
    vis = PointVisualizer(canvas(), Metadata(thing_classes=["car", "tree"]))
    out = vis.draw_points([[30.0, 40.0], [120.0, 90.0]], classes=[0, 1], labels=False)
    assert out.get_image().shape == (120, 160, 3)
    assert changed(out, 30, 40) and changed(out, 120, 90)
    assert not changed(out, 80, 20, r=8)


def test_class_colours_differ_and_follow_metadata():
    assert class_color(0) != class_color(1)
    meta = Metadata(thing_colors=[(255, 0, 0), (0, 0, 255)])
    assert class_color(1, meta) == (0.0, 0.0, 1.0)
    vis = PointVisualizer(canvas(), meta)
    img = vis.draw_points([[50.0, 50.0]], classes=[1], labels=False).get_image()
    r, g, b = img[50, 50].astype(int)
    assert b > 150 and r < 100  # the blue class colour


def test_predictions_with_threshold_and_labels():
    inst = Instances((120, 160), pred_points=torch.tensor([[20.0, 60.0], [140.0, 60.0]]),
                     scores=torch.tensor([0.9, 0.1]), pred_classes=torch.tensor([0, 1]))
    out = PointVisualizer(canvas(), Metadata(thing_classes=["car", "tree"])).draw_point_predictions(
        inst, score_threshold=0.5)
    assert changed(out, 20, 60) and not changed(out, 140, 60)


def test_refinement_arrows_and_dataset_points():
    vis = PointVisualizer(canvas())
    out = vis.draw_refinement([[20.0, 20.0]], [[100.0, 90.0]], classes=[0])
    assert changed(out, 20, 20) and changed(out, 100, 90)
    assert changed(out, 60, 55, r=4)  # the arrow between them
    with pytest.raises(ValueError, match="one refined point per coarse point"):
        vis.draw_refinement([[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]])
    record = {"annotations": [{"point": [80.0, 30.0], "category_id": 0, "bbox": [60, 10, 40, 40]}]}
    out = PointVisualizer(canvas()).draw_dataset_points(record)
    assert changed(out, 80, 30) and changed(out, 60, 30, r=2)  # the point and its box edge


def test_regions_are_circles_of_their_radius():
    vis = PointVisualizer(canvas())
    out = vis.draw_regions([[60.0, 60.0]], [30.0], classes=[0])
    on_circle = [(90, 60), (30, 60), (60, 90), (60, 30)]
    assert sum(changed(out, x, y, r=2) for x, y in on_circle) >= 3  # dashed: most of them
    assert not changed(out, 60, 60, r=8)  # not filled
    assert not changed(out, 60 + 15, 60, r=3) and not changed(out, 130, 60, r=8)
    with pytest.raises(ValueError, match="2 centres but 1 radii"):
        vis.draw_regions([[1.0, 1.0], [2.0, 2.0]], [1.0])
