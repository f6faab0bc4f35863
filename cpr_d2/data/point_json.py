"""The point json as a file: reading it with errors that name the file and the fix, the
one rule for an annotation's true box, and the jsons derived from a point json (a subset
of its images, its true box centres as points), written atomically.

The format itself (fields, flags, coordinates) is described in
:mod:`cpr_d2.data.datasets.point_coco`, which loads a point json into detectron2's
dataset dicts with this module's reader.
"""
import copy
import json
import os

from cpr_d2.utils.io import write_json_atomic
from cpr_d2.utils.records import finite_floats

__all__ = [
    "PointJsonError",
    "box_centre",
    "centres_json",
    "read_json",
    "subset_json",
    "true_box",
    "true_box_key",
    "write_point_json",
]

# What read_json suggests for a file that exists but is not json.
REGENERATE = "fix or regenerate the file"


class PointJsonError(ValueError):
    """A point json that cannot be loaded; the message names the file, the record and the fix."""


def read_json(path, what="point json", fix=REGENERATE):
    """The parsed json file `path`. Errors name `what` the file is and say `fix`: a
    missing file raises FileNotFoundError, a folder, an unreadable file, text that is not
    json or not UTF-8 raise PointJsonError (a ValueError)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise PointJsonError(f"{what} {path} is not valid json (line {e.lineno}, column "
                             f"{e.colno}: {e.msg}); {fix}") from None
    except UnicodeDecodeError as e:
        raise PointJsonError(f"{what} {path} is not a UTF-8 text file ({e}); is it a "
                             "json?") from None
    except OSError as e:  # a folder, no permission
        raise PointJsonError(f"{what} {path} cannot be read ({type(e).__name__}: "
                             f"{e.strerror or e}); {fix}") from None


def true_box_key(ann):
    """The field of annotation `ann` that holds its true box (XYWH): ``true_bbox`` where
    the annotation has one (the official CPR release, whose ``bbox`` is a 16 x 16 pseudo
    box around the point), else ``bbox``."""
    return "true_bbox" if "true_bbox" in ann else "bbox"


def true_box(ann):
    """Annotation `ann`'s true box as 4 finite floats [x, y, w, h], or None when it has
    none or a malformed one (not 4 finite numbers)."""
    return finite_floats(ann.get(true_box_key(ann)), 4)


def box_centre(box):
    """[x + w / 2, y + h / 2] of an XYWH box."""
    return [box[0] + box[2] / 2, box[1] + box[3] / 2]


def subset_json(data, num_images):
    """A copy of a point json with its first `num_images` images (by order in "images")
    and their annotations."""
    out = copy.deepcopy(data)
    out["images"] = out.get("images", [])[:num_images]
    keep = {img["id"] for img in out["images"]}
    out["annotations"] = [a for a in out.get("annotations", []) if a.get("image_id") in keep]
    return out


def centres_json(data, source="<json>"):
    """A copy of a point json whose points are the true box centres (:func:`true_box`);
    the point each replaced is kept as `coarse_point`."""
    out = copy.deepcopy(data)
    for index, ann in enumerate(out.get("annotations", [])):
        box = true_box(ann)
        if box is None:
            raise ValueError(f"{source}: annotation id {ann.get('id', f'#{index}')} has no true box "
                             "('true_bbox' or 'bbox'); the true-centre localizer needs one on "
                             "every annotation")
        if "point" in ann:
            ann["coarse_point"] = ann["point"]
        ann["point"] = box_centre(box)
    return out


def write_point_json(data, path):
    """Write `data` to `path` atomically (a complete file or the previous one), creating
    its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(data, path)
