"""CPRNet's refinement rule, and the per-object sampling regions of its adaptive variant.

The paper's rule (docs/method.md, "Refinement"): bag point i of object j (class c, score
p_i) is kept when it is on the image, a_j is its nearest annotated point of
class c, c is its top-scoring class, p_i > score_thresh and
p_i > relative_thresh * p(a_j); the refined point is the p-weighted mean of the
kept points.

Adaptive regions (MODEL.CPR.ADAPTIVE): the kept points' extent estimates each
object's size, size = sqrt((w + d)(h + d)) with d the sampling step, and the
next stage samples a disc of radius

    r_j = clip(alpha * size_j / 2, r_min, min(r_max, f * NN_j))

around the previous stage's refined point, NN_j being the distance to the
nearest other annotated point of the same class (a bound that needs no boxes).
"""
import torch

__all__ = [
    "refine_keep",
    "weighted_centroid",
    "refine_points",
    "kept_size",
    "nearest_neighbour_distance",
    "region_radius",
    "limit_move",
    "within_distance",
]


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


def refine_keep(bag_coords, bag_valid, bag_prob, points, labels, score_thresh=0.1,
                relative_thresh=0.5, ann_prob=None):
    """The bag points the refinement keeps, for one image's objects.

    Args:
        bag_coords: (N, P, 2) bag coordinates; bag_valid: (N, P) bool, on the image.
        bag_prob: (N, P, C) class probabilities; points: (N, 2) annotated points
            (for the nearest-point rule); labels: (N,) int64.
        ann_prob: (N,) the annotated points' own scores p(a_j); default the bag's
            last slot (the annotated point in a bag centred on it).

    Returns:
        keep (N, P) bool and prob (N, P), each point's score for its object's class.
    """
    prob = bag_prob.gather(2, labels.view(-1, 1, 1).expand(-1, bag_prob.shape[1], 1)).squeeze(2)
    if ann_prob is None:
        ann_prob = prob[:, -1]
    keep = bag_valid.clone()
    keep &= _nearest_is_own(bag_coords, points, labels)
    keep &= bag_prob.argmax(dim=2) == labels[:, None]
    keep &= prob > score_thresh
    keep &= prob > relative_thresh * ann_prob[:, None]
    return keep, prob


def weighted_centroid(bag_coords, prob, keep, fallback, score_thresh=0.1):
    """The p-weighted mean of the kept points, and their mean score; `fallback` (N, 2)
    where nothing is kept or that mean is below score_thresh.

    Returns refined (N, 2), score (N,) (0 where nothing is kept), num_kept (N,) int64 and
    moved (N,) bool (False where the fallback stayed)."""
    weights = prob * keep
    num_kept = keep.sum(dim=1)
    total = weights.sum(dim=1)
    score = total / num_kept.clamp(min=1)
    centroid = (weights[..., None] * bag_coords).sum(dim=1) / total.clamp(min=1e-12)[:, None]
    moved = (num_kept > 0) & (score >= score_thresh)
    refined = torch.where(moved[:, None], centroid.to(fallback.dtype), fallback)
    return refined, score, num_kept, moved


def refine_points(bag_coords, bag_valid, bag_prob, points, labels, score_thresh=0.1,
                  relative_thresh=0.5):
    """CPR's refinement of one image's annotated points (the paper's rule, module doc).

    Args:
        bag_coords: (N, P, 2) bag coordinates (annotated point last).
        bag_valid: (N, P) bool, on the image.
        bag_prob: (N, P, C) class probabilities (sigmoid of O_cls).
        points: (N, 2) annotated points; labels: (N,) int64 classes.

    Returns:
        refined (N, 2), score (N,) (0 where nothing is kept), num_kept (N,) int64,
        and refined_mask (N,) bool (False where the annotated point stayed).
    """
    if points.shape[0] == 0:
        empty = points.new_zeros(0)
        return points.clone(), empty, empty.long(), empty.bool()
    keep, prob = refine_keep(bag_coords, bag_valid, bag_prob, points, labels, score_thresh,
                             relative_thresh)
    return weighted_centroid(bag_coords, prob, keep, points, score_thresh)


def kept_size(bag_coords, keep, step):
    """(N,) size estimate sqrt((w + d)(h + d)) from the extent (w, h) of each object's kept
    points and the sampling step d (pixels, a number or (N,)); 0 where nothing is kept."""
    big = torch.finfo(bag_coords.dtype).max
    x, y = bag_coords[..., 0], bag_coords[..., 1]
    lo_x = torch.where(keep, x, big).amin(dim=1)
    hi_x = torch.where(keep, x, -big).amax(dim=1)
    lo_y = torch.where(keep, y, big).amin(dim=1)
    hi_y = torch.where(keep, y, -big).amax(dim=1)
    found = keep.any(dim=1)
    w = torch.where(found, hi_x - lo_x, torch.zeros_like(lo_x))
    h = torch.where(found, hi_y - lo_y, torch.zeros_like(lo_y))
    size = torch.sqrt((w + step) * (h + step))
    return torch.where(found, size, torch.zeros_like(size))


def nearest_neighbour_distance(points, labels):
    """(N,) distance from each annotated point to the nearest other annotated point of
    its class on the same image; inf when it has none."""
    n = points.shape[0]
    if n < 2:
        return points.new_full((n,), float("inf"))
    d = torch.cdist(points.double(), points.double(), compute_mode="donot_use_mm_for_euclid_dist")
    other = labels[:, None] != labels[None, :]
    other |= torch.eye(n, dtype=torch.bool, device=points.device)
    return d.masked_fill(other, float("inf")).amin(dim=1).to(points.dtype)


def region_radius(size, found, neighbour_distance, alpha, min_radius, max_radius,
                  neighbour_fraction):
    """Per-object sampling radius clip(alpha * size / 2, r_min, min(r_max, f * NN)); objects
    whose size is unknown (found False) get r_max, still bounded by their neighbours.
    The neighbour bound wins over r_min: two objects never sample each other's centre."""
    radius = torch.where(found, alpha * size / 2, torch.full_like(size, max_radius))
    upper = torch.clamp(neighbour_fraction * neighbour_distance, max=max_radius)
    return torch.minimum(radius.clamp(min=min_radius), upper)


def limit_move(refined, anchors, radius):
    """`refined` (N, 2) moved back towards `anchors` so that no point ends further than
    radius (N,) pixels from its anchor."""
    step = refined - anchors
    length = step.norm(dim=1)
    scale = torch.where(length > radius, radius / length.clamp(min=1e-12), torch.ones_like(length))
    return anchors + step * scale[:, None]


def within_distance(bag_coords, anchors, radius):
    """(N, P) bool: bag point p of object j lies within radius[j] pixels of anchors[j]
    (inclusive; an infinite radius keeps every point)."""
    offset = bag_coords - anchors[:, None, :].to(bag_coords.dtype)
    return offset.norm(dim=2) <= radius[:, None].to(bag_coords.dtype)
