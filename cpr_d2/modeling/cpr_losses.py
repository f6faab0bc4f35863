"""CPRNet's losses, as functions of plain tensors (the refinement rule is in cpr_refine.py).

Notation (docs/method.md, "Losses" of "CPRNet"): an object j has a class y_j and an annotated
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
    "score_variance_loss",
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


def score_variance_loss(bag_cls, bag_ins, valid, coords, labels, radius):
    """Mean over objects of the spread of a bag's score mass, in units of its region:
    sum_i q_i |x_i - sum_k q_k x_k|^2 / r_j^2, with q_i proportional to
    sigmoid(O_cls[i, y_j]) * softmax_i(O_ins[i, y_j]) over the bag's valid points.

    bag_cls, bag_ins: (N, P, C) logits; valid: (N, P) bool; coords: (N, P, 2) bag
    coordinates; labels: (N,) int64; radius: (N,) region radii in pixels.
    """
    if bag_cls.shape[0] == 0:
        return bag_cls.sum() * 0 + bag_ins.sum() * 0
    index = labels.view(-1, 1, 1).expand(-1, bag_cls.shape[1], 1)
    valid = valid.clone()
    valid[:, -1] = True
    ins = bag_ins.gather(2, index).squeeze(2).masked_fill(~valid, float("-inf"))
    mass = bag_cls.gather(2, index).squeeze(2).sigmoid() * ins.softmax(dim=1)
    q = mass / mass.sum(dim=1, keepdim=True).clamp(min=1e-12)
    coords = coords.to(q.dtype)
    mean = (q[..., None] * coords).sum(dim=1, keepdim=True)
    spread = (q * ((coords - mean) ** 2).sum(dim=2)).sum(dim=1)
    return (spread / radius.to(q.dtype).clamp(min=1e-6) ** 2).mean()
