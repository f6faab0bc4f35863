"""Exporting a trained P2PNet for use without detectron2 (TorchScript, ONNX).

The exported graph is the network up to its raw outputs: it normalises a
float32 (N, 3, H, W) image (H, W multiples of the backbone's size divisibility,
channels in INPUT.FORMAT) and returns the class logits (N, A * L, h, w) and the
point offsets (N, A * 2, h, w) of every feature-map cell. Turning them into
points (anchors, scores, threshold, top-k, class-wise NMS) is
``p2p_decode.py``: numpy only, shipped beside the model, with the decoding
parameters in ``p2pnet.json``. Decoded, the exported model's points equal the
eager model's (tests/export/test_export.py).
"""
import contextlib
import json
import logging
import os
import shutil
import warnings

import torch
from torch import nn

from cpr_d2.utils.io import atomic_path, write_text_atomic

__all__ = ["EXPORT_FORMATS", "P2PNetRaw", "decode_params", "export_p2pnet"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "p2pnet.ts", "onnx": "p2pnet.onnx"}
DECODER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "p2p_decode.py")


class P2PNetRaw(nn.Module):
    """A P2PNet's backbone and head on an unnormalised image: (logits, offsets) maps."""

    def __init__(self, model):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.in_feature = model.in_feature
        self.register_buffer("pixel_mean", model.pixel_mean.clone(), False)
        self.register_buffer("pixel_std", model.pixel_std.clone(), False)

    def forward(self, image):
        features = self.backbone((image - self.pixel_mean) / self.pixel_std)[self.in_feature]
        head = self.head
        return head.cls_logits(head.cls_tower(features)), head.offsets(head.reg_tower(features))


def decode_params(cfg, model, classes=None):
    """The json-able parameters p2p_decode.py needs (and the class names and ids)."""
    names = classes.names if classes is not None else [
        f"class {k}" for k in range(model.num_classes)]
    ids = classes.category_ids if classes is not None else list(range(1, model.num_classes + 1))
    min_size = cfg.INPUT.MIN_SIZE_TEST
    min_size = max(min_size) if isinstance(min_size, (tuple, list)) else min_size
    threshold = float(model.count_threshold)
    soft = model.soft_coefficients()
    return {
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": [float(v) for v in model.pixel_mean.reshape(-1)],
        "size_divisibility": int(model.backbone.size_divisibility),
        "min_size_test": int(min_size or 0),
        "stride": float(model.stride),
        "anchor_rows": int(model.anchor_rows),
        "anchor_cols": int(model.anchor_cols),
        "num_classes": int(model.num_classes),
        "class_loss": model.class_loss,
        "score_thresh": float(model.score_thresh),
        "topk_candidates": int(model.topk_candidates),
        "nms_box_size": float(model.nms_box_size),
        "nms_thresh": float(model.nms_thresh),
        "detections_per_image": int(model.detections_per_image),
        "vote_radius": float(model.vote_radius),
        "test_flips": list(model.test_flips),
        "count_threshold": threshold if threshold >= 0 else None,
        "count_soft": list(soft) if soft is not None else None,
        "classes": [{"index": k, "id": int(i), "name": n}
                    for k, (n, i) in enumerate(zip(names, ids))],
    }


def export_p2pnet(predictor, output_dir, formats=EXPORT_FORMATS, example=None):
    """Write `predictor`'s model (a cpr_d2.engine.predictor.PointPredictor) to output_dir:
    p2pnet.ts and/or p2pnet.onnx, p2pnet.json (decode_params) and p2p_decode.py. Each
    file is written atomically. `example`: an (1, 3, H, W) float tensor to trace with
    (default: zeros of 256 x 256; any size works afterwards). Returns the paths written."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"export formats must be among {EXPORT_FORMATS}, got {list(formats)}")
    model = predictor.model
    raw = P2PNetRaw(model).eval()
    d = int(model.backbone.size_divisibility) or 1
    if example is None:
        example = torch.zeros(1, 3, -(-256 // d) * d, -(-256 // d) * d)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    with torch.no_grad(), _quiet():
        if "torchscript" in formats:
            traced = torch.jit.trace(raw, example)
            path = os.path.join(output_dir, FILES["torchscript"])
            with atomic_path(path) as tmp:
                traced.save(tmp)
            written.append(path)
        if "onnx" in formats:
            path = os.path.join(output_dir, FILES["onnx"])
            with atomic_path(path) as tmp:
                torch.onnx.export(raw, (example,), tmp, input_names=["image"],
                                  output_names=["logits", "offsets"],
                                  dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                                "logits": {0: "batch", 2: "h", 3: "w"},
                                                "offsets": {0: "batch", 2: "h", 3: "w"}},
                                  opset_version=17, dynamo=False)
            written.append(path)
    params = decode_params(predictor.cfg, model, _classes(predictor))
    path = os.path.join(output_dir, "p2pnet.json")
    write_text_atomic(json.dumps(params, indent=2) + "\n", path)
    written.append(path)
    path = os.path.join(output_dir, "p2p_decode.py")
    with atomic_path(path) as tmp:
        shutil.copyfile(DECODER, tmp)
    written.append(path)
    for p in written:
        logger.info("wrote %s", p)
    return written


@contextlib.contextmanager
def _quiet():
    """Without the tracer's notes on the branches it froze (empty inputs, training mode,
    GroupNorm's batch check: constants at inference) and torch's deprecation notices
    for TorchScript and its ONNX exporter, which the export relies on deliberately."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        yield


def _classes(predictor):
    from cpr_d2.data.classes import ClassList

    return ClassList(list(predictor.metadata.thing_classes), list(predictor.category_ids))
