"""P2PNet: a point localizer as a detectron2 meta-architecture.

Every anchor point (ANCHOR_ROWS x ANCHOR_COLS per cell of one feature level)
predicts class scores and an offset; predicted point = anchor + stride *
offset. Training matches predictions to ground-truth points per image
(PointMatcher); inference keeps the best-scoring points and suppresses
duplicates with a class-wise NMS on small pseudo boxes (docs/method.md, "P2PNet").

Two variants, chosen by MODEL.P2PNET.CLASS_LOSS: "focal" (the CPR paper's
multi-class localizer: sigmoid focal loss, SmoothL1 points, focal matching
cost) and "softmax" (the original crowd-counting P2PNet: object-vs-background
softmax, cross-entropy with a background weight, L2 points).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import batched_nms, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Instances
from detectron2.utils import comm
from fvcore.nn import sigmoid_focal_loss

from cpr_d2.data.classes import require_num_classes

from .backbone import normalized_images, single_level_feature_name
from .p2p_matcher import PointMatcher
from .postprocess import (COUNT_RULES, check_flips, flip_points, flipped_image_input,
                          original_size_and_scale, rescale_points, soft_count)

__all__ = ["P2PHead", "P2PNet", "anchor_points", "fuse_views", "point_nms", "point_vote",
           "nms_and_vote"]

CLASS_LOSSES = ("focal", "softmax")
POINT_LOSSES = ("smooth_l1", "l2")


def point_quality(pred_points, gt_points, stride):
    """The class target of a matched prediction under MODEL.P2PNET.QUALITY_TARGET:
    exp(-d^2 / (2 stride^2)), d the distance (px) of its predicted point to its ground
    truth's (1 on it, 0.61 one stride away, 0.14 two strides away); no gradient."""
    d2 = ((pred_points.detach() - gt_points) ** 2).sum(dim=-1)
    return torch.exp(-0.5 * d2 / float(stride) ** 2)


def quality_focal_loss(logits, targets, positive, alpha, gamma):
    """Summed focal loss with soft targets: ``w * BCE(logit, y) * |y - sigmoid(logit)| **
    gamma``, ``w`` = alpha where `positive` (the matched predictions' class entries),
    1 - alpha elsewhere. With targets of 1 where positive and 0 elsewhere it is the
    sigmoid focal loss (fvcore's) exactly; a soft target y < 1 is what the score should
    be, and the loss vanishes there (the quality focal loss of Generalized Focal Loss,
    with the focal loss's class balance)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weight = torch.where(positive, alpha, 1.0 - alpha) if alpha >= 0 else 1.0
    return (weight * ce * (targets - p).abs() ** gamma).sum()


def anchor_offsets(rows, cols, stride):
    """(rows * cols, 2) offsets (x, y) of the anchor points from a cell's centre, row-major:
    ((k + 0.5) / n - 0.5) * stride along each axis."""
    ys = ((torch.arange(rows, dtype=torch.float32) + 0.5) / rows - 0.5) * stride
    xs = ((torch.arange(cols, dtype=torch.float32) + 0.5) / cols - 0.5) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def anchor_points(height, width, stride, rows=1, cols=1, device=None):
    """(height * width * rows * cols, 2) anchor points of a feature map, ordered by cell
    (row-major) then by anchor within the cell; cell (i, j) is centred at
    ((j + 0.5) * stride, (i + 0.5) * stride)."""
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    offsets = anchor_offsets(rows, cols, stride).to(device)
    return (centres[:, None, :] + offsets[None]).reshape(-1, 2)


def point_nms(points, scores, classes, box_size, iou_threshold):
    """Class-wise NMS on box_size x box_size boxes centred on the points; returns the kept
    indices by decreasing score. box_size <= 0 keeps everything (sorted by score)."""
    if box_size <= 0 or len(points) == 0:
        return scores.argsort(descending=True)
    half = 0.5 * float(box_size)
    boxes = torch.cat([points - half, points + half], dim=1)
    return batched_nms(boxes.float(), scores.float(), classes, iou_threshold)


def point_vote(points, scores, classes, kept, radius):
    """The points of the `kept` candidates, each moved to the score-weighted mean of the
    candidates of its class (itself included, suppressed ones too) within `radius`
    pixels of it. Neighbouring anchor points predict the same object, each with its own
    regression error; their mean is a steadier estimate. radius <= 0: points[kept]."""
    if radius <= 0 or len(kept) == 0:
        return points[kept]
    chosen = points[kept]
    near = torch.cdist(chosen.double(), points.double()) <= float(radius)
    near &= classes[kept][:, None] == classes[None, :]
    weight = scores.double()[None, :] * near
    mean = weight @ points.double() / weight.sum(dim=1, keepdim=True)
    return mean.to(points.dtype)


def nms_and_vote(points, scores, classes, box_size, iou_threshold, max_points, vote_radius):
    """(kept, their points): the indices point_nms keeps, by decreasing score, at most
    `max_points` of them, and their points after point_vote with `vote_radius` (the
    post-processing of P2PNet.inference)."""
    kept = point_nms(points, scores, classes, box_size, iou_threshold)[:max_points]
    return kept, point_vote(points, scores, classes, kept, vote_radius)


def fuse_views(points, scores, classes, views, num_views, box_size, iou_threshold,
               max_points):
    """One set of points out of the points that several views of an image kept (each
    view's own NMS and vote done, its points mapped back to the image): (points, scores,
    classes), by decreasing score, at most `max_points`.

    The points that point_nms keeps over all views together lead the groups; every point
    joins the nearest leader of its class (Chebyshev distance, the metric of the NMS
    boxes). A group's score is the mean over the `num_views` views of the view's best
    score in the group (0 for a view without a point there), so an object that only one
    view finds scores lower than one they all find; its point is the score-weighted
    mean of the group's points. `views` (N,) says which view kept each point."""
    leaders = point_nms(points, scores, classes, box_size, iou_threshold)
    if len(leaders) == 0:
        return points[:0], scores[:0], classes[:0]
    distance = (points[:, None, :] - points[leaders][None]).abs().amax(dim=2)
    distance[classes[:, None] != classes[leaders][None]] = float("inf")
    group = distance.argmin(dim=1)
    best = scores.new_zeros(len(leaders) * num_views)
    best.scatter_reduce_(0, group * num_views + views, scores, reduce="amax")
    fused_scores = best.view(len(leaders), num_views).sum(dim=1) / num_views
    weight = scores.double()
    total = weight.new_zeros(len(leaders)).index_add_(0, group, weight)
    mean = weight.new_zeros(len(leaders), 2).index_add_(0, group, points.double() * weight[:, None])
    fused_points = (mean / total[:, None]).to(points.dtype)
    order = fused_scores.argsort(descending=True)[:max_points]
    return fused_points[order], fused_scores[order], classes[leaders][order]


def _tower(in_channels, channels, num_convs):
    layers = []
    for k in range(num_convs):
        layers += [nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1),
                   get_norm("GN", channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class P2PHead(nn.Module):
    """Classification and regression towers (num_convs x (3x3 conv, GN(32), ReLU) each),
    then 3x3 outputs: K * num_logits class logits and K * 2 offsets per cell."""

    def __init__(self, in_channels, num_logits, num_anchors, num_convs=4, conv_channels=256,
                 prior_prob=None):
        super().__init__()
        self.cls_tower = _tower(in_channels, conv_channels, num_convs)
        self.reg_tower = _tower(in_channels, conv_channels, num_convs)
        out_channels = conv_channels if num_convs else in_channels
        self.cls_logits = nn.Conv2d(out_channels, num_anchors * num_logits, 3, padding=1)
        self.offsets = nn.Conv2d(out_channels, num_anchors * 2, 3, padding=1)
        self.num_logits = num_logits
        self.num_anchors = num_anchors
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)
        if prior_prob is not None:
            nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features):
        """(B, C, H, W) -> logits (B, H*W*K, num_logits), offsets (B, H*W*K, 2)."""
        b = features.shape[0]
        logits = self.cls_logits(self.cls_tower(features))
        offsets = self.offsets(self.reg_tower(features))
        logits = logits.permute(0, 2, 3, 1).reshape(b, -1, self.num_logits)
        offsets = offsets.permute(0, 2, 3, 1).reshape(b, -1, 2)
        return logits, offsets


@META_ARCH_REGISTRY.register()
class P2PNet(nn.Module):
    """
    Training input: dicts with "image" and "instances" (gt_points, gt_classes), as
    made by PointDatasetMapper. Training output: {"loss_p2p_cls", "loss_p2p_point"}.

    Inference output, for every input image: {"instances": Instances with
    pred_points (N, 2), scores (N,) and pred_classes (N,)} in the pixels of the
    image's original "height" x "width"; with a counting threshold calibrated on the
    training images (MODEL.P2PNET.COUNT_CALIBRATION), also "count_threshold" and
    "count", the number of points scoring above it.
    """

    @configurable
    def __init__(self, *, backbone, head, in_feature, stride, num_classes, anchor_rows=1,
                 anchor_cols=1, class_loss="focal", focal_alpha=0.25, focal_gamma=2.0,
                 background_weight=0.5, class_weight=1.0, point_loss="smooth_l1",
                 smooth_l1_beta=1.0 / 9, point_weight=0.5, matcher, score_thresh=0.05,
                 topk_candidates=1000, nms_box_size=32.0, nms_thresh=0.01,
                 detections_per_image=100, vote_radius=0.0, test_flips=(),
                 count_rule="threshold", quality_target=False, pixel_mean, pixel_std):
        super().__init__()
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"MODEL.P2PNET.CLASS_LOSS must be one of {CLASS_LOSSES}, got "
                             f"{class_loss!r}")
        if point_loss not in POINT_LOSSES:
            raise ValueError(f"MODEL.P2PNET.POINT_LOSS must be one of {POINT_LOSSES}, got "
                             f"{point_loss!r}")
        if not float(vote_radius) >= 0:  # NaN too
            raise ValueError(f"MODEL.P2PNET.VOTE_RADIUS must be >= 0 (pixels; 0 = no vote), "
                             f"got {vote_radius!r}")
        self.backbone = backbone
        self.head = head
        self.in_feature = in_feature
        self.stride = float(stride)
        self.num_classes = num_classes
        self.anchor_rows, self.anchor_cols = anchor_rows, anchor_cols
        self.class_loss = class_loss
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        if quality_target and class_loss != "focal":
            raise ValueError("MODEL.P2PNET.QUALITY_TARGET needs MODEL.P2PNET.CLASS_LOSS "
                             f"\"focal\", got {class_loss!r}; set QUALITY_TARGET False")
        self.quality_target = bool(quality_target)
        self.background_weight = background_weight
        self.class_weight = class_weight
        self.point_loss = point_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.point_weight = point_weight
        self.matcher = matcher
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_box_size = nms_box_size
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.vote_radius = float(vote_radius)
        self.test_flips = check_flips(test_flips, "MODEL.P2PNET.TEST_FLIPS")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # The counting threshold chosen on the training images (cpr_d2.engine.
        # count_calibration); negative = none, count with TEST.POINT_AP.COUNT_SCORE_THRESH.
        self.register_buffer("count_threshold", torch.tensor(-1.0))
        # MODEL.P2PNET.COUNT_RULE "soft": count = round(scale * sum of the kept scores +
        # per_pixel * image area), (scale, per_pixel) fitted with the threshold; a scale
        # <= 0 = none (the fit never gives one).
        if count_rule not in COUNT_RULES:
            raise ValueError(f"MODEL.P2PNET.COUNT_RULE must be one of {COUNT_RULES}, got "
                             f"{count_rule!r}")
        self.count_rule = count_rule
        self.register_buffer("count_soft", torch.tensor([-1.0, 0.0]))

    @classmethod
    def from_config(cls, cfg):
        require_num_classes(cfg)
        backbone = build_backbone(cfg)
        in_feature = single_level_feature_name(cfg)
        shape = backbone.output_shape()[in_feature]
        c = cfg.MODEL.P2PNET
        softmax = c.CLASS_LOSS == "softmax"
        m = c.MATCHER
        return {
            "backbone": backbone,
            "head": P2PHead(shape.channels, c.NUM_CLASSES + int(softmax),
                            c.ANCHOR_ROWS * c.ANCHOR_COLS, c.NUM_CONVS, c.CONV_CHANNELS,
                            None if softmax else c.PRIOR_PROB),
            "in_feature": in_feature,
            "stride": shape.stride,
            "num_classes": c.NUM_CLASSES,
            "anchor_rows": c.ANCHOR_ROWS,
            "anchor_cols": c.ANCHOR_COLS,
            "class_loss": c.CLASS_LOSS,
            "focal_alpha": c.FOCAL_ALPHA,
            "focal_gamma": c.FOCAL_GAMMA,
            "background_weight": c.BACKGROUND_WEIGHT,
            "class_weight": c.CLASS_WEIGHT,
            "point_loss": c.POINT_LOSS,
            "smooth_l1_beta": c.SMOOTH_L1_BETA,
            "point_weight": c.POINT_WEIGHT,
            "matcher": PointMatcher(m.CLASS_COST, m.CLASS_WEIGHT, m.POINT_WEIGHT, m.DISTANCE,
                                    m.TOPK, c.FOCAL_ALPHA, c.FOCAL_GAMMA, m.CANDIDATES),
            "score_thresh": c.SCORE_THRESH,
            "topk_candidates": c.TOPK_CANDIDATES,
            "nms_box_size": c.NMS_BOX_SIZE,
            "nms_thresh": c.NMS_THRESH,
            "detections_per_image": c.DETECTIONS_PER_IMAGE,
            "vote_radius": c.VOTE_RADIUS,
            "test_flips": c.TEST_FLIPS,
            "count_rule": c.COUNT_RULE,
            "quality_target": c.QUALITY_TARGET,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def _predict(self, batched_inputs):
        """(images, logits (B, A, num_logits), predicted points (B, A, 2), anchors (A, 2)),
        the points in the pixels of the network's input."""
        images = normalized_images(batched_inputs, self.pixel_mean, self.pixel_std,
                                   self.backbone.size_divisibility)
        features = self.backbone(images.tensor)[self.in_feature]
        logits, offsets = self.head(features)
        anchors = anchor_points(features.shape[2], features.shape[3], self.stride,
                                self.anchor_rows, self.anchor_cols, self.device)
        return images, logits, anchors[None] + self.stride * offsets, anchors

    def forward(self, batched_inputs):
        if not self.training and self.test_flips:
            return self._flip_fused(batched_inputs)
        images, logits, pred_points, anchors = self._predict(batched_inputs)
        if not self.training:
            return self.inference(logits, pred_points, anchors, batched_inputs,
                                  images.image_sizes)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("P2PNet training needs 'instances' (gt_points, gt_classes) in "
                             "every input; use PointDatasetMapper(cfg, is_train=True)")
        targets = [x["instances"].to(self.device) for x in batched_inputs]
        return self.losses(logits, pred_points, targets)

    def _check_classes(self, targets):
        for t in targets:
            if len(t) and int(t.gt_classes.max()) >= self.num_classes:
                raise ValueError(
                    f"an object has class {int(t.gt_classes.max())} but MODEL.P2PNET.NUM_CLASSES "
                    f"is {self.num_classes}; set it to the dataset's number of classes")

    def losses(self, logits, pred_points, targets):
        """Matching per image, then the class loss over every prediction and the point loss
        over the positives, both normalised by the number of positives (averaged over
        workers in distributed training, at least 1)."""
        self._check_classes(targets)
        num_pred = logits.shape[1]
        batch_rows, gt_rows = [], []
        offset = 0
        for b, t in enumerate(targets):
            pred_index, gt_index = self.matcher(logits[b].detach(), pred_points[b].detach(),
                                                t.gt_classes, t.gt_points)
            batch_rows.append(b * num_pred + pred_index)
            gt_rows.append(offset + gt_index)
            offset += len(t)
        pos = torch.cat(batch_rows)
        gt_pos = torch.cat(gt_rows)
        gt_points = torch.cat([t.gt_points for t in targets]).float()
        gt_classes = torch.cat([t.gt_classes for t in targets])

        num_pos = torch.tensor([float(len(pos))], device=self.device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num_pos)
            num_pos = num_pos / comm.get_world_size()
        normaliser = num_pos.clamp(min=1.0).item()

        flat_logits = logits.reshape(-1, logits.shape[-1])
        pred = pred_points.reshape(-1, 2)[pos]
        gt = gt_points[gt_pos]
        if self.class_loss == "focal":
            target = torch.zeros_like(flat_logits)
            entries = (pos, gt_classes[gt_pos])
            if self.quality_target:
                target[entries] = point_quality(pred, gt, self.stride)
                positive = torch.zeros_like(flat_logits, dtype=torch.bool)
                positive[entries] = True
                loss_cls = quality_focal_loss(flat_logits, target, positive, self.focal_alpha,
                                              self.focal_gamma) / normaliser
            else:
                target[entries] = 1.0
                loss_cls = sigmoid_focal_loss(flat_logits, target, self.focal_alpha,
                                              self.focal_gamma, reduction="sum") / normaliser
        else:
            target = torch.full((flat_logits.shape[0],), self.num_classes, dtype=torch.int64,
                                device=self.device)
            target[pos] = gt_classes[gt_pos]
            weight = flat_logits.new_ones(self.num_classes + 1)
            weight[-1] = self.background_weight
            loss_cls = F.cross_entropy(flat_logits, target, weight=weight)

        if self.point_loss == "smooth_l1":
            loss_point = F.smooth_l1_loss(pred / self.stride, gt / self.stride,
                                          beta=self.smooth_l1_beta, reduction="sum")
        else:
            loss_point = ((pred - gt) ** 2).sum()
        # Every parameter takes part even without positives (zero gradient).
        anchor = logits.sum() * 0 + pred_points.sum() * 0
        return {
            "loss_p2p_cls": self.class_weight * loss_cls + anchor,
            "loss_p2p_point": self.point_weight * loss_point / normaliser + anchor,
        }

    def _scores(self, logits):
        if self.class_loss == "focal":
            return logits.sigmoid()
        return logits.softmax(dim=-1)[..., :-1]

    @torch.no_grad()
    def _flip_fused(self, batched_inputs):
        """Inference on each input and on its MODEL.P2PNET.TEST_FLIPS, every view's kept
        points mapped back to the image and fused (fuse_views)."""
        views = []
        for flip in ("none",) + self.test_flips:
            inputs = [flipped_image_input(x, flip) for x in batched_inputs]
            images, logits, pred_points, anchors = self._predict(inputs)
            outs = self.inference(logits, pred_points, anchors, inputs, images.image_sizes)
            views.append([o["instances"] for o in outs])
            for inst in views[-1]:
                height, width = inst.image_size
                inst.pred_points = flip_points(inst.pred_points, width, height, flip)
        results = []
        for per_view in zip(*views):
            fused = Instances(per_view[0].image_size)
            fused.pred_points, fused.scores, fused.pred_classes = fuse_views(
                torch.cat([v.pred_points for v in per_view]),
                torch.cat([v.scores for v in per_view]),
                torch.cat([v.pred_classes for v in per_view]),
                torch.cat([torch.full((len(v),), k, dtype=torch.int64, device=self.device)
                           for k, v in enumerate(per_view)]),
                len(per_view), self.nms_box_size, self.nms_thresh, self.detections_per_image)
            results.append(self._result(fused))
        return results

    @torch.no_grad()
    def inference(self, logits, pred_points, anchors, batched_inputs, image_sizes):
        """The kept points, scores and classes (the class docstring) of the network's
        outputs for one view of each input: score threshold, top-k, NMS and vote, the
        points taken to the original image's pixels."""
        scores_all = self._scores(logits)
        results = []
        for b, (inp, (height, width)) in enumerate(zip(batched_inputs, image_sizes)):
            # Anchors in the batch padding belong to no image.
            inside = (anchors[:, 0] < width) & (anchors[:, 1] < height)
            scores = scores_all[b][inside].reshape(-1)
            points = pred_points[b][inside]
            keep = (scores > self.score_thresh).nonzero().squeeze(1)
            scores = scores[keep]
            if len(scores) > self.topk_candidates:
                scores, top = scores.topk(self.topk_candidates)
                keep = keep[top]
            classes = keep % self.num_classes
            points = points[keep // self.num_classes]
            out_size, scale = original_size_and_scale(inp, (height, width), points)
            points = rescale_points(points, scale, clip_size=out_size)
            kept, kept_points = nms_and_vote(points, scores, classes, self.nms_box_size,
                                             self.nms_thresh, self.detections_per_image,
                                             self.vote_radius)
            inst = Instances(out_size)
            inst.pred_points = kept_points
            inst.scores = scores[kept]
            inst.pred_classes = classes[kept]
            results.append(self._result(inst))
        return results

    def soft_coefficients(self):
        """(scale, per_pixel) of the soft count when COUNT_RULE is "soft" and they were
        fitted, else None."""
        scale, per_pixel = (float(v) for v in self.count_soft)
        if self.count_rule != "soft" or not scale > 0:
            return None
        return scale, per_pixel

    def soft_count_of(self, inst):
        """The soft count of one image's predicted Instances (its image_size the image's),
        or None when the model has no soft count (soft_coefficients)."""
        soft = self.soft_coefficients()
        if soft is None:
            return None
        height, width = inst.image_size
        return soft_count(float(inst.scores.sum()), float(height) * float(width), soft)

    def _result(self, inst):
        """{"instances": inst}, with the count if the model was calibrated: the points
        above the calibrated threshold, or the soft count (with "count_rule" "soft")."""
        result = {"instances": inst}
        threshold = float(self.count_threshold)
        if threshold >= 0:
            result["count_threshold"] = threshold
            result["count"] = int((inst.scores > threshold).sum())
            result["count_rule"] = "threshold"
        soft = self.soft_count_of(inst)
        if soft is not None:
            result["count"] = soft
            result["count_rule"] = "soft"
        return result
