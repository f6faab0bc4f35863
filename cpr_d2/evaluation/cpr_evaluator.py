"""CPREvaluator: does refinement reduce the semantic variance of the points?

On a dataset with true boxes it compares the coarse (annotated) points with
CPRNet's refined points: RSV and mean normalised distance to the box centre,
overall and per object-size range.
"""
import logging
from collections import OrderedDict

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from tabulate import tabulate

from .evaluator import gather_per_image
from .semantic_variance import DEFAULT_SIZE_RANGES, semantic_variance_by_range, worse_by_range

__all__ = ["CPREvaluator"]

logger = logging.getLogger(__name__)


class CPREvaluator(DatasetEvaluator):
    """Collects CPRNet's refined points; evaluate() returns {"cpr": {...}} with
    rsv_coarse, rsv_refined, rsv_change_% (negative = less variance), dist_coarse,
    dist_refined, dist_change_%, worse_% (objects whose refined point is further from
    the true centre, by more than 5% of their size), per size range as
    "<metric>/<range>", and refined_% (objects moved)."""

    def __init__(self, dataset_name, distributed=True, size_ranges=DEFAULT_SIZE_RANGES):
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._size_ranges = size_ranges
        self._records = None
        self.reset()

    def reset(self):
        self._rows = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            self._rows.append({
                "image_id": inp["image_id"],
                "ann_index": inst.gt_ann_index.numpy(),
                "coarse": inst.coarse_points.numpy(),
                "refined": inst.pred_points.numpy(),
                "moved": inst.refined.numpy(),
            })

    def _true_boxes(self):
        if self._records is None:
            self._records = {r["image_id"]: r for r in DatasetCatalog.get(self._dataset_name)}
        return self._records

    def evaluate(self):
        rows = gather_per_image(self._rows, self._distributed)
        if rows is None:  # not the main process
            return {}
        records = self._true_boxes()
        coarse, refined, boxes, labels, moved = [], [], [], [], []
        for row in rows.values():
            anns = records[row["image_id"]]["annotations"]
            for k, index in enumerate(row["ann_index"]):
                ann = anns[int(index)]
                if "bbox" not in ann:
                    continue
                box = BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS),
                                      BoxMode.XYWH_ABS)
                if box[2] <= 0 or box[3] <= 0:
                    continue
                boxes.append(box)
                labels.append(ann["category_id"])
                coarse.append(row["coarse"][k])
                refined.append(row["refined"][k])
                moved.append(bool(row["moved"][k]))
        if not boxes:
            logger.warning("CPREvaluator: no object of '%s' has a true box; nothing to measure",
                           self._dataset_name)
            return {}
        boxes, labels = np.array(boxes, dtype=np.float64), np.array(labels)
        before = semantic_variance_by_range(np.array(coarse), boxes, labels, self._size_ranges)
        after = semantic_variance_by_range(np.array(refined), boxes, labels, self._size_ranges)
        worse = worse_by_range(np.array(coarse), np.array(refined), boxes, self._size_ranges)
        results = OrderedDict()
        table = []
        for name, _, _ in self._size_ranges:
            suffix = "" if name == "all" else f"/{name}"
            b, a = before[name], after[name]
            results[f"rsv_coarse{suffix}"] = b.rsv
            results[f"rsv_refined{suffix}"] = a.rsv
            results[f"rsv_change_%{suffix}"] = 100 * (a.rsv - b.rsv) / b.rsv if b.rsv else float("nan")
            results[f"dist_coarse{suffix}"] = b.mean_distance
            results[f"dist_refined{suffix}"] = a.mean_distance
            results[f"dist_change_%{suffix}"] = (100 * (a.mean_distance - b.mean_distance)
                                                 / b.mean_distance if b.mean_distance else float("nan"))
            results[f"worse_%{suffix}"] = worse[name]
            table.append([name, b.objects, f"{b.rsv:.4f}", f"{a.rsv:.4f}",
                          f"{results[f'rsv_change_%{suffix}']:+.1f}%", f"{b.mean_distance:.4f}",
                          f"{a.mean_distance:.4f}", f"{results[f'dist_change_%{suffix}']:+.1f}%",
                          f"{worse[name]:.1f}%"])
        results["refined_%"] = 100 * float(np.mean(moved))
        logger.info("Semantic variance of %s, coarse -> refined (%.1f%% of objects moved):\n%s",
                    self._dataset_name, results["refined_%"], tabulate(
                        table, headers=["range", "objects", "RSV coarse", "RSV refined", "change",
                                        "dist coarse", "dist refined", "change", "worse"]))
        return {"cpr": results}
