import copy
import json
import logging

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from cpr_d2.data import PointJsonError, load_point_json, register_point_coco

from .helpers import base_json, write_dataset


def test_loads_points_classes_boxes_and_flags(tmp_path):
    path, root = write_dataset(tmp_path)
    records = load_point_json(path, root)
    assert [r["image_id"] for r in records] == [1, 2]
    assert records[1]["annotations"] == []  # images without objects are kept
    a, b, c = records[0]["annotations"]
    assert records[0]["file_name"] == f"{root}/a.png"
    assert (records[0]["height"], records[0]["width"]) == (40, 60)
    # category ids 3, 7 -> contiguous 0, 1 (sorted by id)
    assert (a["category_id"], b["category_id"], c["category_id"]) == (1, 0, 0)
    assert a["point"] == [12.5, 8.0] and a["bbox"] == [5.0, 2.0, 20.0, 10.0]
    assert a["bbox_mode"] == BoxMode.XYWH_ABS and a["id"] == 10
    assert (a["iscrowd"], b["iscrowd"], c["iscrowd"]) == (0, 0, 1)  # ignore -> iscrowd


def test_metadata_and_registration(tmp_path):
    path, root = write_dataset(tmp_path)
    name = "test_point_coco_registration"
    register_point_coco(name, path, root)
    try:
        assert len(DatasetCatalog.get(name)) == 2
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["car", "tree"]
        assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
        assert meta.json_file == path and meta.evaluator_type == "point_ap"
        with pytest.raises(ValueError, match="already registered"):
            register_point_coco(name, path, root)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_official_cpr_release_convention(tmp_path):
    # The release: coarse point in `point`, 16x16 pseudo box in `bbox`, real box in `true_bbox`.
    data = base_json()
    data["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 3, "point": [20.0, 10.0],
         "bbox": [12.0, 2.0, 16.0, 16.0], "true_bbox": [10.0, 5.0, 30.0, 20.0]},
        # no `point`: the pseudo box centre is the point
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30.0, 4.0, 16.0, 16.0],
         "true_bbox": [25.0, 0.0, 30.0, 30.0]},
    ]
    path, root = write_dataset(tmp_path, data)
    a, b = load_point_json(path, root)[0]["annotations"]
    assert a["point"] == [20.0, 10.0] and a["bbox"] == [10.0, 5.0, 30.0, 20.0]
    assert b["point"] == [38.0, 12.0] and b["bbox"] == [25.0, 0.0, 30.0, 30.0]


def test_box_centre_points_for_evaluation_sets(tmp_path):
    data = base_json()
    for ann in data["annotations"]:
        del ann["point"]
    path, root = write_dataset(tmp_path, data)
    with pytest.raises(PointJsonError, match="has no 'point'.*make_coarse"):
        load_point_json(path, root)
    ann = load_point_json(path, root, box_centre_points=True)[0]["annotations"][0]
    assert ann["point"] == [15.0, 7.0]


def test_refined_fields_pass_through(tmp_path):
    data = base_json()
    data["annotations"][0].update(coarse_point=[1.0, 2.0], refine_score=0.7)
    path, root = write_dataset(tmp_path, data)
    ann = load_point_json(path, root)[0]["annotations"][0]
    assert ann["coarse_point"] == [1.0, 2.0] and ann["refine_score"] == 0.7


def test_points_outside_the_image_warn_or_fail(tmp_path, caplog):
    data = base_json()
    data["annotations"][0]["point"] = [60.0, 40.0]  # on the corner: inside (closed)
    data["annotations"][1]["point"] = [61.0, 10.0]
    data["annotations"][2]["point"] = [5.0, -0.5]
    path, root = write_dataset(tmp_path, data)
    with caplog.at_level(logging.WARNING):
        records = load_point_json(path, root)
    assert len(records[0]["annotations"]) == 3
    assert "2 of 3 points lie outside their image (first: annotation id 11" in caplog.text
    with pytest.raises(PointJsonError, match="2 of 3 points lie outside"):
        load_point_json(path, root, points_outside_image="error")
    with pytest.raises(ValueError, match="policy"):
        load_point_json(path, root, points_outside_image="ignore")
    with pytest.raises(ValueError, match="policy"):
        register_point_coco("outside_policy_typo", path, root, points_outside_image="ignore")
    # The policy is the registration's: a registered json refuses its points at load time.
    register_point_coco("outside_policy_error", path, root, points_outside_image="error")
    try:
        with pytest.raises(PointJsonError, match="2 of 3 points lie outside"):
            DatasetCatalog.get("outside_policy_error")
    finally:
        DatasetCatalog.remove("outside_policy_error")
        MetadataCatalog.remove("outside_policy_error")


@pytest.mark.parametrize("policy", ["warn", "error"])
def test_point_jsons_of_a_config_load_with_its_outside_image_policy(tmp_path, policy):
    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.data import register_point_jsons

    data = base_json()
    data["annotations"][1]["point"] = [61.0, 10.0]  # off its 60 x 40 image
    path, root = write_dataset(tmp_path, data)
    name = f"outside_policy_cfg_{policy}"
    cfg = get_cpr_d2_cfg()
    cfg.DATASETS.POINTS_OUTSIDE_IMAGE = policy
    cfg.DATASETS.POINT_JSONS = ((name, path, root),)
    register_point_jsons(cfg)
    try:
        if policy == "error":
            with pytest.raises(PointJsonError, match="1 of 3 points lie outside"):
                DatasetCatalog.get(name)
        else:
            assert len(DatasetCatalog.get(name)[0]["annotations"]) == 3
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _mutated(mutate):
    data = base_json()
    mutate(data)
    return data


BAD_JSONS = [
    # (mutation, message fragment)
    (lambda d: d["annotations"][1].update(category_id=99), r"annotation id 11: 'category_id'"),
    (lambda d: d["annotations"][1].update(id=10), r"annotation id 10: the id appears twice"),
    (lambda d: d["annotations"][0].update(point=[1.0]), r"annotation id 10: 'point' must be \[x, y\]"),
    (lambda d: d["annotations"][0].update(point=["a", 2]), r"annotation id 10: 'point' must be"),
    (lambda d: d["annotations"][0].update(point=[float("nan"), 2.0]), r"'point' must be \[x, y\] with two finite"),
    (lambda d: d["annotations"][0].update(image_id=5), r"annotation id 10: 'image_id'"),
    (lambda d: d["annotations"][0].update(bbox=[0, 0, -1, 4]), r"annotation id 10: 'bbox'"),
    (lambda d: d["annotations"][0].pop("id"), r"annotations\[0\]: missing 'id'"),
    (lambda d: d["annotations"][0].pop("category_id"), r"annotation id 10: missing 'category_id'"),
    (lambda d: d["images"][0].update(height=0), r"image id 1: 'height' must be a positive int"),
    (lambda d: d["images"][1].update(id=1), r"image id 1: appears twice"),
    (lambda d: d["images"][0].pop("file_name"), r"image id 1: missing 'file_name'"),
    (lambda d: d.update(images=[]), r"images: the list is empty"),
    (lambda d: d.update(categories=[]), r"categories: the list is empty"),
    (lambda d: d["categories"].append({"id": 3, "name": "bus"}), r"category id 3 appears twice"),
    (lambda d: d.pop("annotations"), r"'annotations' must be a list"),
    (lambda d: d["annotations"].append("oops"), r"annotations\[3\]: expected a json object"),
]


@pytest.mark.parametrize("mutate,message", BAD_JSONS)
def test_bad_json_names_file_and_record(tmp_path, mutate, message):
    path, root = write_dataset(tmp_path, _mutated(mutate), images=False)
    with pytest.raises(PointJsonError, match=message) as err:
        load_point_json(path, root)
    assert str(err.value).startswith(path)


def test_malformed_missing_and_non_object_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(PointJsonError, match=r"broken.json is not valid json \(line 1"):
        load_point_json(str(broken), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_point_json(str(tmp_path / "nope.json"), str(tmp_path))
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([1, 2]))
    with pytest.raises(PointJsonError, match="expected a json object"):
        load_point_json(str(listing), str(tmp_path))
    binary = tmp_path / "image.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(PointJsonError, match="not a UTF-8 text file"):
        load_point_json(str(binary), str(tmp_path))


def test_builtin_dataset_reports_missing_file(monkeypatch, tmp_path):
    import cpr_d2  # noqa: F401  (registers the builtins)

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"'coco_2017_train_coarse' expects its annotations at "
                                                rf"{tmp_path}/coco/coarse_gen_annotations/"):
        DatasetCatalog.get("coco_2017_train_coarse")


def test_builtin_evaluation_set_reads_plain_coco(monkeypatch, tmp_path):
    import cpr_d2  # noqa: F401

    data = copy.deepcopy(base_json())
    for ann in data["annotations"]:
        del ann["point"]
    target = tmp_path / "coco" / "annotations"
    target.mkdir(parents=True)
    (target / "instances_val2017.json").write_text(json.dumps(data))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    records = DatasetCatalog.get("coco_2017_val_points")
    assert records[0]["annotations"][0]["point"] == [15.0, 7.0]
    assert records[0]["file_name"] == f"{tmp_path}/coco/val2017/a.png"
