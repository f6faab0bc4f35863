"""Small point datasets written to disk for the data tests."""
import copy
import json
import os

import numpy as np
from PIL import Image


def base_json():
    """Two images (one without objects), two classes with non-contiguous ids."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "b.png", "height": 30, "width": 20},
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "tree"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "point": [12.5, 8.0],
             "bbox": [5.0, 2.0, 20.0, 10.0], "iscrowd": 0, "extra": "kept"},
            {"id": 11, "image_id": 1, "category_id": 3, "point": [40.0, 30.0],
             "bbox": [30.0, 20.0, 20.0, 15.0]},
            {"id": 12, "image_id": 1, "category_id": 3, "point": [50.0, 5.0],
             "bbox": [45.0, 0.0, 10.0, 10.0], "ignore": 1},
        ],
    }


def write_dataset(tmp_path, data=None, images=True):
    """Writes the json (and blank images of the declared sizes); returns (json, image_root)."""
    data = copy.deepcopy(base_json() if data is None else data)
    root = os.path.join(tmp_path, "images")
    os.makedirs(root, exist_ok=True)
    if images:
        for img in data.get("images", []):
            if isinstance(img, dict) and {"file_name", "height", "width"} <= img.keys():
                Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(
                    os.path.join(root, img["file_name"]))
    path = os.path.join(tmp_path, "points.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, root
