"""CPRNet's losses and its refinement rule, as functions of plain tensors.

Notation (README, "CPRNet"): an object j has a class y_j and an annotated
point a_j; its bag holds P = 4R(R+1)+1 points (the rings, then a_j itself,
last). For every bag point the head gives class logits O_cls (C values) and
instance logits O_ins (C values).
"""
import torch
import torch.nn.functional as F

__all__ = [
    "quality_focal_loss",
    "quality_focal_loss_with_logits",
    "mil_loss",
    "annotation_loss",
    "negative_loss",
    "refine_points",
]


def quality_focal_loss(prob, target, gamma, eps=1e-6):
    """Element-wise FL(p, q) = -|p - q|^gamma [q log p + (1 - q) log(1 - p)], p a probability."""
    prob = prob.clamp(eps, 1 - eps)
    bce = -(target * prob.log() + (1 - target) * (1 - prob).log())
    return (prob - target).abs().pow(gamma) * bce


def quality_focal_loss_with_logits(logits, target, gamma):
    """FL(sigmoid(x), q), computed from the logits for numerical stability."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (logits.sigmoid() - target).abs().pow(gamma) * bce


def mil_loss(bag_cls, bag_ins, valid, labels, gamma):
    """Mean over bags of FL(P_j, onehot(y_j)) summed over classes, where
    P_j,c = sum_i sigmoid(O_cls[i, c]) * softmax_i(O_ins[i, c]) over the bag's valid points.

    bag_cls, bag_ins: (N, P, C) logits; valid: (N, P) bool; labels: (N,) int64.
    """
    if bag_cls.shape[0] == 0:
        return bag_cls.sum() * 0 + bag_ins.sum() * 0
    # The annotated point (last slot) always takes part, so no bag is empty.
    valid = valid.clone()
    valid[:, -1] = True
    ins = bag_ins.masked_fill(~valid[..., None], float("-inf"))
    weights = ins.softmax(dim=1)
    bag_prob = (bag_cls.sigmoid() * weights).sum(dim=1)  # (N, C)
    target = F.one_hot(labels, bag_cls.shape[-1]).to(bag_prob.dtype)
    return quality_focal_loss(bag_prob, target, gamma).sum(dim=1).mean()


def annotation_loss(ann_cls, labels, gamma):
    """Mean over objects of FL(sigmoid(O_cls(a_j)), onehot(y_j)) summed over classes.

    ann_cls: (N, C) class logits at the annotated points.
    """
    if ann_cls.shape[0] == 0:
        return ann_cls.sum() * 0
    target = F.one_hot(labels, ann_cls.shape[-1]).to(ann_cls.dtype)
    return quality_focal_loss_with_logits(ann_cls, target, gamma).sum(dim=1).mean()


def negative_loss(neg_logits, num_objects, gamma):
    """Sum of FL(sigmoid(O_cls), 0) over the negative (cell, class) pairs, divided by
    the number of objects (at least 1), not by the number of negatives.

    neg_logits: 1-D tensor, the class logits of every negative pair.
    """
    loss = quality_focal_loss_with_logits(neg_logits, torch.zeros_like(neg_logits), gamma).sum()
    return loss / max(int(num_objects), 1)


def _nearest_is_own(bag_coords, points, labels, chunk_elems=1 << 22):
    """(N, P) bool: for each bag point of object j, a_j is (one of) the nearest annotated
    points of object j's class. Computed per class, in chunks, to bound memory."""
    n, p, _ = bag_coords.shape
    own = torch.ones(n, p, dtype=torch.bool, device=bag_coords.device)
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < 2:
            continue
        anchors = points[members].to(bag_coords.dtype)  # (M, 2)
        step = max(1, chunk_elems // (p * len(members)))
        for start in range(0, len(members), step):
            rows = members[start:start + step]
            d2 = ((bag_coords[rows][:, :, None, :] - anchors[None, None]) ** 2).sum(-1)  # (r, P, M)
            mine = d2.gather(2, (torch.arange(start, start + len(rows), device=d2.device))
                             .view(-1, 1, 1).expand(-1, p, 1)).squeeze(2)
            own[rows] = mine <= d2.min(dim=2).values
    return own


def refine_points(bag_coords, bag_valid, bag_prob, points, labels, score_thresh=0.1,
                  relative_thresh=0.5):
    """CPR's refinement of one image's annotated points (README, "Refinement").

    Bag point i of object j (class c, score p_i = bag_prob[j, i, c]) is kept when
    it is on the image, a_j is its nearest annotated point of class c, c is its
    top-scoring class, p_i > score_thresh and p_i > relative_thresh * p(a_j).
    The refined point is the p-weighted mean of the kept points and its score
    their mean p; with nothing kept, or a mean below score_thresh, the
    annotated point stays.

    Args:
        bag_coords: (N, P, 2) bag coordinates (annotated point last).
        bag_valid: (N, P) bool, on the image.
        bag_prob: (N, P, C) class probabilities (sigmoid of O_cls).
        points: (N, 2) annotated points; labels: (N,) int64 classes.

    Returns:
        refined (N, 2), score (N,) (0 where nothing is kept), num_kept (N,) int64,
        and refined_mask (N,) bool (False where the annotated point stayed).
    """
    n = points.shape[0]
    if n == 0:
        empty = points.new_zeros(0)
        return points.clone(), empty, empty.long(), empty.bool()
    prob = bag_prob.gather(2, labels.view(-1, 1, 1).expand(-1, bag_prob.shape[1], 1)).squeeze(2)
    keep = bag_valid.clone()
    keep &= _nearest_is_own(bag_coords, points, labels)
    keep &= bag_prob.argmax(dim=2) == labels[:, None]
    keep &= prob > score_thresh
    keep &= prob > relative_thresh * prob[:, -1:]
    weights = prob * keep
    num_kept = keep.sum(dim=1)
    total = weights.sum(dim=1)
    score = total / num_kept.clamp(min=1)
    centroid = (weights[..., None] * bag_coords).sum(dim=1) / total.clamp(min=1e-12)[:, None]
    refined_mask = (num_kept > 0) & (score >= score_thresh)
    refined = torch.where(refined_mask[:, None], centroid.to(points.dtype), points)
    return refined, score, num_kept, refined_mask
