"""Cross-fitted refinement (docs/cprnet.md, "Cross-fitted refinement").

Refining the points a CPRNet was trained on invites it to reproduce what it
memorised. With K folds, the images are split into K disjoint folds
(:func:`image_folds`), CPRNet k trains on every fold but k, and each image is
refined by the model of its own fold, which never saw it. Every model also refines
the images it did see; how far those points lie from the unseen model's point
(`disagreement`, in pixels) tells how much the refinement depends on which images a
model was trained on, a measure that needs no true boxes.

The fold models live under <work dir>/fold_<k>/ (a training run each: log.txt,
checkpoints, model_final.pth) with <work dir>/folds.json recording the split; a rerun
with the same settings skips the models already trained and resumes one that was
interrupted.
"""
import copy
import hashlib
import json
import logging
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from cpr_d2.data import read_json, register_point_coco
from cpr_d2.data.mapper import _points_on_image
from cpr_d2.utils.io import write_json_atomic

from .checkpoint import load_inference_weights
from .refine import refine_dataset

__all__ = ["combine_fold_rows", "crossfit_refine", "fold_json", "image_folds",
           "training_objects", "unrefined_rows"]

logger = logging.getLogger(__name__)


def image_folds(images, folds, source="<json>"):
    """{image id: fold} for the `images` of a point json (dicts with "id" and
    "file_name"): in the order of the SHA-1 of their file names, image n goes to fold
    n mod `folds`. The folds differ in size by at most one image and do not depend on
    the order of the json or on the seed. ValueError for fewer images than folds."""
    if not isinstance(folds, int) or folds < 1:
        raise ValueError(f"--folds must be a whole number >= 1, got {folds!r}")
    if len(images) < folds:
        raise ValueError(f"{source}: --folds {folds} needs at least {folds} images (each fold "
                         f"model trains on the other folds' images), the json has "
                         f"{len(images)}; use --folds {max(1, len(images))} or fewer")
    order = sorted(images, key=lambda im: (
        hashlib.sha1(str(im["file_name"]).encode("utf-8")).hexdigest(), str(im["id"])))
    return {im["id"]: n % folds for n, im in enumerate(order)}


def fold_json(data, folds, fold):
    """A copy of the point json `data` with the images of every fold but `fold` (a
    {image id: fold} map) and their annotations: fold model `fold`'s training set."""
    out = copy.deepcopy(data)
    out["images"] = [im for im in data.get("images", []) if folds[im["id"]] != fold]
    keep = {im["id"] for im in out["images"]}
    out["annotations"] = [a for a in data.get("annotations", []) if a.get("image_id") in keep]
    return out


def training_objects(data, folds):
    """{fold model k: {category id: objects}}: the annotations each fold model trains on
    (those of the images of every fold but k; crowd objects not counted), from the point
    json `data` and {image id: fold} `folds`."""
    count = max(folds.values()) + 1 if folds else 0
    out = {k: {} for k in range(count)}
    for ann in data.get("annotations", []):
        image_fold = folds.get(ann.get("image_id"))
        if image_fold is None or ann.get("iscrowd") in (1, True):
            continue
        for k in range(count):
            if k != image_fold:
                per_class = out[k]
                per_class[ann.get("category_id")] = per_class.get(ann.get("category_id"), 0) + 1
    return out


def combine_fold_rows(rows_per_model, folds, image_of):
    """The cross-fitted refinement: for every annotation id in the rows of the model of
    its own image's fold (rows_per_model[k], refine_dataset's rows of fold model k over
    all images), that model's row, plus "fold", "image_id" and "disagreement": the mean
    distance in pixels from its refined point to those of the other fold models (which
    trained on the image), None for a single model, and "other_points", those models'
    refined points (the move agreement and the trust of cpr_d2.engine.trust read them).
    `image_of` maps annotation ids to image ids."""
    out = {}
    for ann_id, image_id in image_of.items():
        fold = folds[image_id]
        row = rows_per_model[fold].get(ann_id)
        if row is None:  # not refined (crowd, off its image)
            continue
        point = np.asarray(row["point"], dtype=float)
        others = [np.asarray(rows[ann_id]["point"], dtype=float)
                  for k, rows in enumerate(rows_per_model) if k != fold and ann_id in rows]
        distance = float(np.mean([np.linalg.norm(point - p) for p in others])) if others else None
        out[ann_id] = {**row, "fold": fold, "image_id": image_id, "disagreement": distance,
                       "other_points": [[float(v) for v in p] for p in others]}
    return out


def unrefined_rows(dicts, image_ids):
    """refine_dataset's rows, the points left as annotated, for the objects of the records
    `dicts` whose image_id is in `image_ids`: the objects of a fold whose model could not
    be trained. As refine_dataset, crowd objects and points off their image get no row."""
    rows = {}
    for record in dicts:
        if record["image_id"] not in image_ids:
            continue
        width, height = record.get("width"), record.get("height")
        for ann in record.get("annotations", []):
            point = ann.get("point")
            if ann.get("iscrowd", 0) or point is None:
                continue
            if width is not None and height is not None and not _points_on_image(
                    np.asarray([point], dtype=np.float64), height, width)[0]:
                continue
            rows[ann["id"]] = {"point": [float(v) for v in point], "score": 0.0,
                               "coarse_point": [float(v) for v in point], "refined": False,
                               "num_kept": 0, "size": 0.0}
    return rows


# Config keys that do not change the model a fold trains: refinement only (a trained
# fold model refines again with other values of these), where it runs and writes.
_NOT_TRAINING = ("MODEL.CPR.REFINE_", "MODEL.CPR.RETURN_BAG_SCORES", "MODEL.DEVICE",
                 "MODEL.WEIGHTS", "TEST.", "OUTPUT_DIR", "DATASETS.", "DATALOADER.NUM_WORKERS",
                 "VIS_PERIOD", "CUDNN_BENCHMARK", "SOLVER.CHECKPOINT_")


def training_config(cfg):
    """{dotted key: value} of the config keys that decide what a fold model learns
    (every key but those of _NOT_TRAINING), values as json would write them."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif not name.startswith(_NOT_TRAINING):
                flat[name] = value
    walk(cfg, "")
    return json.loads(json.dumps(flat))  # tuples become lists, as read back from the file


def _fold_settings(cfg, source_json, folds):
    return {"source_json": os.path.abspath(source_json), "folds": max(folds.values()) + 1,
            "seed": int(cfg.SEED), "max_iter": int(cfg.SOLVER.MAX_ITER),
            "weights": cfg.MODEL.WEIGHTS,
            "images": {str(k): v for k, v in sorted(folds.items(), key=lambda kv: str(kv[0]))},
            "training_config": training_config(cfg)}


_ABSENT = "<absent>"


def _differing_keys(old, new):
    """The sorted keys of two dicts whose values differ (a key one lacks counts)."""
    return sorted(k for k in set(old) | set(new) if old.get(k, _ABSENT) != new.get(k, _ABSENT))


def _config_changes(old, new):
    """'KEY: old -> new' for the keys whose values differ (at most 8 named)."""
    keys = _differing_keys(old, new)
    named = [f"{k}: {old.get(k, _ABSENT)!r} -> {new.get(k, _ABSENT)!r}" for k in keys[:8]]
    return "; ".join(named) + (f"; and {len(keys) - 8} more" if len(keys) > 8 else "")


def _check_work_dir(work_dir, settings):
    """Refuse a work dir that holds the folds of other settings (a stale fold model
    would be reused); record the settings in a new one. The training config is
    compared key by key (refinement keys excepted); a folds.json written before it was
    recorded is trusted, with a warning."""
    manifest = os.path.join(work_dir, "folds.json")
    if os.path.isfile(manifest):
        old = read_json(manifest, "the folds' settings",
                        fix=f"remove {work_dir} to train the fold models afresh")
        fix = f"give another OUTPUT_DIR, or remove {work_dir} to train them afresh"
        if "training_config" not in old:
            logger.warning("%s does not record the config its fold models were trained with; "
                           "they are reused as they are. If the config's training keys changed "
                           "since, %s", manifest, fix)
            settings = {**settings, "training_config": None}
            old = {**old, "training_config": None}
        changed = _differing_keys(old, settings)
        if changed:
            named = [k for k in changed if k != "training_config"]
            if "training_config" in changed:
                named.append("config: " + _config_changes(old["training_config"],
                                                          settings["training_config"]))
            raise ValueError(
                f"{work_dir} holds fold models trained with other settings ({'; '.join(named)}); "
                f"{fix}")
        return
    if comm.is_main_process():
        os.makedirs(work_dir, exist_ok=True)
        write_json_atomic(settings, manifest, indent=1)


def _fold_cfg(cfg, name, fold_dir):
    out = cfg.clone()
    out.defrost()
    out.DATASETS.TRAIN = (name,)
    out.DATASETS.TEST = ()  # no evaluation at the end of a fold's training
    out.OUTPUT_DIR = fold_dir
    out.freeze()
    return out


def _train_fold(cfg, fold, weights):
    """Train fold model `fold` unless its model_final.pth exists (resuming an
    interrupted run); the same result whether or not earlier folds were skipped."""
    from .trainer import Trainer

    if os.path.isfile(weights):
        logger.info("Fold %d: %s exists, not trained again", fold, weights)
        return
    logger.info("Fold %d: training CPRNet on %s into %s", fold, cfg.DATASETS.TRAIN[0],
                cfg.OUTPUT_DIR)
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + fold)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()


def crossfit_refine(cfg, dataset_name, source_json, image_root, folds, work_dir):
    """Train `folds` CPRNets (cfg's training settings, each on every fold but its own)
    and refine every annotation of `dataset_name` (loaded from `source_json` with images
    under `image_root`) with the model of its image's fold: combine_fold_rows's rows,
    gathered on the main process ({} on the others)."""
    from .trainer import Trainer

    data = read_json(source_json, "point json")
    assignment = image_folds(data.get("images", []), folds, source_json)
    _check_work_dir(work_dir, _fold_settings(cfg, source_json, assignment))
    objects = training_objects(data, assignment)
    rows_per_model = []
    for k in range(folds):
        if not any(objects[k].values()):
            own = [im for im in data.get("images", []) if assignment[im["id"]] == k]
            logger.warning(
                "Fold %d: the images it would train on (every fold but %d) hold no objects, so "
                "no CPRNet is trained for it; the objects of its own %d image(s) keep their "
                "coarse points. Use fewer folds, or annotate more images", k, k, len(own))
            rows_per_model.append(unrefined_rows(DatasetCatalog.get(dataset_name),
                                                 {im["id"] for im in own}))
            continue
        fold_dir = os.path.join(work_dir, f"fold_{k}")
        train_file = os.path.join(fold_dir, "train.json")
        if comm.is_main_process() and not os.path.isfile(train_file):
            write_json_atomic(fold_json(data, assignment, k), train_file)
        comm.synchronize()
        name = f"{dataset_name}_fold{k}of{folds}"
        register_point_coco(name, train_file, image_root)
        try:
            fold_cfg = _fold_cfg(cfg, name, fold_dir)
            weights = os.path.join(fold_dir, "model_final.pth")
            _train_fold(fold_cfg, k, weights)
            comm.synchronize()
            model = Trainer.build_model(fold_cfg)
            load_inference_weights(model, weights)
            logger.info("Fold %d: refining %s with %s", k, dataset_name, weights)
            rows_per_model.append(refine_dataset(fold_cfg, model, dataset_name))
            del model
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    if not comm.is_main_process():
        return {}
    image_of = {a["id"]: a.get("image_id") for a in data.get("annotations", []) if "id" in a}
    return combine_fold_rows(rows_per_model, assignment, image_of)
