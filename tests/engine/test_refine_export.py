import json
import os

import pytest

import cpr_d2.utils.io
from cpr_d2.data import load_point_json
from cpr_d2.engine.refine import export_refined, refined_json
from tests.data.helpers import base_json, write_dataset

ROWS = {  # annotation id -> refinement, deliberately not in json order
    11: {"point": [41.0, 29.0], "score": 0.6, "coarse_point": [40.0, 30.0], "refined": True},
    10: {"point": [12.5, 8.0], "score": 0.0, "coarse_point": [12.5, 8.0], "refined": False},
}


def test_refined_json_matches_by_id_and_keeps_every_field():
    source = base_json()
    source["info"] = {"year": 2026}
    out, count = refined_json(source, ROWS)
    assert count == 2
    a, b, c = out["annotations"]
    assert b["point"] == [41.0, 29.0] and b["coarse_point"] == [40.0, 30.0]
    assert b["refine_score"] == 0.6
    assert a["point"] == [12.5, 8.0] and a["coarse_point"] == [12.5, 8.0] and a["extra"] == "kept"
    assert "coarse_point" not in c and c == source["annotations"][2]  # not refined: untouched
    assert out["info"] == {"year": 2026} and out["images"] == source["images"]
    assert source["annotations"][1]["point"] == [40.0, 30.0]  # the input dict is not modified


def test_official_format_without_point_keeps_its_pseudo_box_centre_as_coarse():
    source = base_json()
    source["annotations"] = [{"id": 11, "image_id": 1, "category_id": 3,
                              "bbox": [32.0, 22.0, 16.0, 16.0], "true_bbox": [30, 20, 20, 15]}]
    out, _ = refined_json(source, ROWS)
    ann = out["annotations"][0]
    assert ann["coarse_point"] == [40.0, 30.0] and ann["point"] == [41.0, 29.0]
    assert ann["true_bbox"] == [30, 20, 20, 15]


def test_export_round_trip_loads_as_a_point_dataset(tmp_path):
    path, root = write_dataset(tmp_path)
    output = str(tmp_path / "out" / "refined.json")
    export_refined(path, ROWS, output)
    records = load_point_json(output, root)
    ann = records[0]["annotations"][1]
    assert ann["point"] == [41.0, 29.0] and ann["coarse_point"] == [40.0, 30.0]
    assert ann["refine_score"] == 0.6


def test_export_never_writes_over_its_input(tmp_path):
    path, _ = write_dataset(tmp_path)
    before = open(path).read()
    with pytest.raises(ValueError, match="is the input json"):
        export_refined(path, ROWS, path)
    assert open(path).read() == before


def test_failed_export_leaves_the_previous_file(tmp_path, monkeypatch):
    path, _ = write_dataset(tmp_path)
    output = tmp_path / "refined.json"
    output.write_text('{"previous": true}')

    def fsync_fails(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(cpr_d2.utils.io.os, "fsync", fsync_fails)
    with pytest.raises(OSError):
        export_refined(path, ROWS, str(output))
    assert json.loads(output.read_text()) == {"previous": True}
    assert sorted(os.listdir(tmp_path)) == ["images", "points.json", "refined.json"]
