"""The trust report (cpr_d2.engine.trust): reliability from the fold models' agreement,
safe mode, the report's size ranges and its dataset-level warnings."""
import random

import pytest

from cpr_d2.engine.crossfit import combine_fold_rows, training_objects
from cpr_d2.engine.refine import refined_json
from cpr_d2.engine.trust import (MIN_TRAIN_OBJECTS, apply_safe_mode, dataset_warnings,
                                 format_trust_report,
                                 move_agreement, object_reliability, trust_report)


def fold_rows(points_unseen, points_seen, coarse=(20.0, 20.0), size=30.0):
    """Two fold models' rows for one object on an image of fold 0: model 0 never saw the
    image, model 1 trained on it."""
    row = {"score": 0.5, "coarse_point": list(coarse), "refined": True, "num_kept": 9,
           "size": size}
    rows = [{7: {**row, "point": list(points_unseen)}}, {7: {**row, "point": list(points_seen)}}]
    return combine_fold_rows(rows, {1: 0}, {7: 1})


def test_models_that_agree_on_a_centre_give_high_reliability_and_disagreeing_ones_low():
    agree = fold_rows((26.0, 28.0), (26.5, 28.0))  # a 10 px move, the models 0.5 px apart
    disagree = fold_rows((26.0, 28.0), (14.0, 12.0))  # the seen model moved the other way
    high = object_reliability(agree[7])
    low = object_reliability(disagree[7])
    assert high == pytest.approx(10.0 / 10.5)
    assert low == pytest.approx(10.0 / 30.0)
    rows = apply_safe_mode({1: agree[7], 2: disagree[7]})
    assert rows[1]["reliable"] is True and rows[2]["reliable"] is False


def test_unmoved_points_are_reliable_and_a_single_model_is_unknown():
    still = {"point": [3.0, 4.0], "coarse_point": [3.0, 4.0], "refined": False}
    assert object_reliability({**still, "disagreement": 9.0}) == 1.0
    single = {"point": [5.0, 4.0], "coarse_point": [3.0, 4.0], "refined": True}
    assert object_reliability(single) is None
    out = apply_safe_mode({1: single})
    assert out[1]["reliable"] is None and "kept_coarse" not in out[1]
    assert out[1]["point"] == [5.0, 4.0]


def random_rows(n, seed):
    rng = random.Random(seed)
    rows = {}
    for k in range(n):
        coarse = [rng.uniform(0, 100), rng.uniform(0, 100)]
        moved = rng.random() < 0.8
        point = [c + rng.uniform(-8, 8) for c in coarse] if moved else list(coarse)
        rows[k] = {"point": point, "coarse_point": coarse, "refined": moved, "score": 0.3,
                   "num_kept": rng.randint(0, 30), "size": rng.uniform(6, 60),
                   "disagreement": rng.uniform(0, 10), "fold": k % 2}
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_safe_mode_keeps_exactly_the_unreliable_points(seed):
    rows = random_rows(200, seed)
    safe = apply_safe_mode(rows, "coarse")
    unreliable = {k for k, r in safe.items() if r["reliable"] is False}
    assert 0 < len(unreliable) < len(rows)
    assert {k for k, r in safe.items() if r.get("kept_coarse")} == unreliable
    for k, r in safe.items():
        expected = rows[k]["coarse_point"] if k in unreliable else rows[k]["point"]
        assert r["point"] == expected
        if k in unreliable:
            assert r["refine_point"] == rows[k]["point"] and r["refined"] is False
    assert rows[0]["point"] == random_rows(200, seed)[0]["point"]  # the input is kept
    # --keep-unreliable refined marks the same points and moves none of them back.
    marked = apply_safe_mode(rows, "refined")
    assert {k for k, r in marked.items() if r["reliable"] is False} == unreliable
    assert all(r["point"] == rows[k]["point"] for k, r in marked.items())

    # In the json: the coarse point stays, the refined one is kept beside it.
    source = {"images": [], "annotations": [
        {"id": k, "image_id": 1, "point": [round(c, 3) for c in r["coarse_point"]]}
        for k, r in rows.items()]}
    data, count = refined_json(source, safe)
    assert count == len(rows)
    for ann in data["annotations"]:
        if ann["id"] in unreliable:
            assert ann["point"] == ann["coarse_point"] == source["annotations"][ann["id"]]["point"]
            assert ann["refine_point"] == rows[ann["id"]]["point"]
            assert ann["refine_reliable"] is False
        else:
            assert ann["point"] == rows[ann["id"]]["point"] and "refine_point" not in ann
            assert ann["refine_reliable"] is True

    report = trust_report(safe, folds=2, keep_unreliable="coarse")
    assert report["kept coarse"] == len(unreliable)
    judged = [r for r in safe.values() if r.get("refine_point", r["point"]) != r["coarse_point"]]
    assert report["unreliable share"] == pytest.approx(len(unreliable) / len(judged))


def test_the_report_counts_per_estimated_size_and_objects_without_kept_points():
    rows = {
        1: {"point": [4.0, 0.0], "coarse_point": [0.0, 0.0], "size": 10.0, "num_kept": 3,
            "disagreement": 1.0, "refined": True},
        2: {"point": [0.0, 0.0], "coarse_point": [0.0, 0.0], "size": 0.0, "num_kept": 0,
            "disagreement": 0.0, "refined": False},
        3: {"point": [6.0, 8.0], "coarse_point": [0.0, 0.0], "size": 40.0, "num_kept": 20,
            "disagreement": 20.0, "refined": True},
    }
    report = trust_report(apply_safe_mode(rows, "coarse"), folds=2, keep_unreliable="coarse")
    by_name = {r["size range"]: r for r in report["ranges"]}
    assert by_name["all"]["objects"] == 3 and by_name["all"]["moved"] == 2
    assert by_name["<12 px"]["objects"] == 1 and by_name["<12 px"]["unreliable"] == 0
    assert by_name[">=32 px"]["unreliable"] == 1
    assert by_name[">=32 px"]["median move px"] == pytest.approx(10.0)  # from refine_point
    assert by_name["no kept points"]["objects"] == 1
    assert by_name["12-20 px"]["objects"] == 0 and by_name["12-20 px"]["unreliable %"] is None
    assert report["kept coarse"] == 1 and report["unreliable share"] == pytest.approx(0.5)
    assert report["warnings"] == []  # half unreliable: not more than half
    text = format_trust_report(report)
    assert "| no kept points |" in text and "1 unreliable objects kept their coarse point" in text
    assert "no warning" in text


def test_the_dataset_warning_fires_on_disagreement_and_on_too_little_data():
    rows = random_rows(100, 0)
    for r in rows.values():
        r["disagreement"] = 3 * r["disagreement"] + 20.0  # far more than any move
    report = trust_report(apply_safe_mode(rows), folds=2)
    assert report["unreliable share"] > 0.9
    assert len(report["warnings"]) == 1 and "looks unreliable" in report["warnings"][0]
    assert "--keep-unreliable coarse" in report["warnings"][0]

    agree = random_rows(100, 1)
    for r in agree.values():
        r["disagreement"] = 0.0
    few = {0: {1: MIN_TRAIN_OBJECTS - 1}, 1: {1: 5 * MIN_TRAIN_OBJECTS}}
    report = trust_report(apply_safe_mode(agree), folds=2, train_objects=few)
    assert report["unreliable share"] == 0 and report["fewest training objects"] == 199
    assert len(report["warnings"]) == 1
    assert f"fold model 0 trained on only {MIN_TRAIN_OBJECTS - 1} objects of class 1" in \
        report["warnings"][0]
    enough = {0: {1: MIN_TRAIN_OBJECTS}, 1: {1: MIN_TRAIN_OBJECTS}}
    assert trust_report(apply_safe_mode(agree), folds=2, train_objects=enough)["warnings"] == []
    # One model: the report says how to measure the reliability.
    single = trust_report(apply_safe_mode({k: {**r, "disagreement": None}
                                           for k, r in agree.items()}), folds=1)
    assert single["unreliable share"] is None and single["warnings"] == []
    assert "--folds 2" in single["notes"][0]
    assert "note: the reliability" in format_trust_report(single)


def test_training_objects_count_the_other_folds_annotations():
    data = {"annotations": [{"id": 1, "image_id": 10, "category_id": 3},
                            {"id": 2, "image_id": 10, "category_id": 4},
                            {"id": 3, "image_id": 11, "category_id": 3},
                            {"id": 4, "image_id": 11, "category_id": 3, "iscrowd": 1}]}
    assert training_objects(data, {10: 0, 11: 1}) == {0: {3: 1}, 1: {3: 1, 4: 1}}


def test_a_bad_safe_mode_is_refused():
    with pytest.raises(ValueError, match="--keep-unreliable must be one of agreed, coarse, refined"):
        apply_safe_mode({}, "drop")


def test_the_move_agreement_is_the_share_of_the_move_the_other_models_reproduce():
    def agreement(*others, point=(30.0, 20.0)):  # a 10 px move to the right
        return move_agreement({"coarse_point": [20.0, 20.0], "point": list(point),
                               "other_points": [list(o) for o in others]})

    assert agreement((25.0, 20.0)) == pytest.approx(0.5)
    assert agreement((25.0, 27.0)) == pytest.approx(0.5)  # the sideways part counts nothing
    assert agreement((40.0, 20.0)) == 1.0  # further the same way: the whole move, no more
    assert agreement((17.0, 20.0)) == 0.0  # the other way: none of it
    assert agreement((20.0, 29.0)) == 0.0  # at right angles: none of it
    assert agreement((24.0, 20.0), (32.0, 20.0)) == pytest.approx(0.8)  # their mean move
    assert agreement((3.0, 3.0), point=(20.0, 20.0)) == 1.0  # not moved
    assert move_agreement({"coarse_point": [1.0, 1.0], "point": [2.0, 1.0]}) is None
    assert agreement() is None


def agreed_rows(n, seed):
    """random_rows with a second model's point: the same move scaled by a factor in
    [-1, 2] plus noise, or (one in ten) exactly the same point."""
    rng = random.Random(seed + 100)
    rows = random_rows(n, seed)
    for r in rows.values():
        coarse, point = r["coarse_point"], r["point"]
        if rng.random() < 0.1:
            r["other_points"] = [list(point)]
            continue
        scale = rng.uniform(-1, 2)
        r["other_points"] = [[c + scale * (p - c) + rng.gauss(0, 1) for c, p in zip(coarse, point)]]
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agreed_mode_moves_every_point_by_its_agreed_share(seed):
    rows = agreed_rows(200, seed)
    out = apply_safe_mode(rows)  # the default mode
    shares = {k: move_agreement(r) for k, r in rows.items()}
    assert min(shares.values()) == 0.0 and max(shares.values()) == 1.0
    assert 0 < sum(0 < a < 1 for a in shares.values()) < len(rows)
    for k, r in out.items():
        a = shares[k]
        assert r["agreement"] == a
        expected = [c + a * (p - c) for c, p in zip(rows[k]["coarse_point"], rows[k]["point"])]
        assert r["point"] == pytest.approx(expected, abs=1e-9)
        assert bool(r.get("kept_coarse")) == (a == 0.0 and rows[k]["point"] != rows[k]["coarse_point"])
        assert bool(r.get("shortened")) == (0.0 < a < 1.0)
        if a < 1.0:
            assert r["refine_point"] == rows[k]["point"]
        else:
            assert "refine_point" not in r and r["point"] == rows[k]["point"]
        # The reliability is the same whatever the mode.
        assert r["reliable"] == apply_safe_mode({k: rows[k]}, "refined")[k]["reliable"]
    assert rows[0]["point"] == random_rows(200, seed)[0]["point"]  # the input is kept

    source = {"images": [], "annotations": [
        {"id": k, "image_id": 1, "point": list(r["coarse_point"])} for k, r in rows.items()]}
    data, _ = refined_json(source, out)
    for ann in data["annotations"]:
        r = out[ann["id"]]
        assert ann["point"] == r["point"] and ann["refine_agreement"] == r["agreement"]
        assert ann["refine_trust"] == r["trust"]
        assert ("refine_point" in ann) == (r["agreement"] < 1.0)

    report = trust_report(out, folds=2)
    assert report["keep unreliable"] == "agreed"
    assert report["kept coarse"] == sum(bool(r.get("kept_coarse")) for r in out.values()) > 0
    assert report["shortened"] == sum(0 < a < 1 for a in shares.values())
    assert f"{report['shortened']} moved part of the way" in format_trust_report(report)


def two_class_rows(seed):
    """agreed_rows whose even annotation ids are of class 1 and odd ones of class 2."""
    rows = agreed_rows(200, seed)
    return rows, {k: 1 + k % 2 for k in rows}


@pytest.mark.parametrize("mode", ["agreed", "coarse"])
def test_safe_mode_keeps_the_coarse_points_of_a_class_with_too_little_data(mode):
    rows, class_of = two_class_rows(3)
    # Fold model 1 trained on too few objects of class 2; class 1 has enough everywhere.
    trained = {0: {1: 5 * MIN_TRAIN_OBJECTS, 2: 5 * MIN_TRAIN_OBJECTS},
               1: {1: MIN_TRAIN_OBJECTS, 2: MIN_TRAIN_OBJECTS - 1}}
    out = apply_safe_mode(rows, mode, trained, class_of)
    plain = apply_safe_mode(rows, mode, None, class_of)  # without the training counts
    for k, r in out.items():
        if class_of[k] == 1:  # untouched by the warning
            assert r == plain[k] and "distrusted" not in r
            continue
        assert r["distrusted"] is True and r["point"] == rows[k]["coarse_point"]
        moved = rows[k]["point"] != rows[k]["coarse_point"]
        assert bool(r.get("kept_coarse")) == moved
        if moved:
            assert r["refined"] is False and r["refine_point"] == rows[k]["point"]
        # What is measured of the object is the same: only what is written changes.
        assert r["reliable"] == plain[k]["reliable"] and r["agreement"] == plain[k]["agreement"]
    # Without the classes, the warning about one is about every object.
    assert all(r["distrusted"] for r in apply_safe_mode(rows, mode, trained).values())
    distrusted = sum(class_of[k] == 2 for k in rows)
    report = trust_report(out, 2, trained, mode, class_of)
    assert report["distrusted"] == distrusted
    moved = sum(class_of[k] == 2 and r["point"] != r["coarse_point"] for k, r in rows.items())
    assert 0 < report["distrusted moved"] == moved < distrusted
    assert len(report["warnings"]) == 1
    assert "fold model 1 trained on only 199 objects of class 2" in report["warnings"][0]
    text = format_trust_report(report)
    assert (f"safe mode left the {distrusted} objects of the classes these warnings distrust "
            f"at their coarse points ({moved} of them were moved") in text
    # The json says which ones, and keeps the refined point.
    source = {"images": [], "annotations": [
        {"id": k, "image_id": 1, "category_id": class_of[k], "point": list(r["coarse_point"])}
        for k, r in rows.items()]}
    data, _ = refined_json(source, out)
    for ann in data["annotations"]:
        assert ann.get("refine_distrusted", False) is (class_of[ann["id"]] == 2)
        if ann.get("refine_distrusted"):
            assert ann["point"] == ann["coarse_point"]


def test_refined_mode_writes_every_point_of_a_distrusted_class():
    rows, class_of = two_class_rows(4)
    trained = {0: {1: 10, 2: 10}, 1: {1: 10, 2: 10}}
    out = apply_safe_mode(rows, "refined", trained, class_of)
    assert all(r["point"] == rows[k]["point"] and "distrusted" not in r for k, r in out.items())
    report = trust_report(out, 2, trained, "refined", class_of)
    assert len(report["warnings"]) == 2 and report["distrusted"] == 0
    assert "safe mode left" not in format_trust_report(report)


def test_the_unreliable_share_is_judged_per_class():
    rows, class_of = two_class_rows(5)
    for k, r in rows.items():  # for two thirds of class 2, by far more than any move
        far = class_of[k] == 2 and k % 3 != 0
        r["disagreement"] = 3 * r["disagreement"] + 20.0 if far else 0.0
    out = apply_safe_mode(rows, "agreed", None, class_of)
    assert {class_of[k] for k, r in out.items() if r.get("distrusted")} == {2}
    report = trust_report(out, 2, None, "agreed", class_of)
    assert len(report["warnings"]) == 1
    assert "of the moved points of class 2" in report["warnings"][0]
    # Pooled, the share is under one half: the classes together would raise no warning.
    assert report["unreliable share"] < 0.5
    assert dataset_warnings(out) == []
    # A class that a trained fold model never saw counts as none seen.
    unseen = {0: {1: 500}, 1: {1: 500, 2: 500}}
    warnings = [w for _, w in dataset_warnings(apply_safe_mode(rows, "refined"), unseen)]
    assert any("fold model 0 trained on only 0 objects of class 2" in w for w in warnings)


def trust_rows():
    """Four objects on one image: 1 and 2 are neighbours 10 px apart, 4 lies 10 px on
    the other side of 1, 3 is far off."""
    def row(coarse, point, other, image=1):
        return {"coarse_point": list(coarse), "point": list(point), "other_points": [list(other)],
                "image_id": image, "refined": point != coarse, "score": 0.5}
    return {
        # moves 4 px towards its neighbour 2; the other model moved it the other way
        1: row((10.0, 10.0), (14.0, 10.0), (8.0, 10.0)),
        2: row((20.0, 10.0), (20.0, 10.0), (21.0, 10.0)),  # not moved
        # moves 4 px away from its neighbour 1, and the other model moved it 3 px so too
        4: row((0.0, 10.0), (-4.0, 10.0), (-3.0, 10.0)),
        # moves 3 px down, partly away from its nearest neighbour (2, up and to the left)
        3: row((80.0, 80.0), (80.0, 83.0), (80.0, 82.0)),
    }


def test_trust_ranks_supported_moves_away_from_neighbours_first():
    from cpr_d2.engine.trust import move_trust
    trust = move_trust(trust_rows())
    assert trust[2] == 1.0  # not moved
    # Support (the other model's move along its own): 1 -> -2 px, 3 -> 2 px, 4 -> 3 px.
    # Away from the nearest neighbour: 1 -> -1 (towards), 3 -> 0.76, 4 -> +1.
    # Move over the distance to that neighbour: 1 -> 4/10, 3 -> 3/92.2, 4 -> 4/10 (a tie).
    assert trust[4] == pytest.approx((3 + 3 + 2.5) / 9)
    assert trust[3] == pytest.approx((2 + 2 + 1) / 9)
    assert trust[1] == pytest.approx((1 + 1 + 2.5) / 9)
    # Without other models a moved object's trust is unknown.
    lone = {k: {**r, "other_points": []} for k, r in trust_rows().items()}
    assert move_trust(lone)[1] is None and move_trust(lone)[2] == 1.0
    # 4 moved 2 px under 1, moving down: away from 1, its nearest neighbour (+1); 1 and
    # 4 are now each other's nearest, 2 px apart (scaled moves 4/2 and 4/2).
    rows = trust_rows()
    rows[4].update(coarse_point=[10.0, 12.0], point=[10.0, 16.0], other_points=[[10.0, 15.0]])
    assert move_trust(rows)[4] == pytest.approx((3 + 3 + 2.5) / 9)
    # Of another class, 4 has no neighbour (away 0, scaled move 0): 3's 0.76 now ranks
    # above it, and 1's nearest is 2 again (4/10).
    classes = {1: 1, 2: 1, 3: 1, 4: 2}
    assert move_trust(rows, classes)[4] == pytest.approx((3 + 2 + 1) / 9)
    assert move_trust(rows, classes)[3] == pytest.approx((2 + 3 + 2) / 9)
    assert move_trust(rows, classes)[1] == pytest.approx((1 + 1 + 3) / 9)
    # On another image, likewise.
    rows[4]["image_id"] = 2
    assert move_trust(rows) == move_trust(rows, classes)
    # It is written with the other measures, whatever the mode.
    for mode in ("agreed", "coarse", "refined"):
        out = apply_safe_mode(trust_rows(), mode)
        assert {k: r["trust"] for k, r in out.items()} == move_trust(trust_rows())


def test_a_move_long_for_the_spacing_of_its_objects_is_trusted_more():
    # Two images, each with an unmoved neighbour: A moves 4 px with its neighbour 40 px
    # away, B 4 px with its neighbour 8 px away; both at right angles to the neighbour
    # (away 0) and with the same support. Only the scaled move tells them apart.
    from cpr_d2.engine.trust import move_trust

    def row(coarse, point, other, image):
        return {"coarse_point": list(coarse), "point": list(point), "other_points": [list(other)],
                "image_id": image, "refined": point != coarse, "score": 0.5}
    rows = {"A": row((50.0, 50.0), (50.0, 54.0), (50.0, 53.0), 1),
            "a": row((90.0, 50.0), (90.0, 50.0), (90.0, 50.0), 1),
            "B": row((50.0, 50.0), (50.0, 54.0), (50.0, 53.0), 2),
            "b": row((58.0, 50.0), (58.0, 50.0), (58.0, 50.0), 2)}
    trust = move_trust(rows)
    assert trust["a"] == trust["b"] == 1.0
    assert trust["A"] == pytest.approx((1.5 + 1.5 + 1) / 6)
    assert trust["B"] == pytest.approx((1.5 + 1.5 + 2) / 6)
    # The neighbour twice as far halves the scaled move: with B's neighbour 80 px away
    # the order turns.
    rows["b"].update(coarse_point=[130.0, 50.0], point=[130.0, 50.0], other_points=[[130.0, 50.0]])
    assert move_trust(rows)["B"] < move_trust(rows)["A"]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_nearest_neighbour_is_found_within_the_objects_class_and_image(seed):
    import numpy as np

    from cpr_d2.engine.trust import _nearest_neighbours
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 500, size=(300, 2))
    rows = {k: {"coarse_point": points[k].tolist(), "image_id": int(rng.integers(2))}
            for k in range(300)}
    class_of = {k: int(rng.integers(1, 3)) for k in rows}
    rows[299]["image_id"], class_of[299] = 7, 1  # alone on its image
    found = _nearest_neighbours(rows, class_of)  # (direction, distance)
    assert found[299] == (None, None)
    for k in range(299):
        others = [j for j in rows if j != k and rows[j]["image_id"] == rows[k]["image_id"]
                  and class_of[j] == class_of[k]]
        j = min(others, key=lambda j: np.linalg.norm(points[j] - points[k]))
        expected = (points[j] - points[k]) / np.linalg.norm(points[j] - points[k])
        assert found[k][0] == pytest.approx(expected)
        assert found[k][1] == pytest.approx(np.linalg.norm(points[j] - points[k]))


def test_the_report_lists_the_least_trusted_moved_points_first():
    from cpr_d2.engine.trust import LEAST_TRUSTED
    rows = agreed_rows(200, 6)
    for k, r in rows.items():
        r["image_id"] = k % 5
    out = apply_safe_mode(rows)
    report = trust_report(out, folds=2)
    least = report["least trusted"]
    moved = sorted(r["trust"] for r in out.values() if r["refine_point" if "refine_point" in r
                                                          else "point"] != r["coarse_point"])
    assert len(least) == LEAST_TRUSTED
    assert [row["trust"] for row in least] == pytest.approx(moved[:LEAST_TRUSTED], abs=1e-4)
    for row in least:
        assert out[row["annotation"]]["trust"] == pytest.approx(row["trust"], abs=1e-4)
        assert row["image"] == row["annotation"] % 5 and row["move px"] > 0
    text = format_trust_report(report)
    assert f"the {LEAST_TRUSTED} moved points of lowest trust" in text
    assert f"| {least[0]['annotation']} | {least[0]['image']} |" in text
