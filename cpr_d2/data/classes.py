"""The classes a model is trained on: taken from its training datasets, checked against
the config, and stored in its checkpoints so that everything that loads the model later
(evaluation, refinement, the demo) knows their names and the dataset's category ids.

MODEL.CPR.NUM_CLASSES and MODEL.P2PNET.NUM_CLASSES default to 0, "the training
datasets' class count". ``resolve_num_classes`` (called by the tools' ``setup_cfg``)
replaces 0 by that count, so the ``config.yaml`` a training writes holds the number;
a config that sets another number than the data has is refused before any model is
built. At inference, a checkpoint's own class list comes first (the training data may
not be registered where the model is used).

A checkpoint's entry ``"classes"``::

    {"thing_classes": ["tree", ...], "category_ids": [1, ...], "datasets": ["forest"]}

``category_ids[k]`` is the dataset's id of the model's class k (contiguous index).
"""
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

__all__ = [
    "ClassList",
    "ClassListCheckpointable",
    "check_evaluation_classes",
    "checkpoint_classes",
    "class_count_key",
    "dataset_classes",
    "require_num_classes",
    "resolve_num_classes",
    "training_classes",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "classes"


@dataclass
class ClassList:
    """Class names in the model's (contiguous) order and the dataset's id of each."""

    names: List[str]
    category_ids: List[int]
    datasets: List[str] = field(default_factory=list)

    def state_dict(self):
        return {"thing_classes": list(self.names), "category_ids": list(self.category_ids),
                "datasets": list(self.datasets)}

    def same_as(self, other: "ClassList") -> bool:
        """The same names and category ids, in the same order (whatever the datasets)."""
        return (self.names, self.category_ids) == (other.names, other.category_ids)

    @classmethod
    def from_state(cls, state, source):
        try:
            names = [str(n) for n in state["thing_classes"]]
            ids = [int(i) for i in state.get("category_ids") or range(len(names))]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{source}: its '{CHECKPOINT_KEY}' entry is not a class list "
                             "({'thing_classes': [...], 'category_ids': [...]})") from None
        if len(ids) != len(names):
            raise ValueError(f"{source}: {len(names)} class names but {len(ids)} category ids")
        return cls(names, ids, [str(d) for d in state.get("datasets", [])])


class ClassListCheckpointable:
    """A checkpointable (detectron2 Checkpointer) that writes the training classes into
    every checkpoint; loading one back only checks that it holds the same classes."""

    def __init__(self, classes: ClassList):
        self.classes = classes

    def state_dict(self):
        return self.classes.state_dict()

    def load_state_dict(self, state):
        old = ClassList.from_state(state, "the resumed checkpoint")
        if not old.same_as(self.classes):
            logger.warning("the resumed checkpoint was trained on classes %s (ids %s); this run "
                           "trains on %s (ids %s)", old.names, old.category_ids,
                           self.classes.names, self.classes.category_ids)


def class_count_key(cfg):
    """(config node, full key name) of the class count of cfg's META_ARCHITECTURE, or
    (None, None) for an architecture without one."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "CPRNet":
        return cfg.MODEL.CPR, "MODEL.CPR.NUM_CLASSES"
    if arch == "P2PNet":
        return cfg.MODEL.P2PNET, "MODEL.P2PNET.NUM_CLASSES"
    return None, None


def require_num_classes(cfg):
    """Refuse to build a model whose class count is still 0 ("from the data"): the tools
    resolve it in setup_cfg; code that builds models itself calls resolve_num_classes."""
    node, key = class_count_key(cfg)
    if node is not None and int(node.NUM_CLASSES) <= 0:
        raise ValueError(f"{key} is {node.NUM_CLASSES}: the class count has not been taken from "
                         "the training data; set it, or call cpr_d2.data.classes."
                         "resolve_num_classes(cfg, training=...) before building the model (the "
                         "tools' setup_cfg does)")


def dataset_classes(name) -> ClassList:
    """The classes of registered dataset `name`: its metadata's ``thing_classes`` and,
    through ``thing_dataset_id_to_contiguous_id``, the dataset's category ids (a point
    json sets both when it is loaded, so it is loaded here when they are missing)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        raise KeyError(f"dataset '{name}' is not registered; register its point json with "
                       "DATASETS.POINT_JSONS (name, json, image root) or "
                       "cpr_d2.data.register_point_coco")
    meta = MetadataCatalog.get(name)
    if not getattr(meta, "thing_dataset_id_to_contiguous_id", None):
        DatasetCatalog.get(name)  # a point json sets both on loading
    names = getattr(meta, "thing_classes", None)
    if not names:
        raise ValueError(f"dataset '{name}' has no thing_classes in its metadata; register it "
                         "with cpr_d2.data.register_point_coco, whose json lists its categories")
    id_map = getattr(meta, "thing_dataset_id_to_contiguous_id", None) or {}
    by_index = {k: cid for cid, k in id_map.items()}
    ids = [int(by_index.get(k, k)) for k in range(len(names))]
    return ClassList(list(names), ids, [name])


def training_classes(dataset_names: Sequence[str]) -> ClassList:
    """The classes of the training datasets, which must all have the same ones."""
    if not dataset_names:
        raise ValueError("DATASETS.TRAIN is empty: name the training dataset(s)")
    first = dataset_classes(dataset_names[0])
    for name in dataset_names[1:]:
        other = dataset_classes(name)
        if not other.same_as(first):
            raise ValueError(
                f"the training datasets disagree on their classes: '{dataset_names[0]}' has "
                f"{_describe(first)}, '{name}' has {_describe(other)}; train on datasets with "
                "the same categories (same names and ids)")
    return ClassList(first.names, first.category_ids, list(dataset_names))


def checkpoint_classes(path) -> Optional[ClassList]:
    """The class list stored in checkpoint `path`, or None (a checkpoint from before
    checkpoints carried one, a URL, or no file)."""
    if not path or "://" in path or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    # A tool asks more than once (setup_cfg, then the demo's labels): read the file once.
    return _stored_classes(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _stored_classes(path, mtime_ns, size):
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # unreadable: the weights' loader says so with its own message
        return None
    if not isinstance(data, dict) or not isinstance(data.get(CHECKPOINT_KEY), dict):
        return None
    return ClassList.from_state(data[CHECKPOINT_KEY], f"checkpoint {path}")


def _all_registered(names):
    from detectron2.data import DatasetCatalog

    registered = DatasetCatalog.list()
    return bool(names) and all(n in registered for n in names)


def _describe(classes: ClassList, limit=8):
    shown = ", ".join(f"{n!r} (id {i})" for n, i in
                      list(zip(classes.names, classes.category_ids))[:limit])
    more = f", ... ({len(classes.names)} in all)" if len(classes.names) > limit else ""
    return f"{len(classes.names)} class(es): {shown}{more}"


def resolve_num_classes(cfg, training) -> Optional[ClassList]:
    """Set cfg's class count (an unfrozen config) when it is 0, and refuse a count that
    differs from the data's. Training: the classes of DATASETS.TRAIN. Inference: those
    stored in MODEL.WEIGHTS, else those of DATASETS.TRAIN when registered. Returns the
    class list used (None when nothing was known and the config sets the count)."""
    node, key = class_count_key(cfg)
    if node is None:
        return None
    count = int(node.NUM_CLASSES)
    if count < 0:
        raise ValueError(f"{key} is {count}; set the number of classes, or 0 to take it from "
                         "the training dataset")
    classes, source = None, None
    if not training:
        classes = checkpoint_classes(cfg.MODEL.WEIGHTS)
        source = f"the checkpoint MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}"
    if classes is None and (training or count == 0):
        names = tuple(cfg.DATASETS.TRAIN)
        if training or _all_registered(names):
            classes = training_classes(names)
            source = f"the training dataset(s) {', '.join(names)}"
    if classes is None:
        if count == 0:
            raise ValueError(
                f"{key} is 0 (take it from the training data), but MODEL.WEIGHTS "
                f"{cfg.MODEL.WEIGHTS or '(none)'} stores no class list and DATASETS.TRAIN "
                f"{tuple(cfg.DATASETS.TRAIN)} is not registered here; set {key} to the "
                "model's number of classes, or use the config.yaml its training wrote")
        return None
    if count == 0:
        node.NUM_CLASSES = len(classes.names)
        logger.info("%s = %d, from %s: %s", key, len(classes.names), source,
                    ", ".join(classes.names[:20]) + (" ..." if len(classes.names) > 20 else ""))
    elif count != len(classes.names):
        raise ValueError(
            f"{key} is {count}, but {source} has {_describe(classes)}; set {key} "
            f"{len(classes.names)} (or 0, to take the count from the training data)")
    return classes


def check_evaluation_classes(cfg, dataset_name):
    """Refuse to evaluate on a dataset whose classes are not the model's: another count is
    an error, other names or ids (when the training datasets are registered) too."""
    node, key = class_count_key(cfg)
    if node is None:
        return
    test = dataset_classes(dataset_name)
    if len(test.names) != int(node.NUM_CLASSES):
        raise ValueError(f"dataset '{dataset_name}' has {len(test.names)} class(es) "
                         f"({', '.join(test.names[:8])}), the model {node.NUM_CLASSES} ({key}); "
                         "evaluate on a dataset with the training data's categories")
    train = tuple(cfg.DATASETS.TRAIN)
    if _all_registered(train):
        ours = training_classes(train)
        if not ours.same_as(test):
            raise ValueError(f"dataset '{dataset_name}' has {_describe(test)}; the training data "
                             f"has {_describe(ours)}; give both jsons the same categories")
