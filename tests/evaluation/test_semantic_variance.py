import json
import math

import numpy as np
import pytest

from cpr_d2.evaluation.semantic_variance import (
    compare_point_jsons,
    format_comparison,
    made_worse,
    worse_by_range,
    format_table,
    normalized_offsets,
    semantic_variance,
    semantic_variance_json,
)
from tests.tool_loader import load_tool


def _at(box, u, v):
    """The point at box-normalised offset (u, v) of an XYWH box."""
    x, y, w, h = box
    return [x + w / 2 + u * w, y + h / 2 + v * h]


# Class 1: four objects with u = -0.2, 0, 0.2, 0.4 and v = 0.1 each:
#   var u = mean of (-0.3, -0.1, 0.1, 0.3)^2 = 0.2 / 4 = 0.05, var v = 0 -> class value 0.025.
# Class 2: two objects with o = (-0.1, -0.3) and (0.1, 0.3): var u = 0.01, var v = 0.09 -> 0.05.
# Class 3: one object (left out of the class mean by default).
BOXES = [
    [0.0, 0.0, 10.0, 10.0],
    [100.0, 50.0, 40.0, 20.0],
    [7.0, 3.0, 30.0, 60.0],
    [200.0, 200.0, 5.0, 50.0],
    [10.0, 10.0, 100.0, 8.0],
    [0.0, 300.0, 25.0, 25.0],
    [50.0, 50.0, 12.0, 12.0],
]
OFFSETS = [(-0.2, 0.1), (0.0, 0.1), (0.2, 0.1), (0.4, 0.1), (-0.1, -0.3), (0.1, 0.3), (0.3, -0.2)]
LABELS = [1, 1, 1, 1, 2, 2, 3]
POINTS = [_at(b, u, v) for b, (u, v) in zip(BOXES, OFFSETS)]


def _point_json(points=POINTS, boxes=BOXES, labels=LABELS, ids=None):
    ids = ids or list(range(1, len(points) + 1))
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 500, "width": 500}],
        "categories": [{"id": c, "name": f"c{c}"} for c in sorted(set(labels))],
        "annotations": [
            {
                "id": i,
                "image_id": 1,
                "category_id": c,
                "bbox": list(b),
                "point": list(p),
                "iscrowd": 0,
            }
            for i, p, b, c in zip(ids, points, boxes, labels)
        ],
    }


def test_offsets_are_normalised_by_the_box():
    o = normalized_offsets(POINTS, BOXES)
    assert o == pytest.approx(np.array(OFFSETS))
    with pytest.raises(ValueError, match="w > 0"):
        normalized_offsets([[0, 0]], [[0, 0, 0, 5]])


def test_single_class_variance_by_hand():
    stats = semantic_variance(POINTS[:4], BOXES[:4])
    assert stats.var_u == pytest.approx(0.05) and stats.var_v == pytest.approx(0.0)
    assert stats.rsv == pytest.approx(0.025)
    expected_distance = (math.sqrt(0.05) + math.sqrt(0.01) + math.sqrt(0.05) + math.sqrt(0.17)) / 4
    assert stats.mean_distance == pytest.approx(expected_distance)
    assert (stats.objects, stats.classes) == (4, 1)


def test_population_variance():
    # two offsets +-0.1: population variance 0.01 (the sample variance would be 0.02)
    stats = semantic_variance([_at(BOXES[0], -0.1, 0), _at(BOXES[0], 0.1, 0)], [BOXES[0]] * 2)
    assert stats.var_u == pytest.approx(0.01) and stats.rsv == pytest.approx(0.005)


def test_rsv_is_the_mean_over_classes():
    stats = semantic_variance(POINTS, BOXES, LABELS)
    assert stats.classes == 2  # class 3 has one object
    assert stats.rsv == pytest.approx((0.025 + 0.05) / 2)
    assert stats.per_class[2] == pytest.approx((2, 0.01, 0.09))
    assert stats.per_class[3][0] == 1
    # not the pooled variance of all six objects of classes 1 and 2
    pooled = np.array(OFFSETS[:6]).var(axis=0).mean()
    assert stats.rsv != pytest.approx(pooled)
    with_single = semantic_variance(POINTS, BOXES, LABELS, min_per_class=1)
    assert with_single.rsv == pytest.approx((0.025 + 0.05 + 0.0) / 3)
    all_distances = [math.hypot(u, v) for u, v in OFFSETS]
    assert stats.mean_distance == pytest.approx(np.mean(all_distances))


def test_json_size_ranges_and_skips():
    data = _point_json()
    data["annotations"].append(
        {"id": 50, "image_id": 1, "category_id": 1, "point": [1, 1]}
    )  # no true box
    data["annotations"].append(
        {"id": 51, "image_id": 1, "category_id": 1, "point": [1, 1], "bbox": [0, 0, 4, 0]}
    )
    data["annotations"].append(dict(data["annotations"][0], id=52, iscrowd=1, point=[0, 0]))
    result = semantic_variance_json(data)
    assert result.used == 7
    assert result.skipped == {"no true bbox": 1, "degenerate bbox": 1, "crowd/ignore": 1}
    sizes = [math.sqrt(b[2] * b[3]) for b in BOXES]
    assert result.ranges["all"].objects == 7
    assert result.ranges["<20 px"].objects == sum(s < 20 for s in sizes)
    assert result.ranges[">=20 px"].objects == sum(s >= 20 for s in sizes)
    assert result.ranges["all"].rsv == pytest.approx((0.025 + 0.05) / 2)
    custom = semantic_variance_json(data, size_ranges=[("tiny", 0, 10), ("rest", 10, math.inf)])
    assert list(custom.ranges) == ["tiny", "rest"]
    assert custom.ranges["tiny"].objects == sum(s < 10 for s in sizes)
    assert semantic_variance_json(data, include_crowd=True).used == 8
    text = format_table(result)
    assert "RSV" in text and "<20 px" in text


def test_json_errors():
    no_boxes = _point_json()
    for ann in no_boxes["annotations"]:
        del ann["bbox"]
    with pytest.raises(ValueError, match="x.json: no annotation has a true box"):
        semantic_variance_json(no_boxes, source="x.json")
    no_point = _point_json()
    del no_point["annotations"][3]["point"]
    with pytest.raises(ValueError, match="annotation id 4 has no valid 'point'"):
        semantic_variance_json(no_point)
    with pytest.raises(ValueError, match="no 'annotations'"):
        semantic_variance_json({"images": []})


def test_compare_matches_by_id():
    a = _point_json()
    # b: class-1 objects moved to their box centres, listed in another order,
    # plus one object only in b
    b = _point_json()
    for ann in b["annotations"][:4]:
        ann["point"] = _at(ann["bbox"], 0.0, 0.0)
    b["annotations"] = b["annotations"][::-1]
    b["annotations"].append(
        {"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 0, 9, 9], "point": [1, 1]}
    )
    result = compare_point_jsons(a, b)
    assert (result.matched, result.only_in_a, result.only_in_b) == (7, 0, 1)
    assert result.a["all"].rsv == pytest.approx(0.0375)
    assert result.b["all"].rsv == pytest.approx((0.0 + 0.05) / 2)
    assert result.change("all") == pytest.approx(100 * (0.025 - 0.0375) / 0.0375)
    moved = np.array([0.0] * 4 + [math.hypot(u, v) for u, v in OFFSETS[4:]])
    assert result.b["all"].mean_distance == pytest.approx(moved.mean())
    assert "change %" in format_comparison(result)
    # Moving to the box centre never makes an object worse.
    assert result.worse["all"] == 0.0 and "worse %" in format_comparison(result)


def test_made_worse_by_hand():
    boxes = np.array([[0, 0, 20, 20], [0, 0, 20, 20], [0, 0, 100, 100], [0, 0, 4, 4]], float)
    before = np.array([[12, 10], [12, 10], [60, 50], [2, 2]], float)
    # 2 px -> 4 px from the centre: worse by 2 px > 0.05 * 20 = 1; 2 -> 2.9: by 0.9, not;
    # 10 -> 14 px on a 100 px box: by 4 < 5, not; a 4 px box, 0 -> 0.21: worse (> 0.2).
    after = np.array([[14, 10], [12.9, 10], [64, 50], [2.21, 2]], float)
    assert made_worse(before, after, boxes).tolist() == [True, False, False, True]
    ranges = (("all", 0, math.inf), ("small", 0, 10), ("none", 200, math.inf))
    shares = worse_by_range(before, after, boxes, ranges)
    assert shares["all"] == 50.0 and shares["small"] == 100.0 and math.isnan(shares["none"])


def test_compare_uses_the_first_json_boxes():
    a = _point_json()
    b = _point_json()
    for ann in b["annotations"]:
        ann["bbox"] = [0, 0, 1000, 1000]  # would make every offset tiny
    result = compare_point_jsons(a, b)
    assert result.b["all"].rsv == pytest.approx(result.a["all"].rsv)
    with pytest.raises(ValueError, match="share no annotation id"):
        compare_point_jsons(a, _point_json(ids=list(range(100, 107))))


def test_tool_prints_tables(tmp_path, capsys):
    tool = load_tool("semantic_variance")
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(_point_json()))
    b = _point_json()
    for ann in b["annotations"]:
        ann["point"] = _at(ann["bbox"], 0.0, 0.0)
    pb.write_text(json.dumps(b))
    assert tool.main(["--json", str(pa)]) == 0
    out = capsys.readouterr().out
    assert "0.0375" in out and "7 objects measured" in out
    assert tool.main(["--json", str(pa), "--compare", str(pb)]) == 0
    out = capsys.readouterr().out
    assert "-100.0" in out and "7 objects matched" in out
    assert tool.main(["--json", str(pa), "--ranges", "small:0:15,big:15:inf"]) == 0
    assert "small" in capsys.readouterr().out
    assert tool.main(["--json", str(pa), "--ranges", "oops"]) == 1
    assert "name:lo:hi" in capsys.readouterr().err
    assert tool.main(["--json", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err


def test_official_format_true_bbox_wins_over_the_pseudo_box():
    data = _point_json()
    for ann in data["annotations"]:
        ann["true_bbox"] = ann["bbox"]
        x, y = ann["point"]
        ann["bbox"] = [x - 8, y - 8, 16, 16]  # the release's 16x16 pseudo box around the point
    assert semantic_variance_json(data).ranges["all"].rsv == pytest.approx(0.0375)
