"""Pieces of the whole CPR pipeline (tools/run_pipeline.py): the training jsons it derives
from a point dataset, and the results table it prints."""
import copy
import json
import math
import os

from cpr_d2.evaluation.semantic_variance import compare_point_jsons
from cpr_d2.utils.io import write_json_atomic

__all__ = ["subset_json", "centres_json", "training_points_rows", "localizer_rows",
           "markdown_table", "read_json"]


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid json ({e}); delete it and rerun the "
                         "stage that writes it") from None


def subset_json(data, num_images):
    """A copy of a point json with its first `num_images` images (by order in "images")
    and their annotations."""
    out = copy.deepcopy(data)
    out["images"] = out.get("images", [])[:num_images]
    keep = {img["id"] for img in out["images"]}
    out["annotations"] = [a for a in out.get("annotations", []) if a.get("image_id") in keep]
    return out


def _true_box(ann):
    box = ann.get("true_bbox", ann.get("bbox"))
    if box is None or len(box) != 4:
        return None
    return [float(v) for v in box]


def centres_json(data, source="<json>"):
    """A copy of a point json whose points are the true box centres (`true_bbox` when
    present, else `bbox`); the point it replaced is kept as `coarse_point`."""
    out = copy.deepcopy(data)
    for index, ann in enumerate(out.get("annotations", [])):
        box = _true_box(ann)
        if box is None:
            raise ValueError(f"{source}: annotation id {ann.get('id', f'#{index}')} has no true box "
                             "('true_bbox' or 'bbox'); the true-centre localizer needs one on "
                             "every annotation")
        if "point" in ann:
            ann["coarse_point"] = ann["point"]
        ann["point"] = [box[0] + box[2] / 2, box[1] + box[3] / 2]
    return out


def write_derived_json(data, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(data, path)


def _pct(new, old):
    if not (old and math.isfinite(old) and math.isfinite(new)):
        return ""
    return f"{100 * (new / old - 1):+.1f}%"


def training_points_rows(coarse, refined):
    """Rows (range, RSV coarse, RSV refined, change, |o| coarse, |o| refined, change) from
    two point jsons with true boxes, matched by annotation id."""
    comparison = compare_point_jsons(coarse, refined, sources=("coarse", "refined"))
    rows = []
    for name in comparison.a:
        a, b = comparison.a[name], comparison.b[name]
        rows.append({
            "range": name, "objects": a.objects,
            "rsv_coarse": a.rsv, "rsv_refined": b.rsv, "rsv_change_%": _pct(b.rsv, a.rsv),
            "dist_coarse": a.mean_distance, "dist_refined": b.mean_distance,
            "dist_change_%": _pct(b.mean_distance, a.mean_distance),
            "worse_%": comparison.worse[name],
        })
    return rows


def localizer_rows(metrics_by_name):
    """Rows of the localizer table from {name: point-AP metrics dict (or None)}."""
    rows = []
    for name, metrics in metrics_by_name.items():
        metrics = metrics or {}
        rows.append({"trained on": name, **{k: metrics.get(k) for k in
                                             ("AP@0.5", "AP@1", "AP@2", "mAP", "MAE", "RMSE")}})
    return rows


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}" if abs(value) >= 100 \
            else f"{value:.2f}"
    return str(value)


def markdown_table(rows, columns=None):
    if not rows:
        return ""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
