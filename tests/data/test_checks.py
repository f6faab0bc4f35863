"""Failing early on bad data: the image header check before training
(cpr_d2.data.checks), strict iscrowd/ignore flags, and a point json whose every
object point is off its image."""
import logging

import numpy as np
import pytest
from detectron2.data import detection_utils as utils
from PIL import Image

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointJsonError, load_point_json
from cpr_d2.data import checks
from cpr_d2.data.checks import check_dataset_images, check_training_images, image_problems

from .helpers import base_json, write_dataset


def _image(path, width, height, orientation=None):
    """A black image of width x height pixels in the file (EXIF orientation optional)."""
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path, **kwargs)
    return str(path)


def _record(path, iid, width, height):
    return {"file_name": str(path), "image_id": iid, "width": width, "height": height,
            "annotations": []}


# ---- image headers -------------------------------------------------------------------------

def test_good_images_pass(tmp_path):
    records = [_record(_image(tmp_path / f"{k}.png", 60 + k, 40), k, 60 + k, 40) for k in range(5)]
    records.append(_record(_image(tmp_path / "c.jpg", 30, 20), "c", 30, 20))
    assert check_dataset_images(records, "good") == 6
    assert image_problems(records, max_pixels=60 * 40 * 2) == []


def test_one_error_lists_every_bad_image_with_its_id_file_problem_and_fix(tmp_path):
    good = _image(tmp_path / "good.png", 60, 40)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    records = [
        _record(good, 1, 60, 40),
        _record(tmp_path / "missing.png", 2, 60, 40),
        _record(text, 3, 60, 40),
        _record(good, 4, 40, 60),  # the json says another size
        _record(tmp_path, 5, 60, 40),  # a folder
        _record(good, 6, 60, 40),
    ]
    with pytest.raises(ValueError) as err:
        check_dataset_images(records, "trees")
    message = str(err.value)
    assert message.startswith("dataset 'trees': 4 of 6 images cannot be used")
    lines = message.splitlines()
    assert f"  image of image id 2 not found: {tmp_path}/missing.png" in lines
    assert (f"  cannot read the image of image id 3: {text} (not an image file: PIL cannot "
            "identify its format)") in lines
    assert (f"  image id 4 ({good}): the file is 60 x 40 (width x height), the json says "
            "40 x 60") in lines
    assert any(line.startswith(f"  cannot read the image of image id 5: {tmp_path} (")
               for line in lines)
    assert "image id 1 " not in message and "image id 6 " not in message
    # The fix of each kind of problem, once.
    assert "check the dataset's image root" in message
    assert "replace it with a complete image" in message
    assert "fix the image's width/height in the json" in message
    assert "MAX_IMAGE_PIXELS" not in message


def test_long_lists_are_cut_after_twenty(tmp_path):
    records = [_record(tmp_path / f"missing_{k}.png", k, 10, 10) for k in range(27)]
    with pytest.raises(ValueError, match=r"27 of 27 images") as err:
        check_dataset_images(records, "big")
    lines = str(err.value).splitlines()
    assert sum("not found" in line for line in lines) == checks.MAX_LISTED == 20
    assert "  ... and 7 more" in lines
    assert "missing_19.png" in str(err.value) and "missing_20.png" not in str(err.value)


def test_pixel_limit_from_the_header(tmp_path):
    records = [_record(_image(tmp_path / "a.png", 80, 64), 1, 80, 64)]
    assert check_dataset_images(records, "small", max_pixels=80 * 64) == 1
    with pytest.raises(ValueError, match=r"(?s)image id 1 \(.*a.png\): 80 x 64 = 5,120 pixels "
                                         r"is more than INPUT.MAX_IMAGE_PIXELS = 1,000.*tile it"):
        check_dataset_images(records, "small", max_pixels=1000)


def _mapper_accepts(record):
    """What the training reader says: detectron2's read_image (EXIF applied) and
    check_image_size."""
    try:
        utils.check_image_size(record, utils.read_image(record["file_name"]))
        return True
    except utils.SizeMismatchError:
        return False


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 7, 8])
def test_exif_orientation_as_read_image_applies_it(tmp_path, suffix, orientation):
    path = _image(tmp_path / f"photo{suffix}", 60, 40, orientation)
    turned = orientation >= 5
    as_read = _record(path, 1, *((40, 60) if turned else (60, 40)))
    as_stored = _record(path, 2, *((60, 40) if turned else (40, 60)))
    assert _mapper_accepts(as_read) and not _mapper_accepts(as_stored)
    assert check_dataset_images([as_read], "photos") == 1
    with pytest.raises(ValueError, match="image id 2 .*the json says") as err:
        check_dataset_images([as_stored], "photos")
    assert (f"after its EXIF orientation {orientation}" in str(err.value)) == turned


def test_image_over_pils_own_limit_is_measured_not_refused(tmp_path, monkeypatch):
    """PIL refuses to open images over twice Image.MAX_IMAGE_PIXELS; the project's reader
    lifts that limit (INPUT.MAX_IMAGE_PIXELS decides), so the check does too."""
    path = _image(tmp_path / "wide.png", 80, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert check_dataset_images([_record(path, 1, 80, 64)], "wide") == 1
    with pytest.raises(ValueError, match="the file is 80 x 64"):
        check_dataset_images([_record(path, 1, 64, 80)], "wide")
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_large_datasets_log_their_progress(tmp_path, caplog, monkeypatch):
    path = _image(tmp_path / "a.png", 8, 8)
    records = [_record(path, k, 8, 8) for k in range(12)]
    with caplog.at_level(logging.INFO, logger="cpr_d2.data.checks"):
        check_dataset_images(records, "quiet")
    assert caplog.text == ""
    monkeypatch.setattr(checks, "LOG_FROM", 10)
    with caplog.at_level(logging.INFO, logger="cpr_d2.data.checks"):
        check_dataset_images(records, "loud")
    assert "Checking the headers of 12 images of loud" in caplog.text
    assert "Checked 12 image headers of loud" in caplog.text


def test_training_images_of_the_config(tmp_path):
    path, root = write_dataset(tmp_path)
    records = load_point_json(path, root)
    cfg = get_cpr_d2_cfg()
    cfg.DATASETS.TRAIN = ("trees",)
    assert check_training_images(cfg, records) == 2
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(f"{root}/b.png")
    cfg.INPUT.MAX_IMAGE_PIXELS = 2000
    with pytest.raises(ValueError) as err:
        check_training_images(cfg, records)
    message = str(err.value)
    assert message.startswith("dataset 'trees' (DATASETS.TRAIN): 2 of 2 images cannot be used")
    assert "2,400 pixels is more than INPUT.MAX_IMAGE_PIXELS = 2,000" in message
    assert f"image id 2 ({root}/b.png): the file is 10 x 10 (width x height), the json says " \
           "20 x 30" in message


# ---- strict iscrowd / ignore ---------------------------------------------------------------

def _load_with(key, value):
    data = base_json()
    data["annotations"][1][key] = value
    return data


# A json null is refused, not read as a missing flag: a null usually means an export
# lost the value. Leave the field out to mean 0.
@pytest.mark.parametrize("key", ["iscrowd", "ignore"])
@pytest.mark.parametrize("value,shown", [("no", '"no"'), ("yes", '"yes"'), ("0", '"0"'),
                                         (2, "2"), (-1, "-1"), (1.0, "1.0"), (None, "null"),
                                         ([1], "[1]")])
def test_flags_other_than_0_1_false_true_are_refused(tmp_path, key, value, shown):
    path, root = write_dataset(tmp_path, _load_with(key, value), images=False)
    with pytest.raises(PointJsonError) as err:
        load_point_json(path, root)
    message = str(err.value)
    assert message.startswith(f"{path}: annotation id 11 of image id 1: '{key}' must be 0 or 1 "
                              f"(or false or true), got {shown}; ")
    assert f'write "{key}": 0 for an object' in message and "leave the field out" in message


@pytest.mark.parametrize("key", ["iscrowd", "ignore"])
@pytest.mark.parametrize("value,crowd", [(0, 0), (1, 1), (False, 0), (True, 1)])
def test_flags_0_1_false_true_are_read(tmp_path, key, value, crowd):
    path, root = write_dataset(tmp_path, _load_with(key, value), images=False)
    anns = load_point_json(path, root)[0]["annotations"]
    assert anns[1]["iscrowd"] == crowd and type(anns[1]["iscrowd"]) is int
    assert anns[0]["iscrowd"] == 0  # "iscrowd": 0
    assert anns[2]["iscrowd"] == 1  # "ignore": 1


def test_a_missing_flag_is_0(tmp_path):
    data = base_json()
    data["annotations"][0].pop("iscrowd")
    path, root = write_dataset(tmp_path, data, images=False)
    assert load_point_json(path, root)[0]["annotations"][0]["iscrowd"] == 0


# ---- every point off its image -------------------------------------------------------------

def _points(data, points):
    for ann, point in zip(data["annotations"], points):
        ann["point"] = point
    return data


@pytest.mark.parametrize("policy", ["warn", "error"])
def test_a_json_with_every_object_point_off_its_image_is_refused(tmp_path, policy):
    # Image 1 is 60 x 40; annotation 12 is a crowd region ("ignore": 1).
    data = _points(base_json(), [[75.0, 8.0], [40.0, 130.0], [50.0, 5.0]])
    path, root = write_dataset(tmp_path, data, images=False)
    with pytest.raises(PointJsonError) as err:
        load_point_json(path, root, points_outside_image=policy)
    message = str(err.value)
    assert message.startswith(
        f"{path}: all 2 object points lie outside their image (first: annotation id 10 of image "
        "id 1 at [75.0, 8.0], the image is 60 x 40 (width x height)); no point can be used")
    assert "x along the width and y along the height" in message
    assert "look swapped" not in message


def test_swapped_coordinates_are_pointed_out(tmp_path):
    data = _points(base_json(), [[8.0, 45.0], [30.0, 50.0], [5.0, 50.0]])
    path, root = write_dataset(tmp_path, data, images=False)
    with pytest.raises(PointJsonError, match=r"all 2 object points.*here x and y look swapped"):
        load_point_json(path, root)


def test_one_object_point_on_its_image_is_enough(tmp_path, caplog):
    # Crowd regions do not count: here only the crowd point is on the image ...
    data = _points(base_json(), [[75.0, 8.0], [40.0, 130.0], [50.0, 5.0]])
    path, root = write_dataset(tmp_path, data, images=False)
    with pytest.raises(PointJsonError, match="all 2 object points"):
        load_point_json(path, root)
    # ... one object point on it: the others are counted and kept (policy "warn").
    data["annotations"][1]["point"] = [40.0, 30.0]
    path, root = write_dataset(tmp_path, data, images=False)
    with caplog.at_level(logging.WARNING):
        records = load_point_json(path, root)
    assert len(records[0]["annotations"]) == 3
    assert "1 of 3 points lie outside their image" in caplog.text


def test_a_json_without_object_points_still_loads(tmp_path):
    data = base_json()
    for ann in data["annotations"]:
        ann["iscrowd"] = 1
        ann["point"] = [500.0, 500.0]
    path, root = write_dataset(tmp_path, data, images=False)
    assert [len(r["annotations"]) for r in load_point_json(path, root)] == [3, 0]


def _check_on_rank(rank, init_file, records, results):
    import torch.distributed as dist

    from cpr_d2.engine.launch import end_worker_process

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = get_cpr_d2_cfg()
    cfg.DATASETS.TRAIN = ("shared",)
    try:
        check_training_images(cfg, records)
        outcome = "passed"
    except ValueError as e:
        outcome = str(e)
    with open(f"{results}.{rank}", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()
    # As cpr_d2's own workers end (a plain interpreter teardown with the compiled op and
    # gloo loaded aborts now and then, after the work is done).
    end_worker_process()


def test_two_processes_share_the_check_and_raise_the_same_error(tmp_path):
    """Each process checks every other image; both raise the one error, in record order,
    whichever process found the bad image."""
    import torch.multiprocessing as mp

    good = _image(tmp_path / "good.png", 20, 10)
    records = [_record(tmp_path / "gone_0.png", 0, 20, 10), _record(good, 1, 20, 10),
               _record(good, 2, 20, 10), _record(tmp_path / "gone_3.png", 3, 20, 10)]
    results = tmp_path / "result"
    mp.spawn(_check_on_rank, args=(str(tmp_path / "init"), records, str(results)), nprocs=2)
    outcomes = [(tmp_path / f"result.{rank}").read_text() for rank in range(2)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].startswith("dataset 'shared' (DATASETS.TRAIN): 2 of 4 images cannot be used")
    assert outcomes[0].index("gone_0.png") < outcomes[0].index("gone_3.png")
