"""CPRNet: coarse point refinement as a detectron2 meta-architecture.

Training reads, for every object, the head's outputs at the points of its
positive bag (rings around the annotated point) and at the negative cells,
through the compiled op; inference refines each annotated point (docs/method.md,
"CPRNet").

The head's two per-point linear outputs (class and instance logits) are
applied as 1x1 convolutions to the tower's output *before* sampling. Bilinear
sampling is linear and its weights sum to one, so this equals sampling the
tower's features and then applying the linear layers, while the op gathers
2C channels per bag point instead of the tower's 256.

With MODEL.CPR.ADAPTIVE enabled, a cascade gives every object its own sampling
region (cpr_refine.py): stage 1 is the paper's bag, each later stage samples a
disc sized from the previous stage's kept points around its refined point.
"""
import math

import torch
import torch.nn as nn
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Instances
from detectron2.utils import comm

from cpr_d2.data.classes import require_num_classes
from cpr_d2.layers import (bag_coordinates, bag_gather, bilinear_gather, inside_image,
                           negative_mask)

from .backbone import normalized_images, single_level_feature_name
from .cpr_losses import annotation_loss, mil_loss, negative_loss, score_variance_loss
from .cpr_refine import (kept_size, limit_move, nearest_neighbour_distance, refine_keep,
                         region_radius, weighted_centroid, within_distance)
from .postprocess import (check_flips, flip_points, flipped_image_input, original_size_and_scale,
                          rescale_points)

__all__ = ["CPRHead", "CPRNet"]


class CPRHead(nn.Module):
    """A tower of `num_convs` x (3x3 conv, GroupNorm(32), ReLU), then two 1x1 outputs:
    class logits (sigmoid, bias from `prior_prob`) and instance logits, C maps each."""

    def __init__(self, in_channels, num_classes, num_convs=4, conv_channels=256, prior_prob=0.01):
        super().__init__()
        layers = []
        for k in range(num_convs):
            layers += [
                nn.Conv2d(in_channels if k == 0 else conv_channels, conv_channels, 3, padding=1),
                get_norm("GN", conv_channels),
                nn.ReLU(inplace=True),
            ]
        self.tower = nn.Sequential(*layers)
        out_channels = conv_channels if num_convs else in_channels
        self.cls_logits = nn.Conv2d(out_channels, num_classes, 1)
        self.ins_logits = nn.Conv2d(out_channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features):
        x = self.tower(features)
        return self.cls_logits(x), self.ins_logits(x)


def _cell_centres_inside(height, width, stride, image_size, device):
    """(H*W,) bool: cells whose centre lies on the image (not in the batch padding)."""
    ys = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) * stride
    inside_y = ys <= image_size[0]
    inside_x = xs <= image_size[1]
    return (inside_y[:, None] & inside_x[None, :]).reshape(-1)


@META_ARCH_REGISTRY.register()
class CPRNet(nn.Module):
    """Coarse point refinement network.

    Inputs (a list of dicts from PointDatasetMapper with annotations): "image",
    "instances" with gt_points (in the input image's pixels) and gt_classes,
    and "height"/"width" of the original image.

    Training returns {"loss_cpr_mil", "loss_cpr_ann", "loss_cpr_neg"}, weighted.
    Inference returns, for every image, {"instances": Instances} in the
    original image's pixels, one row per input object: pred_points (refined),
    scores (mean kept bag score, 0 when none), pred_classes, coarse_points,
    num_kept, refined (bool: False where the annotated point stayed), est_sizes
    (each object's size estimated from the extent of its kept points, kept_size; 0
    where none is kept) and gt_ann_index; with return_bag_scores also bag_points (N, P, 2) and
    bag_scores (N, P) (the last stage's bag); with adaptive regions also
    regions (N,) and region_centres (N, 2), each object's last sampling disc.
    """

    @configurable
    def __init__(self, *, backbone, head, in_feature, stride, num_classes, radius,
                 focal_gamma=2.0, mil_weight=0.25, ann_weight=0.125, neg_weight=0.75,
                 refine_score_thresh=0.1, refine_relative_thresh=0.5, refine_ring_step=1.0,
                 refine_move_neighbour_fraction=0.0, refine_radius=0, refine_neighbour_disc=0.0,
                 refine_flips=(), return_bag_scores=False, adaptive=None, pixel_mean, pixel_std):
        """adaptive: None (the paper's CPR) or a dict with stages, rings, alpha, min_radius
        and max_radius (pixels) and neighbour_fraction, optionally variance_weight,
        move_neighbour_fraction and move_fraction (see MODEL.CPR.ADAPTIVE)."""
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.in_feature = in_feature
        self.stride = float(stride)
        self.num_classes = num_classes
        self.radius = radius
        self.focal_gamma = focal_gamma
        self.loss_weights = {"mil": mil_weight, "ann": ann_weight, "neg": neg_weight}
        self.refine_score_thresh = refine_score_thresh
        self.refine_relative_thresh = refine_relative_thresh
        if refine_radius != int(refine_radius) or refine_radius < 0:
            raise ValueError(f"MODEL.CPR.REFINE_RADIUS must be a whole number of strides >= 0 "
                             f"(0 = MODEL.CPR.RADIUS), got {refine_radius!r}")
        self.refine_radius = int(refine_radius) or radius
        rings = self.refine_radius / refine_ring_step if 0 < refine_ring_step <= 1 else 0.5
        if abs(rings - round(rings)) > 1e-6:
            raise ValueError(
                f"MODEL.CPR.REFINE_RING_STEP must be in (0, 1] and divide the refinement "
                f"radius ({self.refine_radius}) into whole rings, got {refine_ring_step}; e.g. "
                f"1.0, 0.5 or 0.25")
        self.refine_rings = int(round(rings))
        self.refine_ring_spacing = self.stride * refine_ring_step
        if not refine_move_neighbour_fraction >= 0:
            raise ValueError("MODEL.CPR.REFINE_MOVE_NEIGHBOUR_FRACTION must be >= 0 (0 = no "
                             f"limit), got {refine_move_neighbour_fraction!r}")
        self.refine_move_neighbour_fraction = float(refine_move_neighbour_fraction)
        if not 0 <= refine_neighbour_disc <= 1:
            raise ValueError("MODEL.CPR.REFINE_NEIGHBOUR_DISC must be in [0, 1] (0 = the whole "
                             f"bag; 0.5 = half the nearest-neighbour distance), got "
                             f"{refine_neighbour_disc!r}")
        self.refine_neighbour_disc = float(refine_neighbour_disc)
        self.refine_flips = check_flips(refine_flips, "MODEL.CPR.REFINE_FLIPS")
        self.return_bag_scores = return_bag_scores
        self.adaptive = _check_adaptive(adaptive)
        if self.adaptive is not None and (self.refine_radius != radius
                                          or self.refine_neighbour_disc > 0):
            raise ValueError("MODEL.CPR.REFINE_RADIUS and MODEL.CPR.REFINE_NEIGHBOUR_DISC shape "
                             "the paper's refinement bag; with MODEL.CPR.ADAPTIVE enabled leave "
                             "them at 0 (the adaptive regions size the later bags)")
        if self.adaptive is not None and self.refine_move_neighbour_fraction > 0:
            raise ValueError("MODEL.CPR.REFINE_MOVE_NEIGHBOUR_FRACTION limits the paper's bag; "
                             "with MODEL.CPR.ADAPTIVE enabled set "
                             "MODEL.CPR.ADAPTIVE.MOVE_NEIGHBOUR_FRACTION instead")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        require_num_classes(cfg)
        backbone = build_backbone(cfg)
        in_feature = single_level_feature_name(cfg)
        shape = backbone.output_shape()[in_feature]
        c = cfg.MODEL.CPR
        return {
            "backbone": backbone,
            "head": CPRHead(shape.channels, c.NUM_CLASSES, c.NUM_CONVS, c.CONV_CHANNELS,
                            c.PRIOR_PROB),
            "in_feature": in_feature,
            "stride": shape.stride,
            "num_classes": c.NUM_CLASSES,
            "radius": c.RADIUS,
            "focal_gamma": c.FOCAL_GAMMA,
            "mil_weight": c.MIL_WEIGHT,
            "ann_weight": c.ANN_WEIGHT,
            "neg_weight": c.NEG_WEIGHT,
            "refine_score_thresh": c.REFINE_SCORE_THRESH,
            "refine_relative_thresh": c.REFINE_RELATIVE_THRESH,
            "refine_ring_step": c.REFINE_RING_STEP,
            "refine_move_neighbour_fraction": c.REFINE_MOVE_NEIGHBOUR_FRACTION,
            "refine_radius": c.REFINE_RADIUS,
            "refine_neighbour_disc": c.REFINE_NEIGHBOUR_DISC,
            "refine_flips": c.REFINE_FLIPS,
            "return_bag_scores": c.RETURN_BAG_SCORES,
            "adaptive": _adaptive_from_config(c, shape.stride),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def _targets(self, batched_inputs):
        if any("instances" not in x for x in batched_inputs):
            raise ValueError(
                "CPRNet needs the annotated points of every image ('instances' with gt_points "
                "and gt_classes), in training and in refinement alike; build the loader with "
                "PointDatasetMapper(cfg, is_train=..., with_annotations=True)")
        instances = [x["instances"].to(self.device) for x in batched_inputs]
        for inst in instances:
            if len(inst) and int(inst.gt_classes.max()) >= self.num_classes:
                raise ValueError(
                    f"an object has class {int(inst.gt_classes.max())} but MODEL.CPR.NUM_CLASSES "
                    f"is {self.num_classes}; set it to the dataset's number of classes")
        return instances

    def forward(self, batched_inputs):
        if not self.training and self.refine_flips:
            return self._refine_flip_averaged(batched_inputs)
        return self._forward(batched_inputs)

    @torch.no_grad()
    def _refine_flip_averaged(self, batched_inputs):
        """Refinement averaged over the image and its MODEL.CPR.REFINE_FLIPS: each view is
        refined as one image, its points mapped back (a flip maps x to width - x in the
        input's pixels and in the original image's alike), and per object the refined
        points, scores and size estimates are averaged (adaptive regions: their centres
        and radii too). A point that moves in no view stays exactly where it was. The
        bag points and scores (RETURN_BAG_SCORES) and num_kept are the unflipped view's."""
        targets = self._targets(batched_inputs)
        views = []
        for flip in ("none",) + self.refine_flips:
            inputs = [_flipped_input(x, t, flip) for x, t in zip(batched_inputs, targets)]
            outs = self._forward(inputs)
            views.append([_unflip_result(o["instances"], flip) for o in outs])
        results = []
        for per_view in zip(*views):
            inst = per_view[0]
            for name in ("pred_points", "scores", "est_sizes", "region_centres", "regions"):
                if inst.has(name):
                    inst.set(name, torch.stack([v.get(name) for v in per_view]).mean(dim=0))
            moved = torch.stack([v.refined for v in per_view]).any(dim=0)
            # Where no view moved, the mean is the coarse point up to rounding: keep it exact.
            inst.pred_points = torch.where(moved[:, None], inst.pred_points, inst.coarse_points)
            inst.refined = moved & (inst.pred_points != inst.coarse_points).any(dim=1)
            results.append({"instances": inst})
        return results

    def _forward(self, batched_inputs):
        images = normalized_images(batched_inputs, self.pixel_mean, self.pixel_std,
                                   self.backbone.size_divisibility)
        targets = self._targets(batched_inputs)
        features = self.backbone(images.tensor)[self.in_feature]
        cls_map, ins_map = self.head(features)

        points = torch.cat([t.gt_points for t in targets]).float()
        labels = torch.cat([t.gt_classes for t in targets])
        counts = [len(t) for t in targets]
        batch_idx = torch.repeat_interleave(torch.arange(len(targets), device=self.device),
                                            torch.tensor(counts, device=self.device))
        image_sizes = torch.tensor(images.image_sizes, dtype=torch.int64, device=self.device)
        if self.training:
            # One gather serves both outputs: (N, P, 2C).
            maps = torch.cat([cls_map, ins_map], dim=1)
            bag, valid = bag_gather(maps, points, batch_idx, image_sizes, self.radius, self.stride)
            bags = [(*bag.split(self.num_classes, dim=2), valid)]
            keep_out, stages = None, []
            if self.adaptive is not None:
                with torch.no_grad():
                    stages = self.cascade(cls_map.detach(), points, labels, counts, batch_idx,
                                          image_sizes)[1:]
                for stage in stages:
                    bag, valid = bag_gather(maps, stage["centre"], batch_idx, image_sizes,
                                            self.adaptive["rings"], self.stride, stage["region"])
                    bags.append((*bag.split(self.num_classes, dim=2), valid))
                keep_out = (stages[-1]["centre"], stages[-1]["region"])
            losses = self.losses(cls_map, bags, points, labels, counts, images.image_sizes,
                                 keep_out)
            weight = self.adaptive["variance_weight"] if self.adaptive is not None else 0.0
            if weight > 0:
                var = sum(score_variance_loss(c, i, v, stage["coords"], labels, stage["region"])
                          for (c, i, v), stage in zip(bags[1:], stages)) / len(stages)
                losses["loss_cpr_var"] = weight * var * (len(labels) / self._normaliser(cls_map,
                                                                                          labels))
            return losses
        if self.adaptive is not None:
            return self.refine_adaptive(batched_inputs, images.image_sizes, cls_map, points,
                                        labels, counts, batch_idx, image_sizes, targets)
        if self.refine_rings == self.radius and self.refine_radius == self.radius:
            bag_cls, valid = bag_gather(cls_map, points, batch_idx, image_sizes, self.radius,
                                        self.stride)
            bag_coords = bag_coordinates(points, self.radius, self.stride)
        else:
            bag_coords, bag_cls, valid = self._refine_bag(cls_map, points, batch_idx, image_sizes)
        return self.refine(batched_inputs, images.image_sizes, bag_coords, bag_cls, valid, points,
                           labels, counts, targets)

    def _refine_bag(self, cls_map, points, batch_idx, image_sizes):
        """The refinement bag when MODEL.CPR.REFINE_RING_STEP < 1 or REFINE_RADIUS is set:
        the disc of radius REFINE_RADIUS * stride (default RADIUS), sampled by rings every
        REFINE_RING_STEP * stride pixels."""
        coords = bag_coordinates(points, self.refine_rings, self.refine_ring_spacing)
        return (coords, *self._read_bag(cls_map, coords, batch_idx, image_sizes))

    def _read_bag(self, cls_map, coords, batch_idx, image_sizes):
        """Class logits (N, P, C) and validity (N, P) of bag coordinates (N, P, 2)."""
        n, p, _ = coords.shape
        sizes = image_sizes[batch_idx].to(coords.dtype)  # (N, 2) = (height, width)
        valid = inside_image(coords, sizes[:, None, 0], sizes[:, None, 1])
        logits = bilinear_gather(cls_map, coords.reshape(-1, 2), batch_idx.repeat_interleave(p),
                                 self.stride)
        return logits.reshape(n, p, cls_map.shape[1]), valid

    def cascade(self, cls_map, points, labels, counts, batch_idx, image_sizes):
        """The adaptive stages on class logits `cls_map`, a list of dicts, one per stage:
        centre (N, 2) and region (N,) of its bag (stage 1: the annotated points and None,
        its bag the refinement bag), coords (N, P, 2), prob (N, P), keep (N, P), and the
        refinement rule's point, score, num_kept and moved (weighted_centroid), and size
        (kept_size of its kept points, float64)."""
        a = self.adaptive
        neighbour = _neighbour_distances(points, labels, counts)
        coords, logits, valid = self._refine_bag(cls_map, points, batch_idx, image_sizes)
        step = self.refine_ring_spacing
        centre, region, ann_prob = points, None, None
        stages = []
        for k in range(a["stages"]):
            if k:
                coords = bag_coordinates(centre, a["rings"], self.stride, region)
                logits, valid = self._read_bag(cls_map, coords, batch_idx, image_sizes)
                step = region / a["rings"]
            keep, prob = _per_image(
                lambda c, v, p, pt, lab, ap: refine_keep(c, v, p, pt, lab, self.refine_score_thresh,
                                                         self.refine_relative_thresh, ap),
                counts, coords, valid, logits.sigmoid(), points, labels,
                None if ann_prob is None else ann_prob)
            if ann_prob is None:  # p(a_j): stage 1's bag ends with the annotated point
                ann_prob = prob[:, -1]
            point, score, num_kept, moved = weighted_centroid(coords, prob, keep, centre,
                                                              self.refine_score_thresh)
            size = kept_size(coords.double(), keep, step)
            stages.append({"centre": centre, "region": region, "coords": coords, "prob": prob,
                           "keep": keep, "point": point, "score": score, "num_kept": num_kept,
                           "moved": moved, "neighbour": neighbour, "size": size})
            region = region_radius(size, moved, neighbour.double(), a["alpha"], a["min_radius"],
                                   a["max_radius"], a["neighbour_fraction"]).to(points.dtype)
            centre = point
        return stages

    def _negative_logits(self, cls_map, points, labels, counts, image_sizes, keep_out=None):
        """Class logits of every negative (cell, class) pair of the batch, 1-D. keep_out:
        None (cells within R * stride of a point are not negatives), or (centres (N, 2),
        radii (N,)): object j keeps the cells within radii[j] of its annotated point and
        of centres[j] out of the negatives."""
        _, num_classes, height, width = cls_map.shape
        selected = []
        for b, (pts, lab) in enumerate(zip(points.split(counts), labels.split(counts))):
            with torch.no_grad():
                region = None
                if keep_out is not None:
                    centres, radii = (t.split(counts)[b] for t in keep_out)
                    pts, lab = torch.cat([pts, centres.to(pts.dtype)]), torch.cat([lab, lab])
                    region = torch.cat([radii, radii])
                mask = negative_mask(pts, lab, (height, width), self.stride, self.radius, num_classes,
                                     region)
                mask &= _cell_centres_inside(height, width, self.stride, image_sizes[b],
                                             cls_map.device)[:, None]
            logits = cls_map[b].permute(1, 2, 0).reshape(-1, num_classes)
            selected.append(logits[mask])
        return torch.cat(selected)

    def losses(self, cls_map, bags, points, labels, counts, image_sizes, keep_out=None):
        """bags: per stage (bag_cls, bag_ins, valid), the first the paper's bag around the
        annotated points; keep_out: see _negative_logits."""
        gamma = self.focal_gamma
        neg_logits = self._negative_logits(cls_map, points, labels, counts, image_sizes, keep_out)
        # The losses are means over objects. In distributed training each process divides
        # by the objects of all processes (their per-process average), so N processes
        # optimise the loss of one process holding the whole batch.
        normaliser = self._normaliser(cls_map, labels)
        scale = len(labels) / normaliser
        mil = sum(mil_loss(c, i, v, labels, gamma) for c, i, v in bags) / len(bags)
        losses = {
            "loss_cpr_mil": mil * scale,
            "loss_cpr_ann": annotation_loss(bags[0][0][:, -1], labels, gamma) * scale,
            # negative_loss divides by its integer count: pass 1 and divide here.
            "loss_cpr_neg": negative_loss(neg_logits, 1, gamma) / normaliser,
        }
        # An image batch without objects still reaches every parameter (zero gradient).
        anchor = cls_map.sum() * 0
        return {k: self.loss_weights[k.rsplit("_", 1)[-1]] * v + anchor for k, v in losses.items()}

    @staticmethod
    def _normaliser(cls_map, labels):
        """The number of objects per process, averaged over the processes (at least 1)."""
        num_objects = torch.tensor([float(len(labels))], device=cls_map.device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num_objects)
            num_objects /= comm.get_world_size()
        return max(float(num_objects), 1.0)

    @torch.no_grad()
    def refine(self, batched_inputs, image_sizes, bag_coords, bag_cls, valid, points, labels,
               counts, targets):
        bag_prob = bag_cls.sigmoid()
        # The paper's rule (refine_points), its kept points computed once for the refined
        # points and the size estimate.
        keep, prob = _per_image(
            lambda c, v, p, pt, lab: refine_keep(c, v, p, pt, lab, self.refine_score_thresh,
                                                 self.refine_relative_thresh),
            counts, bag_coords, valid, bag_prob, points, labels)
        if self.refine_neighbour_disc > 0 or self.refine_move_neighbour_fraction > 0:
            neighbour = _neighbour_distances(points, labels, counts)
        if self.refine_neighbour_disc > 0:
            keep = keep & within_distance(bag_coords, points,
                                          self.refine_neighbour_disc * neighbour)
        refined, score, num_kept, moved = weighted_centroid(bag_coords, prob, keep, points,
                                                            self.refine_score_thresh)
        if self.refine_move_neighbour_fraction > 0:
            refined = limit_move(refined, points, self.refine_move_neighbour_fraction * neighbour)
        sizes = kept_size(bag_coords.double(), keep, self.refine_ring_spacing)
        return self._results(batched_inputs, image_sizes, points, labels, counts, targets,
                             refined, score, num_kept, moved, bag_coords, prob, sizes=sizes)

    @torch.no_grad()
    def refine_adaptive(self, batched_inputs, image_sizes, cls_map, points, labels, counts,
                        batch_idx, padded_sizes, targets):
        """Refinement with adaptive regions: the last stage's point, moved back towards the
        annotated point where it would end further than its region (or the neighbour
        bound), then MOVE_FRACTION of the way there from the annotated point."""
        stages = self.cascade(cls_map, points, labels, counts, batch_idx, padded_sizes)
        last = stages[-1]
        trust = last["region"]
        fraction = self.adaptive["move_neighbour_fraction"]
        if fraction > 0:
            trust = torch.minimum(trust, fraction * stages[0]["neighbour"])
        refined = limit_move(last["point"], points, trust)
        if self.adaptive["move_fraction"] < 1:
            refined = points + self.adaptive["move_fraction"] * (refined - points)
        moved = (refined != points).any(dim=1)
        return self._results(batched_inputs, image_sizes, points, labels, counts, targets,
                             refined, last["score"], last["num_kept"], moved, last["coords"],
                             last["prob"], regions=(last["centre"], last["region"]),
                             sizes=last["size"])

    def _results(self, batched_inputs, image_sizes, points, labels, counts, targets, refined,
                 score, num_kept, moved, bag_coords, bag_scores, regions=None, sizes=None):
        """Per image {"instances": ...} in the original image's pixels (class doc).
        regions: None, or (centres (N, 2), radii (N,)) of the adaptive sampling discs;
        sizes: (N,) each object's size estimated from its kept points (kept_size)."""
        results = []
        start = 0
        for b, (inp, n) in enumerate(zip(batched_inputs, counts)):
            rows = slice(start, start + n)
            start += n
            out_size, scale = original_size_and_scale(inp, image_sizes[b], points)
            inst = Instances(out_size)
            inst.pred_points = rescale_points(refined[rows], scale)
            inst.coarse_points = rescale_points(points[rows], scale)
            inst.scores = score[rows]
            inst.pred_classes = labels[rows]
            inst.num_kept = num_kept[rows]
            inst.refined = moved[rows]
            if sizes is not None:
                inst.est_sizes = sizes[rows].to(points.dtype) * scale.mean()
            if regions is not None:
                inst.region_centres = rescale_points(regions[0][rows], scale)
                # A radius in original pixels: the mean of the two axes' scales.
                inst.regions = regions[1][rows] * scale.mean()
            inst.gt_ann_index = targets[b].gt_ann_index if targets[b].has("gt_ann_index") else \
                torch.arange(n, device=points.device)
            if self.return_bag_scores:
                inst.bag_points = rescale_points(bag_coords[rows], scale)
                inst.bag_scores = bag_scores[rows]
            results.append({"instances": inst})
        return results


def _neighbour_distances(points, labels, counts):
    """(N,) per object of the batch: the distance to the nearest other annotated point of
    its class on its image (inf when it has none)."""
    return torch.cat([nearest_neighbour_distance(p, lab) for p, lab in
                      zip(points.split(counts), labels.split(counts))])


def _per_image(fn, counts, *tensors):
    """fn applied to each image's rows of `tensors` (split by `counts`; None passes
    through), its outputs concatenated back over the batch."""
    outs = []
    start = 0
    for n in counts:
        rows = slice(start, start + n)
        start += n
        outs.append(fn(*(None if t is None else t[rows] for t in tensors)))
    return tuple(torch.cat(parts) for parts in zip(*outs))


def _flipped_input(inp, instances, flip):
    """The input dict `inp` with its image and annotated points (`instances`, on the
    model's device) flipped; the unflipped view is `inp` itself."""
    if flip == "none":
        return inp
    height, width = inp["image"].shape[-2:]
    flipped = Instances(instances.image_size)
    for name, value in instances.get_fields().items():
        flipped.set(name, value)
    flipped.gt_points = flip_points(instances.gt_points, width, height, flip)
    return {**flipped_image_input(inp, flip), "instances": flipped}


def _unflip_result(inst, flip):
    """A view's results mapped back to the unflipped image (inst.image_size is the
    original image's (height, width), in whose pixels the points are)."""
    if flip == "none":
        return inst
    height, width = inst.image_size
    for name in ("pred_points", "region_centres", "bag_points"):
        if inst.has(name):
            inst.set(name, flip_points(inst.get(name), width, height, flip))
    return inst


def _check_adaptive(adaptive):
    if adaptive is None:
        return None
    a = dict(adaptive)
    problems = []
    if not (isinstance(a.get("stages"), int) and a["stages"] >= 2):
        problems.append(f"STAGES must be an int >= 2 (the paper's bag and at least one more), "
                        f"got {a.get('stages')!r}")
    if not (isinstance(a.get("rings"), int) and 1 <= a["rings"] <= 64):
        problems.append(f"RINGS must be an int in [1, 64], got {a.get('rings')!r}")
    if not a.get("alpha", 0) > 0:
        problems.append(f"ALPHA must be > 0, got {a.get('alpha')!r}")
    if not 0 <= a.get("min_radius", -1) <= a.get("max_radius", -1):
        problems.append(f"0 <= MIN_RADIUS <= MAX_RADIUS (in strides) must hold, got "
                        f"{a.get('min_radius')!r} and {a.get('max_radius')!r} pixels")
    a.setdefault("variance_weight", 0.0)
    a.setdefault("move_neighbour_fraction", 0.0)
    a.setdefault("move_fraction", 1.0)
    if not 0 < a["move_fraction"] <= 1:
        problems.append(f"MOVE_FRACTION must be in (0, 1], got {a['move_fraction']!r}")
    if not a["move_neighbour_fraction"] >= 0:
        problems.append("MOVE_NEIGHBOUR_FRACTION must be >= 0, got "
                        f"{a['move_neighbour_fraction']!r}")
    if not a["variance_weight"] >= 0:
        problems.append(f"VARIANCE_WEIGHT must be >= 0, got {a['variance_weight']!r}")
    if not a.get("neighbour_fraction", 0) > 0:
        problems.append(f"NEIGHBOUR_FRACTION must be > 0, got {a.get('neighbour_fraction')!r}")
    if problems:
        raise ValueError("MODEL.CPR.ADAPTIVE: " + "; ".join(problems))
    return a


def _adaptive_from_config(c, stride):
    """The `adaptive` argument of CPRNet from MODEL.CPR (None when ADAPTIVE is off)."""
    a = c.ADAPTIVE
    if not a.ENABLED:
        return None
    return {"stages": a.STAGES, "rings": a.RINGS, "alpha": float(a.ALPHA),
            "min_radius": float(a.MIN_RADIUS) * stride,
            "max_radius": float(a.MAX_RADIUS or c.RADIUS) * stride,
            "neighbour_fraction": float(a.NEIGHBOUR_FRACTION),
            "variance_weight": float(a.VARIANCE_WEIGHT),
            "move_neighbour_fraction": float(a.MOVE_NEIGHBOUR_FRACTION),
            "move_fraction": float(a.MOVE_FRACTION)}
