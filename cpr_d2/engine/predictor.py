"""A trained P2PNet on images of any size, from Python: detectron2's DefaultPredictor
idiom for point models.

    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.engine.predictor import PointPredictor

    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file("configs/forest/p2p_R18_s8.yaml")
    cfg.MODEL.WEIGHTS = "output/forest/p2p_R18_s8/model_final.pth"
    predictor = PointPredictor(cfg)
    inst = predictor(image_bgr)                  # the whole image: pred_points, scores, pred_classes
    inst = predictor.predict_large(orthomosaic)  # any size: overlapping tiles

Points are in the pixels of the image passed in. Large images are cut into tiles
of at most `tile` pixels a side that overlap by `overlap` pixels; the cores of the
tiles (each overlap split half-way) partition the image, and each tile keeps only
the points in its core, so every point comes from exactly one tile; a class-wise
NMS across tiles then removes the doubles of objects cut by a core border. Tiles
are predicted `batch_size` at a time and only that many are copied out of the
image at once.
"""
import logging
import math
from collections import namedtuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.structures import Instances
from tqdm import tqdm

from cpr_d2.data.classes import checkpoint_classes, class_count_key
from cpr_d2.data.mapper import annotations_to_point_instances
from cpr_d2.modeling.p2pnet import point_nms

from .checkpoint import load_inference_weights

__all__ = ["DEFAULT_TILE", "PointPredictor", "PointRefiner", "Tile", "TILE_OVERLAP",
           "model_metadata", "tile_grid"]

logger = logging.getLogger(__name__)

DEFAULT_TILE = 2048  # pixels a side of predict_large's tiles
TILE_OVERLAP = 64  # pixels shared by neighbouring tiles (at most a quarter of a tile)

# A tile: pixels [x0, x1) x [y0, y1) of the image; its core [cx0, cx1) x [cy0, cy1)
# (closed at the image's right / bottom edge) holds the points it keeps.
Tile = namedtuple("Tile", "x0 y0 x1 y1 cx0 cy0 cx1 cy1")


def _axis_tiles(length, size, overlap):
    """[(start, end, core_start, core_end)] along one axis of `length` pixels."""
    if length <= size:
        return [(0, length, 0.0, float(length))]
    step = size - overlap
    count = math.ceil((length - overlap) / step)
    starts = [min(k * step, length - size) for k in range(count)]
    # Neighbours share at least `overlap` pixels; their cores meet half-way through it.
    cuts = ([0.0] + [(starts[k + 1] + starts[k] + size) / 2 for k in range(count - 1)]
            + [float(length)])
    return [(s, s + size, cuts[k], cuts[k + 1]) for k, s in enumerate(starts)]


def tile_grid(height, width, tile, overlap=None):
    """The tiles (at most tile x tile pixels) covering a height x width image, row by
    row; their cores partition it. One tile when the image fits. `overlap` defaults to
    min(TILE_OVERLAP, tile // 4) and must be smaller than half a tile."""
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if overlap is None:
        overlap = min(TILE_OVERLAP, tile // 4)
    if not 0 <= overlap < tile / 2:
        raise ValueError(f"overlap must be at least 0 and less than half the tile ({tile} px), "
                         f"got {overlap}")
    rows = _axis_tiles(height, tile, overlap)
    cols = _axis_tiles(width, tile, overlap)
    return [Tile(x0, y0, x1, y1, cx0, cy0, cx1, cy1)
            for (y0, y1, cy0, cy1) in rows for (x0, x1, cx0, cx1) in cols]


def _in_core(values, low, high, closed):
    inside = values >= low
    return inside & ((values <= high) if closed else (values < high))


def model_metadata(cfg, dataset=None):
    """The class names to label points with: those the model was trained on (stored in
    its checkpoint, cfg.MODEL.WEIGHTS), else the dataset's (`dataset`, else
    DATASETS.TEST[0]), else 'class k'."""
    name = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    trained = checkpoint_classes(cfg.MODEL.WEIGHTS)
    if trained is not None:
        return Metadata(name=name, thing_classes=list(trained.names))
    meta = MetadataCatalog.get(name)
    if getattr(meta, "thing_classes", None):
        return meta
    node, _ = class_count_key(cfg)
    return Metadata(name=name, thing_classes=[f"class {k}" for k in range(int(node.NUM_CLASSES))])


class _Inference:
    """A model of `arch` built from `cfg`, MODEL.WEIGHTS loaded strictly, in eval mode."""

    arch = None

    def __init__(self, cfg):
        if cfg.MODEL.META_ARCHITECTURE != self.arch:
            raise ValueError(f"{type(self).__name__} runs {self.arch}; the config builds "
                             f"{cfg.MODEL.META_ARCHITECTURE}")
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.model = build_model(self.cfg)
        load_inference_weights(self.model, self.cfg.MODEL.WEIGHTS)
        self.model.eval()
        self.metadata = model_metadata(self.cfg)
        self.input_format = self.cfg.INPUT.FORMAT

    def _check(self, image):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 image in {self.input_format} order "
                             f"(cpr_d2.data.image_io.read_image reads one), got "
                             f"{image.dtype} of shape {image.shape}")
        return image

    def _resize(self, image):
        """detectron2's test-time resize (INPUT.MIN_SIZE_TEST; 0: none)."""
        min_size = self.cfg.INPUT.MIN_SIZE_TEST
        if not min_size or (isinstance(min_size, (tuple, list)) and not any(min_size)):
            return T.NoOpTransform()
        return T.ResizeShortestEdge(min_size, self.cfg.INPUT.MAX_SIZE_TEST,
                                    "choice").get_transform(image)

    def _input(self, image, transform=None):
        height, width = image.shape[:2]
        transform = transform or self._resize(image)
        resized = transform.apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}


class PointPredictor(_Inference):
    """A P2PNet built from `cfg` with cfg.MODEL.WEIGHTS loaded strictly (every weight must
    come from the file, cpr_d2.engine.checkpoint.load_inference_weights), in eval mode.

    Attributes:
        model: the network. metadata: its class names (model_metadata).
        category_ids: the dataset's category id of each of the model's classes (from
            the checkpoint's class list; 1, 2, ... for a checkpoint without one).
        input_format: cfg.INPUT.FORMAT, the channel order the images must have.
        count_threshold: the counting threshold the model chose on its training data
            (MODEL.P2PNET.COUNT_CALIBRATION), or None.
        soft_count: the soft count's (scale, per_pixel), fitted on the training data
            (MODEL.P2PNET.COUNT_RULE "soft"), or None; :meth:`count` applies it.
    """

    arch = "P2PNet"

    def __init__(self, cfg):
        super().__init__(cfg)
        trained = checkpoint_classes(self.cfg.MODEL.WEIGHTS)
        self.category_ids = (list(trained.category_ids) if trained is not None else
                             list(range(1, len(self.metadata.thing_classes) + 1)))
        threshold = float(getattr(self.model, "count_threshold", torch.tensor(-1.0)))
        self.count_threshold = threshold if threshold >= 0 else None
        self.soft_count = self.model.soft_coefficients()

    def count(self, instances):
        """The soft count of an image's predicted `instances` (of __call__: the image in
        one pass), or None when the model has no soft count. It was fitted on whole
        training images: for an image much larger than those, count tiles of their
        size and sum (docs/p2pnet.md, "What the soft count is fitted to")."""
        return self.model.soft_count_of(instances)

    @torch.no_grad()
    def _predict(self, images):
        outputs = self.model([self._input(image) for image in images])
        return [out["instances"].to("cpu") for out in outputs]

    def __call__(self, image):
        """Instances (on the CPU) of one H x W x 3 uint8 image in `input_format`:
        pred_points (x, y in the image's pixels), scores, pred_classes. The image is
        resized as at test time (INPUT.MIN_SIZE_TEST; 0: as it is)."""
        return self._predict([self._check(image)])[0]

    def predict_large(self, image, tile=DEFAULT_TILE, overlap=None, batch_size=1,
                      progress=None):
        """Instances of an image of any size, predicted in overlapping tiles of at most
        `tile` pixels a side (the module docstring says how points are kept); the image
        itself when it fits in one tile. `batch_size` tiles go through the network at
        once; `progress` (default: when there are more than 4 tiles) shows a bar."""
        image = self._check(image)
        height, width = image.shape[:2]
        tiles = tile_grid(height, width, tile, overlap)
        if len(tiles) == 1:
            return self(image)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        show = len(tiles) > 4 if progress is None else progress
        points, scores, classes, full = [], [], [], 0
        with tqdm(total=len(tiles), desc=f"{width}x{height} px in {len(tiles)} tiles",
                  unit="tile", disable=not show) as bar:
            for start in range(0, len(tiles), batch_size):
                batch = tiles[start:start + batch_size]
                crops = [np.ascontiguousarray(image[t.y0:t.y1, t.x0:t.x1]) for t in batch]
                for t, inst in zip(batch, self._predict(crops)):
                    full += len(inst) >= self.model.detections_per_image
                    p = inst.pred_points.reshape(-1, 2) + inst.pred_points.new_tensor([t.x0, t.y0])
                    keep = (_in_core(p[:, 0], t.cx0, t.cx1, t.x1 == width)
                            & _in_core(p[:, 1], t.cy0, t.cy1, t.y1 == height))
                    points.append(p[keep])
                    scores.append(inst.scores[keep])
                    classes.append(inst.pred_classes[keep])
                del crops
                bar.update(len(batch))
        if full:
            logger.warning("%d of %d tiles returned MODEL.P2PNET.DETECTIONS_PER_IMAGE = %d points "
                           "(the most a pass keeps): objects may be missing there; raise it or "
                           "use smaller tiles", full, len(tiles), self.model.detections_per_image)
        merged = Instances((height, width))
        merged.pred_points = torch.cat(points)
        merged.scores = torch.cat(scores)
        merged.pred_classes = torch.cat(classes)
        kept = point_nms(merged.pred_points, merged.scores, merged.pred_classes,
                         self.model.nms_box_size, self.model.nms_thresh)
        return merged[kept]


class PointRefiner(_Inference):
    """A CPRNet built from `cfg` with cfg.MODEL.WEIGHTS loaded strictly, in eval mode:
    `refiner(image, points, classes)` refines the annotated points of one image.

        refiner = PointRefiner(cfg)
        inst = refiner(image_bgr, [[120.5, 80.0], [300.0, 42.5]], classes=[0, 0])
        inst.pred_points, inst.coarse_points, inst.scores, inst.refined
    """

    arch = "CPRNet"

    @torch.no_grad()
    def __call__(self, image, points, classes=None):
        """Instances (on the CPU), one row per point that lies on the image, in the order
        given: pred_points (the refined points, in the image's pixels), coarse_points
        (the points given), scores, pred_classes, refined (False where a point stayed)
        and gt_ann_index (the position in `points`). `classes`: the model's class index
        of each point (0 for all when omitted)."""
        image = self._check(image)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        classes = np.zeros(len(points), np.int64) if classes is None else \
            np.asarray(classes, dtype=np.int64).reshape(-1)
        if len(classes) != len(points):
            raise ValueError(f"{len(points)} points but {len(classes)} classes")
        names = self.metadata.thing_classes
        if len(classes) and not 0 <= classes.min() <= classes.max() < len(names):
            raise ValueError(f"classes must be the model's class indices, 0 to "
                             f"{len(names) - 1} ({', '.join(names)})")
        transform = self._resize(image)
        inputs = self._input(image, transform)
        annotations = [{"point": p.tolist(), "category_id": int(c)}
                       for p, c in zip(points, classes)]
        inputs["instances"] = annotations_to_point_instances(
            annotations, T.TransformList([transform]), tuple(inputs["image"].shape[1:]))
        return self.model([inputs])[0]["instances"].to("cpu")
