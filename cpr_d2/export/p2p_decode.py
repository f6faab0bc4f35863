"""Run an exported P2PNet with numpy alone: prepare an image, decode the network's raw
outputs into points, scores and classes, exactly as P2PNet.inference does.

This file ships beside every exported model (tools/export_model.py) and imports
numpy only. With the model's ``p2pnet.json`` and onnxruntime::

    import json, numpy as np, onnxruntime as ort
    import p2p_decode

    params = json.load(open("export/p2pnet.json"))
    session = ort.InferenceSession("export/p2pnet.onnx", providers=["CPUExecutionProvider"])
    batch, size = p2p_decode.prepare(image_bgr, params)      # H x W x 3 uint8
    logits, offsets = session.run(None, {"image": batch})
    points, scores, classes = p2p_decode.decode(logits[0], offsets[0], size, params)

A model that predicts with test-time flips (``params["test_flips"]``, from
MODEL.P2PNET.TEST_FLIPS) runs once per view and fuses the views::

    views = p2p_decode.prepare_views(image_bgr, params)    # [(batch, size)], one per view
    outputs = [session.run(None, {"image": batch}) for batch, _ in views]
    points, scores, classes = p2p_decode.decode_views(
        [(logits[0], offsets[0]) for logits, offsets in outputs], views[0][1], params)

(with no flips, ``decode_views`` of the one view equals ``decode``).

A model that counts with the soft count (MODEL.P2PNET.COUNT_RULE "soft") has its two
coefficients in ``params["count_soft"]``; ``count(scores, image.shape[:2], params)``
gives the image's count as the model does (None without them: count the scores above
``params["count_threshold"]``).

``points`` (N, 2) are x, y in the image's pixels, ``scores`` (N,) and ``classes``
(N,) the model's class indices (``params["classes"]`` has their names and dataset
ids), by decreasing score. The network takes a float32 (1, 3, H, W) image whose
H and W are multiples of ``params["size_divisibility"]``, in the channel order
``params["input_format"]``; it returns the class logits (1, A * L, h, w) and the
point offsets (1, A * 2, h, w) of every cell of its stride-``params["stride"]``
feature map (A anchor points per cell, L logits per anchor).
"""
import numpy as np

__all__ = ["anchor_points", "count", "decode", "decode_views", "fuse_views", "nms",
           "prepare", "prepare_views", "vote"]

# Axes of an H x W x 3 image that each flip reverses (cpr_d2.modeling.postprocess.FLIPS).
_FLIP_AXES = {"none": (), "horizontal": (1,), "vertical": (0,), "both": (0, 1)}


def prepare(image, params):
    """(batch, (height, width)): the H x W x 3 uint8 image (channels in
    params["input_format"]) as the network's float32 (1, 3, H', W') input, padded at the
    right and bottom to multiples of params["size_divisibility"] with the pixel mean
    (what detectron2's padding of the normalised image amounts to)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} of shape "
                         f"{image.shape}")
    if params.get("min_size_test"):
        raise ValueError(f"the model was tested on images resized to a short side of "
                         f"{params['min_size_test']} px (INPUT.MIN_SIZE_TEST): resize the image "
                         "so before, or export with INPUT.MIN_SIZE_TEST 0")
    height, width = image.shape[:2]
    d = int(params["size_divisibility"]) or 1
    padded_h, padded_w = -(-height // d) * d, -(-width // d) * d
    mean = np.asarray(params["pixel_mean"], np.float32).reshape(3, 1, 1)
    batch = np.empty((1, 3, padded_h, padded_w), np.float32)
    batch[0] = mean
    batch[0, :, :height, :width] = image.transpose(2, 0, 1)
    return batch, (height, width)


def anchor_points(height, width, stride, rows=1, cols=1):
    """(height * width * rows * cols, 2) float32 anchor points, cell by cell (row-major),
    then anchor by anchor within the cell (cpr_d2.modeling.p2pnet.anchor_points)."""
    f32 = np.float32
    ys = (np.arange(height, dtype=f32) + f32(0.5)) * f32(stride)
    xs = (np.arange(width, dtype=f32) + f32(0.5)) * f32(stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    centres = np.stack([xx.reshape(-1), yy.reshape(-1)], axis=1)
    oy = ((np.arange(rows, dtype=f32) + f32(0.5)) / f32(rows) - f32(0.5)) * f32(stride)
    ox = ((np.arange(cols, dtype=f32) + f32(0.5)) / f32(cols) - f32(0.5)) * f32(stride)
    oyy, oxx = np.meshgrid(oy, ox, indexing="ij")
    offsets = np.stack([oxx.reshape(-1), oyy.reshape(-1)], axis=1)
    return (centres[:, None, :] + offsets[None]).reshape(-1, 2).astype(f32)


def nms(points, scores, classes, box_size, iou_threshold):
    """Indices kept by class-wise NMS on box_size x box_size boxes centred on the points
    (a box goes when its IoU with a kept, higher-scoring box of its class exceeds
    iou_threshold), by decreasing score; box_size <= 0 keeps all."""
    order = np.argsort(-scores, kind="stable")
    if box_size <= 0 or len(points) == 0:
        return order
    half = np.float32(0.5 * box_size)
    x0, y0 = points[:, 0] - half, points[:, 1] - half
    x1, y1 = points[:, 0] + half, points[:, 1] + half
    area = (x1 - x0) * (y1 - y0)
    suppressed = np.zeros(len(points), bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        w = np.clip(np.minimum(x1[i], x1) - np.maximum(x0[i], x0), 0, None)
        h = np.clip(np.minimum(y1[i], y1) - np.maximum(y0[i], y0), 0, None)
        inter = w * h
        iou = inter / (area[i] + area - inter)
        suppressed |= (iou > iou_threshold) & (classes == classes[i])
    return np.asarray(keep, dtype=np.int64)


def vote(points, scores, classes, kept, radius):
    """The points of the `kept` candidates, each moved to the score-weighted mean of the
    candidates of its class (itself included) within `radius` pixels of it; radius <= 0
    returns points[kept] (cpr_d2.modeling.p2pnet.point_vote)."""
    if radius <= 0 or len(kept) == 0:
        return points[kept]
    chosen = points[kept].astype(np.float64)
    all_points = points.astype(np.float64)
    distance = np.sqrt(((chosen[:, None, :] - all_points[None, :, :]) ** 2).sum(axis=2))
    near = (distance <= float(radius)) & (classes[kept][:, None] == classes[None, :])
    weight = scores.astype(np.float64)[None, :] * near
    mean = weight @ all_points / weight.sum(axis=1, keepdims=True)
    return mean.astype(points.dtype)


def decode(logits, offsets, size, params, out_size=None):
    """(points, scores, classes) of one image from the network's raw outputs for it
    (logits (A * L, h, w), offsets (A * 2, h, w)); `size` is the (height, width) prepare
    returned, `out_size` the size to give the points in (default: `size`)."""
    f32 = np.float32
    num_classes = int(params["num_classes"])
    anchors_per_cell = int(params["anchor_rows"]) * int(params["anchor_cols"])
    stride = f32(params["stride"])
    h, w = logits.shape[1:]
    logits = logits.astype(f32).transpose(1, 2, 0).reshape(h * w * anchors_per_cell, -1)
    offsets = offsets.astype(f32).transpose(1, 2, 0).reshape(h * w * anchors_per_cell, 2)
    anchors = anchor_points(h, w, stride, params["anchor_rows"], params["anchor_cols"])
    pred_points = anchors + stride * offsets
    if params["class_loss"] == "focal":
        scores = (f32(1) / (f32(1) + np.exp(-logits))).astype(f32)
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = (e / e.sum(axis=1, keepdims=True))[:, :-1].astype(f32)
    height, width = size
    inside = (anchors[:, 0] < width) & (anchors[:, 1] < height)
    scores = scores[inside].reshape(-1)
    points = pred_points[inside]
    keep = np.nonzero(scores > f32(params["score_thresh"]))[0]
    scores = scores[keep]
    if len(scores) > int(params["topk_candidates"]):
        top = np.argsort(-scores, kind="stable")[: int(params["topk_candidates"])]
        scores, keep = scores[top], keep[top]
    classes = keep % num_classes
    points = points[keep // num_classes]
    out_h, out_w = out_size or size
    points = points * np.asarray([out_w / width, out_h / height], f32)
    points[:, 0] = np.clip(points[:, 0], 0, out_w)
    points[:, 1] = np.clip(points[:, 1], 0, out_h)
    kept = nms(points, scores, classes, params["nms_box_size"], params["nms_thresh"])
    kept = kept[: int(params["detections_per_image"])]
    # Exports written before VOTE_RADIUS existed have no "vote_radius": no vote.
    voted = vote(points, scores, classes, kept, float(params.get("vote_radius", 0.0)))
    return voted, scores[kept], classes[kept]


def _flips(params):
    # Exports written before TEST_FLIPS existed have no "test_flips": one view.
    return ("none",) + tuple(params.get("test_flips") or ())


def prepare_views(image, params):
    """[(batch, (height, width))] of prepare for the image and for each of its flips in
    params["test_flips"], in that order (one entry without flips)."""
    image = np.asarray(image)
    return [prepare(np.flip(image, _FLIP_AXES[flip]), params) for flip in _flips(params)]


def fuse_views(points, scores, classes, views, num_views, box_size, iou_threshold,
               max_points):
    """One set of points out of the points several views kept, mapped back to the image
    (cpr_d2.modeling.p2pnet.fuse_views): the points nms keeps over all views lead groups,
    every point joins the nearest leader of its class (Chebyshev distance); a group
    scores the mean over the views of each view's best score in it (0 where a view has
    none) and lies at the score-weighted mean of its points. By decreasing score, at
    most max_points."""
    leaders = nms(points, scores, classes, box_size, iou_threshold)
    if len(leaders) == 0:
        return points[:0], scores[:0], classes[:0]
    distance = np.abs(points[:, None, :] - points[leaders][None]).max(axis=2)
    distance[classes[:, None] != classes[leaders][None]] = np.inf
    group = np.argmin(distance, axis=1)
    best = np.zeros((len(leaders), num_views), scores.dtype)
    np.maximum.at(best, (group, views), scores)
    fused_scores = (best.sum(axis=1) / np.float32(num_views)).astype(scores.dtype)
    weight = scores.astype(np.float64)
    total = np.bincount(group, weight, minlength=len(leaders))
    mean = np.stack([np.bincount(group, weight * points[:, k].astype(np.float64),
                                 minlength=len(leaders)) for k in (0, 1)], axis=1)
    fused_points = (mean / total[:, None]).astype(points.dtype)
    order = np.argsort(-fused_scores, kind="stable")[:max_points]
    return fused_points[order], fused_scores[order], classes[leaders][order]


def decode_views(outputs, size, params, out_size=None):
    """(points, scores, classes) of one image from the raw outputs of its views
    (`outputs`: [(logits, offsets)] in prepare_views' order): each view decoded, its
    points flipped back, then fuse_views; one view is decode itself."""
    flips = _flips(params)
    if len(outputs) != len(flips):
        raise ValueError(f"expected the outputs of {len(flips)} views ({', '.join(flips)}: "
                         f"prepare_views), got {len(outputs)}")
    if len(flips) == 1:
        return decode(outputs[0][0], outputs[0][1], size, params, out_size)
    out_h, out_w = out_size or size
    parts = []
    for k, (flip, (logits, offsets)) in enumerate(zip(flips, outputs)):
        points, scores, classes = decode(logits, offsets, size, params, out_size)
        points = points.copy()
        if flip in ("horizontal", "both"):
            points[:, 0] = np.float32(out_w) - points[:, 0]
        if flip in ("vertical", "both"):
            points[:, 1] = np.float32(out_h) - points[:, 1]
        parts.append((points, scores, classes, np.full(len(points), k, np.int64)))
    points, scores, classes, views = (np.concatenate(x) for x in zip(*parts))
    return fuse_views(points, scores, classes, views, len(flips), params["nms_box_size"],
                      params["nms_thresh"], int(params["detections_per_image"]))


def count(scores, size, params):
    """The soft count of an image from its decoded `scores` and its (height, width):
    round(scale * sum(scores) + per_pixel * height * width), at least 0, as the model
    counts (cpr_d2.modeling.postprocess.soft_count); None when the model has no soft
    count (params["count_soft"] missing or null)."""
    coefficients = params.get("count_soft")
    if not coefficients:
        return None
    scale, per_pixel = coefficients
    value = scale * float(np.sum(scores, dtype=np.float64)) + per_pixel * float(size[0]) * float(size[1])
    return int(max(0.0, np.round(value)))
