"""detectron2 evaluator for point AP (see :mod:`cpr_d2.evaluation.point_ap`).

The ground truth comes from the dataset's records in ``DatasetCatalog``:
every annotation needs its true box (``bbox`` + ``bbox_mode``), since GT
locations are box centres and distances are normalised by the box. Predictions
are ``Instances`` with ``pred_points`` (pixel coordinates in the original
image), ``scores`` and ``pred_classes`` (contiguous ids).

``point_predictions.json`` (written with ``output_dir``) is a list in COCO's results
format, one row per predicted point: ``{"image_id", "category_id", "point": [x, y],
"bbox": [x, y, 0, 0], "score"}``, with the dataset's own image and category ids. The
zero-size ``bbox`` is the point again, so that pycocotools' ``COCO.loadRes`` reads the
file; ``prediction_class_indices`` maps the rows back to the model's class indices.
"""
import dataclasses
import itertools
import logging
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Sequence

import numpy as np
from tabulate import tabulate

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from cpr_d2.data.classes import dataset_classes
from cpr_d2.utils.io import write_json_atomic
from cpr_d2.evaluation.point_ap import (
    DEFAULT_TAUS,
    _check_taus,
    _resolve_size_ranges,
    evaluate_point_ap,
)

__all__ = ["PointAPEvaluator", "build_point_evaluator", "load_point_ground_truth",
           "point_ap_dets", "point_ap_settings", "prediction_class_indices"]

PREDICTIONS_FILE = "point_predictions.json"
METRICS_FILE = "point_ap_metrics.json"
_PRED_FIELDS = ("pred_points", "scores", "pred_classes")


def load_point_ground_truth(dataset_name: str):
    """Class names, image ids and per-image GT (``boxes`` XYWH, ``classes``,
    ``iscrowd``) of a registered dataset, in dataset order.

    An annotation is an ignore region when ``iscrowd`` (or ``ignore``) is set.
    Raises ``ValueError`` when an annotation has no true box, a category id is
    out of range, or an image id repeats.
    """
    # Load first: a point json sets its thing_classes when it is loaded.
    records = DatasetCatalog.get(dataset_name)
    class_names = getattr(MetadataCatalog.get(dataset_name), "thing_classes", None)
    if not class_names:
        raise ValueError(f"dataset '{dataset_name}' has no thing_classes in its metadata; "
                         "register it with cpr_d2.data.register_point_coco or set them")
    num_classes = len(class_names)
    image_ids: List = []
    gts: List[Dict[str, np.ndarray]] = []
    seen = set()
    for record in records:
        image_id = record["image_id"]
        if image_id in seen:
            raise ValueError(
                f"dataset '{dataset_name}': image_id {image_id!r} appears more than once"
            )
        seen.add(image_id)
        boxes, classes, crowd = [], [], []
        for k, ann in enumerate(record.get("annotations", [])):
            if ann.get("bbox") is None:
                raise ValueError(
                    f"dataset '{dataset_name}': annotation {ann.get('id', k)!r} of image "
                    f"{image_id!r} has no "
                    "'bbox'. Point AP places each GT at the centre of its true box and measures "
                    "distances in units of that box, so every annotation needs its true box "
                    "('bbox' and 'bbox_mode'). Evaluate on a registration of this split that "
                    "keeps the true boxes; a point-only dataset can be trained on but not "
                    "evaluated with this metric."
                )
            mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
            box = ann["bbox"] if mode == BoxMode.XYWH_ABS else BoxMode.convert(
                list(ann["bbox"]), mode, BoxMode.XYWH_ABS
            )
            category = int(ann["category_id"])
            if not 0 <= category < num_classes:
                raise ValueError(
                    f"dataset '{dataset_name}': image {image_id!r} has category_id {category}, "
                    f"outside [0, {num_classes}) (thing_classes); category ids must be contiguous"
                )
            boxes.append([float(v) for v in box])
            classes.append(category)
            crowd.append(bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0)))
        image_ids.append(image_id)
        gts.append(
            {
                "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                "classes": np.asarray(classes, dtype=np.int64),
                "iscrowd": np.asarray(crowd, dtype=bool),
            }
        )
    return list(class_names), image_ids, gts


def prediction_class_indices(rows, dataset_name: str, source="<predictions>") -> List[int]:
    """The contiguous class index of each row of a ``point_predictions.json`` (whose
    ``category_id`` is the dataset's id)."""
    index = {cid: k for k, cid in enumerate(dataset_classes(dataset_name).category_ids)}
    out = []
    for n, row in enumerate(rows):
        try:
            out.append(index[row["category_id"]])
        except KeyError:
            raise ValueError(f"{source}: row {n} has category_id {row['category_id']!r}, which "
                             f"dataset '{dataset_name}' does not have (its ids: "
                             f"{sorted(index)}); rerun the evaluation that wrote it") from None
    return out


def _merge_predictions(per_rank: Iterable[Sequence[dict]]) -> "OrderedDict":
    """``{image_id: prediction}`` from the lists gathered from every rank; an image
    seen more than once (e.g. padded by a sampler) keeps its first prediction."""
    merged: "OrderedDict" = OrderedDict()
    for pred in itertools.chain.from_iterable(per_rank):
        merged.setdefault(pred["image_id"], pred)
    return merged


def gather_per_image(rows: Sequence[dict], distributed: bool):
    """``{image_id: row}`` of the rows of every rank, on the main process (None on the
    others); an image seen more than once keeps its first row (_merge_predictions)."""
    if distributed:
        comm.synchronize()
        per_rank = comm.gather(rows, dst=0)
        if not comm.is_main_process():
            return None
    else:
        per_rank = [rows]
    return _merge_predictions(per_rank)


def soft_counting_errors(result, gts, image_ids, counts):
    """`result` (a PointAPResult) with its MAE and RMSE taken from the per-image `counts`
    ({image id: count}; an image without one counts 0) against the non-crowd objects of
    `gts` (in the order of `image_ids`)."""
    def objects(g):
        crowd = np.asarray(g.get("iscrowd", np.zeros(len(g["classes"]))), dtype=bool).reshape(-1)
        return int(len(crowd) - crowd.sum())

    err = np.array([counts.get(i, 0) - objects(g) for i, g in zip(image_ids, gts)], np.float64)
    return dataclasses.replace(result, mae=float(np.abs(err).mean()),
                               rmse=float(np.sqrt((err ** 2).mean())))


class PointAPEvaluator(DatasetEvaluator):
    """Point AP (and counting MAE / RMSE) of point predictions on a registered dataset.

    Args:
        dataset_name: a dataset in ``DatasetCatalog`` whose annotations carry
            true boxes; ``MetadataCatalog.get(dataset_name).thing_classes`` names
            the classes (all of them count in the mean AP).
        distributed: gather predictions from all ranks; the main process evaluates.
        output_dir: where ``point_predictions.json`` is written (None: not written).
        taus, size_ranges, max_dets, clean, count_score_thresh: see
            :func:`cpr_d2.evaluation.point_ap.evaluate_point_ap`.

    ``evaluate()`` returns ``{"point_ap": {...}}``: AP metrics in percent
    (``mAP``, ``AP@0.5``, ``AP@1``, ``AP@2``, ``AP@1/small``, ..., and
    ``AP-<class>``, the class's AP averaged over taus in the range ``all``),
    ``MAE`` and ``RMSE`` in objects per image.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir=None,
        *,
        taus: Sequence[float] = DEFAULT_TAUS,
        size_ranges="coco",
        max_dets: int = 100,
        clean: bool = False,
        count_score_thresh: float = 0.5,
    ):
        self._logger = logging.getLogger(__name__)
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        _check_taus(taus)
        _resolve_size_ranges(size_ranges)
        self._eval_kwargs = dict(
            taus=tuple(taus), size_ranges=size_ranges, max_dets=max_dets, clean=clean,
            count_score_thresh=count_score_thresh,
        )
        self._class_names, self._image_ids, self._gts = load_point_ground_truth(dataset_name)
        self._index = {image_id: i for i, image_id in enumerate(self._image_ids)}
        self.reset()

    def reset(self):
        self._predictions = []
        self._model_threshold = None  # a counting threshold the model carries

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            instances = out["instances"]
            if out.get("count_threshold") is not None:
                self._model_threshold = float(out["count_threshold"])
            missing = [f for f in _PRED_FIELDS if not instances.has(f)]
            if missing:
                raise KeyError(
                    f"PointAPEvaluator needs Instances with fields {_PRED_FIELDS}; "
                    f"missing {missing}"
                )
            points = instances.pred_points.detach().cpu().numpy()
            scores = instances.scores.detach().cpu().numpy()
            classes = instances.pred_classes.detach().cpu().numpy()
            self._predictions.append(
                {
                    "image_id": inp["image_id"],
                    "points": points.astype(np.float64).reshape(-1, 2),
                    "scores": scores.astype(np.float32).reshape(-1),
                    "classes": classes.astype(np.int64).reshape(-1),
                    # The model's soft count (COUNT_RULE "soft"), gathered with the points.
                    "soft_count": int(out["count"]) if out.get("count_rule") == "soft"
                    else None,
                }
            )

    def evaluate(self):
        predictions = gather_per_image(self._predictions, self._distributed)
        if predictions is None:  # not the main process
            return {}
        if not predictions:
            self._logger.warning("[PointAPEvaluator] Did not receive any predictions.")
            return {}
        unknown = [i for i in predictions if i not in self._index]
        if unknown:
            raise ValueError(
                f"predictions for {len(unknown)} image(s) not in dataset '{self._dataset_name}', "
                f"e.g. image_id {unknown[0]!r}"
            )
        if len(predictions) < len(self._image_ids):
            self._logger.warning(
                f"[PointAPEvaluator] {len(self._image_ids) - len(predictions)} of "
                f"{len(self._image_ids)} images have no predictions; they count as empty."
            )
        empty = {"points": np.zeros((0, 2)), "scores": np.zeros(0, np.float32),
                 "classes": np.zeros(0, np.int64)}
        dets = [predictions.get(image_id, empty) for image_id in self._image_ids]

        if self._output_dir:
            self._write_predictions(dets)

        kwargs = dict(self._eval_kwargs)
        if self._model_threshold is not None:
            kwargs["count_score_thresh"] = self._model_threshold
            source = "the model's, chosen on its training images"
        else:
            source = "TEST.POINT_AP.COUNT_SCORE_THRESH"
        result = evaluate_point_ap(self._gts, dets, len(self._class_names), **kwargs)
        rule = "threshold"
        soft_counts = {i: p["soft_count"] for i, p in predictions.items()
                       if p.get("soft_count") is not None}
        if soft_counts and len(soft_counts) == len(predictions):
            result = soft_counting_errors(result, self._gts, self._image_ids, soft_counts)
            rule = "soft"
            source = "the model's soft count, fitted on its training images"
        self._log(result, source, rule)
        metrics = OrderedDict(
            (name, value if name in ("MAE", "RMSE") else 100.0 * value)
            for name, value in result.metrics().items()
        )
        if "all" in result.range_names:
            per_class = result.ap[:, result.range_names.index("all")].mean(axis=0)
            for name, value in zip(self._class_names, per_class):
                metrics[f"AP-{name}"] = 100.0 * float(value)
        metrics["count_threshold"] = float(kwargs["count_score_thresh"])
        if self._output_dir:
            # NaN (a range without GT) is written as null: strict json.
            record = {k: (v if v == v else None) for k, v in metrics.items()}
            record["count_threshold_source"] = source
            record["count_rule"] = rule
            write_json_atomic(record, os.path.join(self._output_dir, METRICS_FILE))
        return OrderedDict(point_ap=metrics)

    def _write_predictions(self, dets):
        category_ids = dataset_classes(self._dataset_name).category_ids
        rows = []
        for image_id, d in zip(self._image_ids, dets):
            columns = (d["points"].tolist(), d["scores"].tolist(), d["classes"].tolist())
            for (x, y), s, c in zip(*columns):
                rows.append({"image_id": image_id, "category_id": category_ids[c],
                             "point": [x, y], "bbox": [x, y, 0.0, 0.0], "score": s})
        path = os.path.join(self._output_dir, PREDICTIONS_FILE)
        write_json_atomic(rows, path)
        self._logger.info(f"Saved {len(rows)} point predictions to {path}")

    def _log(self, result, threshold_source, rule="threshold"):
        conventions = "clean" if result.clean else "official conventions"
        mean_ap = result.mean_ap
        header = ["range", "#GT", "mAP"] + [f"AP@{t:g}" for t in result.taus]
        rows = []
        for r, name in enumerate(result.range_names):
            lo, hi = result.size_ranges[r]
            rows.append(
                [f"{name} [{lo:g}, {hi:g})", int(result.num_positives[r].sum()),
                 100 * float(np.mean(mean_ap[:, r]))] + [100 * float(v) for v in mean_ap[:, r]]
            )
        table = tabulate(rows, headers=header, tablefmt="pipe", floatfmt=".3f", numalign="left")
        self._logger.info(
            f"Point AP on '{self._dataset_name}' ({result.num_images} images, max_dets "
            f"{result.max_dets}, {conventions}):\n{table}\n"
            f"Counting: MAE {result.mae:.3f}, RMSE {result.rmse:.3f} " + (
                f"({threshold_source})" if rule == "soft" else
                f"(detections with score > {result.count_score_thresh:g}, {threshold_source})")
        )
        if "all" in result.range_names and len(self._class_names) > 1:
            per_class = result.ap[:, result.range_names.index("all")].mean(axis=0)
            pairs = [(name, 100 * float(v)) for name, v in zip(self._class_names, per_class)]
            cols = min(6, 2 * len(pairs))
            flat = list(itertools.chain(*pairs))
            grid = itertools.zip_longest(*[flat[i::cols] for i in range(cols)])
            table = tabulate(grid, headers=["category", "AP"] * (cols // 2), tablefmt="pipe",
                             floatfmt=".3f", numalign="left")
            self._logger.info(f"Per-category point AP (mean over taus, range 'all'):\n{table}")


def point_ap_size_ranges_and_max_dets(keys, metadata):
    """(size_ranges, max_dets) of TEST.POINT_AP `keys` (a config node, or the dict of a
    config.yaml): an empty SIZE_RANGES or a zero MAX_DETS takes the dataset's metadata
    (`size_ranges`, `max_dets`), then the COCO defaults."""
    return (keys.get("SIZE_RANGES") or getattr(metadata, "size_ranges", "coco"),
            keys.get("MAX_DETS") or getattr(metadata, "max_dets", 100))


def build_point_evaluator(cfg, dataset_name, output_dir=None, distributed=True):
    """A PointAPEvaluator configured by cfg.TEST.POINT_AP; empty or zero keys take the
    dataset's metadata (`size_ranges`, `max_dets`), then the COCO defaults."""
    keys = cfg.TEST.POINT_AP
    metadata = MetadataCatalog.get(dataset_name)
    size_ranges, max_dets = point_ap_size_ranges_and_max_dets(keys, metadata)
    return PointAPEvaluator(
        dataset_name,
        distributed=distributed,
        output_dir=output_dir,
        taus=tuple(keys.TAUS),
        size_ranges=size_ranges,
        max_dets=max_dets,
        clean=keys.CLEAN,
        count_score_thresh=keys.COUNT_SCORE_THRESH,
    )


def point_ap_dets(rows, image_ids, source="<predictions>", dataset_name=None):
    """Per-image detections in the format of ``evaluate_point_ap`` (one entry per image of
    ``image_ids``, in that order; an image without rows is empty) from the rows of a
    ``point_predictions.json`` (``image_id``, ``category_id``, ``point``, ``score``), in
    their order, as the evaluator wrote them. Their ``category_id`` is registered dataset
    ``dataset_name``'s id, mapped to the class index; without a dataset, the index."""
    if dataset_name is not None:
        indices = prediction_class_indices(rows, dataset_name, source)
        rows = [dict(row, category_id=c) for row, c in zip(rows, indices)]
    index = {image_id: k for k, image_id in enumerate(image_ids)}
    points = [[] for _ in image_ids]
    scores = [[] for _ in image_ids]
    classes = [[] for _ in image_ids]
    for n, row in enumerate(rows):
        try:
            k = index[row["image_id"]]
        except KeyError:
            raise ValueError(f"{source}: row {n} is for image_id {row['image_id']!r}, which the "
                             "test dataset does not have; rerun the stage that wrote it "
                             "(--force <stage>)") from None
        points[k].append(row["point"])
        scores[k].append(row["score"])
        classes[k].append(row["category_id"])
    return [{"points": np.asarray(p, dtype=np.float64).reshape(-1, 2),
             "scores": np.asarray(s, dtype=np.float32).reshape(-1),
             "classes": np.asarray(c, dtype=np.int64).reshape(-1)}
            for p, s, c in zip(points, scores, classes)]


def point_ap_settings(config_yaml, metadata=None):
    """The point-AP settings an evaluation ran with, for recomputing its AP@tau over the
    range ``all``: ``{"size_range": (lo, hi), "max_dets", "clean"}`` from the
    ``TEST.POINT_AP`` keys of the config a training wrote (``OUTPUT_DIR/config.yaml``),
    with the dataset's metadata and then the defaults for empty keys, as
    ``build_point_evaluator`` does. None when the size ranges have no range ``all``."""
    import yaml

    keys = {}
    if config_yaml and os.path.isfile(config_yaml):
        with open(config_yaml, encoding="utf-8") as f:
            keys = ((yaml.safe_load(f) or {}).get("TEST") or {}).get("POINT_AP") or {}
    size_ranges, max_dets = point_ap_size_ranges_and_max_dets(keys, metadata)
    names, bounds = _resolve_size_ranges(size_ranges)
    if "all" not in names:
        return None
    return {"size_range": bounds[names.index("all")], "max_dets": int(max_dets),
            "clean": bool(keys.get("CLEAN", False))}
