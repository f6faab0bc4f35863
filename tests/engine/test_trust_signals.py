"""benchmarks/trust_signals.py's per-object signals on constructed fold rows: which model
is the written one, the flipped view recovered from the average, support and the labels."""
import numpy as np
import pytest

from tests.tool_loader import load_benchmark


def _bench():
    return load_benchmark("trust_signals")


def _row(point, coarse, score=0.5):
    return {"point": list(map(float, point)), "coarse_point": list(map(float, coarse)),
            "score": score, "num_kept": 3, "size": 20.0, "refined": point != coarse}


def _rows():
    """Image 1 (fold 0): object 10 moved to its box centre by the model that never saw it
    (fold 0's), seconded by fold 1's; object 11 moved away from it, contradicted. Image 2
    (fold 1): object 20 not moved. Box centres: 10 and 11 at (50, 50) and (150, 50)."""
    anns = {10: {"id": 10, "image_id": 1, "bbox": [40.0, 40.0, 20.0, 20.0]},
            11: {"id": 11, "image_id": 1, "bbox": [140.0, 40.0, 20.0, 20.0]},
            20: {"id": 20, "image_id": 2, "bbox": [0.0, 0.0, 20.0, 20.0]}}
    folds = {1: 0, 2: 1}
    c10, c11, c20 = (44.0, 50.0), (150.0, 50.0), (10.0, 10.0)
    rows = {
        # the written model of image 1: two views (plain, flip-averaged)
        (0, 1): {10: _row((52.0, 50.0), c10), 11: _row((140.0, 50.0), c11),
                 20: _row((12.0, 10.0), c20)},
        (0, 2): {10: _row((50.0, 50.0), c10), 11: _row((141.0, 50.0), c11),
                 20: _row((11.0, 10.0), c20)},
        # the model that saw image 1
        (1, 1): {10: _row((49.0, 50.0), c10), 11: _row((155.0, 50.0), c11), 20: _row(c20, c20)},
        (1, 2): {10: _row((49.0, 50.0), c10), 11: _row((156.0, 50.0), c11), 20: _row(c20, c20)},
    }
    return rows, anns, folds


def test_signals_on_constructed_rows():
    bench = _bench()
    rows, anns, folds = _rows()
    values, worse, better = bench.signals(rows, None, anns, folds)
    # 20 is written by fold 1's model (never saw image 2), which did not move it.
    assert len(worse) == 2
    # 10: s = (6, 0), the other model's move (5, 0): support 5 px; 11: s = (-9, 0), o = (6, 0)
    np.testing.assert_allclose(values["support"], [5.0, -6.0])
    np.testing.assert_allclose(values["move"], [6.0, 9.0])
    # views of 10: plain (52, 50) -> s0 = (8, 0); flipped = 2 * 50 - 52 = 48 -> sh = (4, 0)
    np.testing.assert_allclose(values["view disagreement"][0], -4.0 / 6.0)
    # 11's flipped view: 2 * 141 - 140 = 142: s0 = (-10, 0), sh = (-8, 0)
    np.testing.assert_allclose(values["view disagreement"][1], -2.0 / 9.0)
    assert better.tolist() == [True, False] and worse.tolist() == [False, True]
    # 10 and 11 are each other's nearest neighbour, and both moved straight toward it.
    np.testing.assert_allclose(values["away"], [-1.0, -1.0])


def test_second_seed_support():
    bench = _bench()
    rows, anns, folds = _rows()
    second = {key: {k: dict(v) for k, v in part.items()} for key, part in rows.items()}
    second[(1, 2)][10] = _row((47.0, 50.0), (44.0, 50.0))  # saw image 1: move (3, 0)
    second[(0, 2)][10] = _row((41.0, 50.0), (44.0, 50.0))  # never saw it: move (-3, 0)
    values, _, _ = bench.signals(rows, second, anns, folds)
    # both that saw it: mean of (5, 0) and (3, 0) = (4, 0) on s = (6, 0)
    assert values["support, both that saw it"][0] == pytest.approx(4.0)
    # all three others: mean of (5, 0), (3, 0), (-3, 0) = (5/3, 0)
    assert values["support, all three others"][0] == pytest.approx(5.0 / 3.0)
