"""P2PNet's one-to-many Hungarian matching of predicted points to ground-truth points.

Per image, a cost matrix (predictions x ground truths) is built from the
class cost and the pixel distance, and solved with scipy's
`linear_sum_assignment`; the solve is repeated `topk` times over the
predictions still unassigned, so each ground truth gets up to `topk`
predictions (one per round).

Crowded images (thousands of ground truths, tens of thousands of anchor
points) make the dense (P, G) matrix too big and the Hungarian solve too
slow. There, `match_sparse` keeps for every ground truth only its
`candidates` nearest predictions (a KD-tree query), computes the cost of
those pairs only, and solves every round on the sparse graph with scipy's
`min_weight_full_bipartite_matching`.
"""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

__all__ = ["focal_class_cost", "prob_class_cost", "point_distance", "match_cost_matrix",
           "sparse_assignment", "match_sparse", "PointMatcher"]

_EPS = 1e-8
# PointMatcher matches densely (exactly) while predictions x ground truths <= this.
DENSE_LIMIT = 4_000_000
_NOT_FINITE = ("P2PNet matching cost is not finite (NaN or inf in the predicted points or class "
               "logits): training diverged; lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS")


def _focal_cost_of_prob(prob, alpha, gamma):
    pos = alpha * (1 - prob) ** gamma * -(prob + _EPS).log()
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + _EPS).log()
    return pos - neg


def focal_class_cost(logits, gt_classes, alpha=0.25, gamma=2.0):
    """(P, G) class cost of the sigmoid classifier: the focal loss of calling prediction
    i positive for ground truth j's class minus that of calling it negative.

    logits: (P, C) class logits; gt_classes: (G,) int64.
    """
    return _focal_cost_of_prob(logits.sigmoid()[:, gt_classes], alpha, gamma)


def prob_class_cost(logits, gt_classes):
    """(P, G) class cost of the softmax classifier (C + 1 logits, background last):
    minus the probability of ground truth j's class."""
    return -logits.softmax(dim=1)[:, gt_classes]


def _minkowski_p(distance):
    if distance == "L1":
        return 1.0
    if distance == "L2":
        return 2.0
    raise ValueError(f"MODEL.P2PNET.MATCHER.DISTANCE must be 'L1' or 'L2', got {distance!r}")


def point_distance(pred_points, gt_points, distance="L1"):
    """(P, G) pixel distances, "L1" (|dx| + |dy|) or "L2" (Euclidean)."""
    # Not through the |a|^2 + |b|^2 - 2ab matrix product torch uses for large inputs: it
    # loses about 1e-3 px at image scale, enough to flip near-tied assignments.
    return torch.cdist(pred_points.float(), gt_points.float(), p=_minkowski_p(distance),
                       compute_mode="donot_use_mm_for_euclid_dist")


def match_cost_matrix(cost, topk):
    """Repeated Hungarian matching on a (P, G) cost matrix.

    Round r solves the assignment between the predictions not assigned in rounds
    < r and all ground truths. Returns (pred_index, gt_index), int64 arrays of
    equal length, ordered by round. With G > P the first round assigns every
    prediction and stops; with G = 0 or P = 0 nothing is matched.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a (P, G) matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise FloatingPointError(_NOT_FINITE)
    num_pred, num_gt = cost.shape
    pred_index, gt_index = [], []
    free = np.arange(num_pred)
    if num_gt == 0:
        topk = 0
    for _ in range(topk):
        if len(free) == 0:
            break
        rows, cols = linear_sum_assignment(cost[free])
        pred_index.append(free[rows])
        gt_index.append(cols)
        free = np.delete(free, rows)
    if not pred_index:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pred_index).astype(np.int64), np.concatenate(gt_index).astype(np.int64)


def _empty_pairs():
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def sparse_assignment(rows, cols, costs, num_rows, num_cols):
    """Least-cost matching on a sparse bipartite graph, each node with a fallback.

    Edge e joins row node rows[e] (< num_rows) and column node cols[e]
    (< num_cols) at cost costs[e]; no pair may appear twice. Returns
    (row_index, col_index), int64 arrays of equal length: a matching, each
    node at most once. Nodes without edges stay unmatched.

    It wraps scipy's `min_weight_full_bipartite_matching` (LAPJVsp), which
    needs two things the raw costs do not guarantee:

    * Non-zero weights (scipy drops explicit zeros, i.e. reads them as "no
      edge"). Costs are shifted so the cheapest edge weighs 1. Every full
      matching has the same number of edges, so a constant added to every
      edge does not change which one is optimal.
    * A full matching: one that covers every node of the smaller side (nodes
      without edges left out). A restricted candidate graph may have none,
      and then scipy raises ValueError. So each node n of the smaller side
      gets a fallback: its own dummy partner at cost (dearest edge of n) + 1.
      A full matching then always exists and this never raises; pairs with
      a dummy are dropped from the answer, leaving n unmatched.

    A node takes its fallback only when all its neighbours are taken and
    fitting it in (an augmenting path) would raise the total by more than
    its fallback cost. On a complete graph a neighbour is always free, so
    the answer is a full matching with linear_sum_assignment's optimal cost.
    On a sparse graph the fallback also bounds each augmenting-path search:
    without it (or with a prohibitive fallback cost) LAPJVsp scans the whole
    graph for every node it cannot fit cheaply, which on crowded images
    costs minutes instead of a second.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    cols = np.asarray(cols, dtype=np.int64).reshape(-1)
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    if not len(rows) == len(cols) == len(costs):
        raise ValueError(f"rows, cols and costs differ in length: {len(rows)}, {len(cols)}, "
                         f"{len(costs)}")
    if len(costs) == 0 or num_rows == 0 or num_cols == 0:
        return _empty_pairs()
    if rows.min() < 0 or rows.max() >= num_rows or cols.min() < 0 or cols.max() >= num_cols:
        raise ValueError(f"edge index out of range for a {num_rows} x {num_cols} graph")
    if not np.isfinite(costs).all():
        raise FloatingPointError(_NOT_FINITE)
    row_ids, r = np.unique(rows, return_inverse=True)
    col_ids, c = np.unique(cols, return_inverse=True)
    swapped = len(row_ids) > len(col_ids)
    if swapped:  # the solver's rows: the smaller side
        row_ids, col_ids, r, c = col_ids, row_ids, c, r
    nr, nc = len(row_ids), len(col_ids)
    ri, ci = min_weight_full_bipartite_matching(_graph_with_fallbacks(r, c, costs, nr, nc))
    real = ci < nc
    ri, ci = row_ids[ri[real]].astype(np.int64), col_ids[ci[real]].astype(np.int64)
    return (ci, ri) if swapped else (ri, ci)


def _graph_with_fallbacks(r, c, costs, nr, nc):
    """sparse_assignment's (nr, nc + nr) graph for the solver: edge e from row r[e] to
    column c[e] weighing costs[e] shifted so the cheapest is 1, and from each row n to its
    own dummy column nc + n weighing (the dearest of n's edges) + 1."""
    weight = costs - costs.min() + 1.0
    fallback = np.full(nr, -np.inf)  # each solver row's own dummy column
    np.maximum.at(fallback, r, weight)
    fallback += 1.0
    dummy = np.arange(nr)
    graph = csr_array((np.concatenate([weight, fallback]),
                       (np.concatenate([r, dummy]), np.concatenate([c, nc + dummy]))),
                      shape=(nr, nc + nr))
    if graph.nnz != len(weight) + nr:
        raise ValueError("sparse_assignment: a (row, col) pair appears more than once")
    return graph


def _knn(points, query, k, p):
    """(len(query), k) indices into `points` of the k nearest points of each query point."""
    _, index = cKDTree(points).query(query, k=k, p=p)
    return np.asarray(index, dtype=np.int64).reshape(len(query), k)


def _candidate_pairs(pred_points, gt_points, k, p):
    """(pred, gt) index pairs: each GT's k nearest predictions and, when there are fewer
    predictions than GTs, each prediction's k nearest GTs; no pair twice."""
    num_pred, num_gt = len(pred_points), len(gt_points)
    kp = min(k, num_pred)
    rows = _knn(pred_points, gt_points, kp, p).reshape(-1)
    cols = np.repeat(np.arange(num_gt), kp)
    if num_pred < num_gt:
        kg = min(k, num_gt)
        rows = np.concatenate([rows, np.repeat(np.arange(num_pred), kg)])
        cols = np.concatenate([cols, _knn(gt_points, pred_points, kg, p).reshape(-1)])
        _, first = np.unique(rows * num_gt + cols, return_index=True)
        rows, cols = rows[first], cols[first]
    return rows, cols


# Passes per round (see match_sparse); each refill pass doubles the candidates.
_MAX_PASSES = 16


def _sparse_round(pred_points, gt_points, free, pair_cost, candidates, p):
    """One round of match_sparse: (pred_index, gt_index) over the predictions `free`."""
    gts = np.arange(len(gt_points))
    preds = free
    budget = max(len(preds), len(gts)) * candidates  # pairs per pass, at most
    k = candidates
    out_pred, out_gt = [], []
    for _ in range(_MAX_PASSES):
        if len(preds) == 0 or len(gts) == 0:
            break
        rows, cols = _candidate_pairs(pred_points[preds], gt_points[gts], k, p)
        costs = np.asarray(pair_cost(preds[rows], gts[cols]), dtype=np.float64).reshape(-1)
        if len(costs) != len(rows):
            raise ValueError(f"pair_cost returned {len(costs)} costs for {len(rows)} pairs")
        r, c = sparse_assignment(rows, cols, costs, len(preds), len(gts))
        out_pred.append(preds[r])
        out_gt.append(gts[c])
        preds, gts = np.delete(preds, r), np.delete(gts, c)
        k = max(k, min(2 * k, budget // max(len(preds), len(gts), 1)))
    if not out_pred:
        return _empty_pairs()
    return np.concatenate(out_pred), np.concatenate(out_gt)


def match_sparse(pred_points, gt_points, pair_cost, topk, candidates, p=1.0):
    """Repeated matching like `match_cost_matrix`, restricted to near pairs.

    Args:
        pred_points: (P, 2) predicted points; gt_points: (G, 2) ground-truth points.
        pair_cost: callable (pred_index, gt_index) -> (n,) float costs of those pairs,
            for int64 index arrays of length n.
        topk: rounds; candidates: nearest predictions per ground truth (>= 1);
        p: Minkowski p of "nearest" (1: L1, 2: Euclidean), the cost's distance.

    Round r matches the predictions not assigned in rounds < r to the ground
    truths, each ground truth at most one prediction, like the dense round:

    1. Candidates: a KD-tree gives every ground truth its `candidates`
       nearest free predictions; when fewer predictions than ground truths
       are free, each prediction also gets its `candidates` nearest ground
       truths (the dense round then assigns every prediction). Only these
       pairs are costed (`pair_cost`).
    2. `sparse_assignment` solves them for least cost; a node whose
       candidates are all taken, or that could only be fitted in at a cost
       above its dearest candidate + 1, is left unmatched by this pass.
    3. Refill passes repeat 1-2 for the ground truths and predictions left
       unmatched in this round, with twice as many candidates each pass
       (keeping a pass to about 2 * max(P, G) * `candidates` pairs), until
       one side is used up, as in the dense round, or 16 passes have run
       (then the ground truths still unmatched skip this round).

    No (P, G) array is built: memory is O((P + G) * candidates). When every
    prediction is a candidate of every ground truth (candidates >= P), each
    round is solved in one pass with the dense round's optimal cost. Returns
    (pred_index, gt_index) int64 arrays, ordered by round.
    """
    pred_points = np.asarray(pred_points, dtype=np.float64).reshape(-1, 2)
    gt_points = np.asarray(gt_points, dtype=np.float64).reshape(-1, 2)
    candidates = int(candidates)
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if len(pred_points) == 0 or len(gt_points) == 0:
        return _empty_pairs()
    if not (np.isfinite(pred_points).all() and np.isfinite(gt_points).all()):
        raise FloatingPointError(_NOT_FINITE)
    pred_index, gt_index = [], []
    free = np.arange(len(pred_points))
    for _ in range(int(topk)):
        if len(free) == 0:
            break
        r, c = _sparse_round(pred_points, gt_points, free, pair_cost, candidates, p)
        if len(r) == 0:
            break
        pred_index.append(r)
        gt_index.append(c)
        free = np.setdiff1d(free, r, assume_unique=True)
    if not pred_index:
        return _empty_pairs()
    return np.concatenate(pred_index).astype(np.int64), np.concatenate(gt_index).astype(np.int64)


class PointMatcher:
    """Matches one image's predictions to its ground-truth points.

    cost = class_weight * class cost + point_weight * pixel distance, then
    `topk` rounds of Hungarian matching. With candidates = 0, or while
    predictions x ground truths <= dense_limit, the (P, G) cost matrix is
    built and solved exactly (`match_cost_matrix`). Above it, each ground
    truth considers only its `candidates` nearest predictions (`match_sparse`;
    the same cost, computed for those pairs only).
    """

    def __init__(self, class_cost="focal", class_weight=2.0, point_weight=0.1, distance="L1",
                 topk=5, focal_alpha=0.25, focal_gamma=2.0, candidates=64,
                 dense_limit=DENSE_LIMIT):
        if class_cost not in ("focal", "prob"):
            raise ValueError(f"MODEL.P2PNET.MATCHER.CLASS_COST must be 'focal' or 'prob', got "
                             f"{class_cost!r}")
        if int(topk) < 1:
            raise ValueError(f"MODEL.P2PNET.MATCHER.TOPK must be >= 1, got {topk!r}")
        if isinstance(candidates, bool) or int(candidates) != candidates or candidates < 0:
            raise ValueError(f"MODEL.P2PNET.MATCHER.CANDIDATES must be an int >= 0, got "
                             f"{candidates!r}")
        point_distance(torch.zeros(1, 2), torch.zeros(1, 2), distance)  # validates `distance`
        self.class_cost = class_cost
        self.class_weight = class_weight
        self.point_weight = point_weight
        self.distance = distance
        self.topk = int(topk)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.candidates = int(candidates)
        self.dense_limit = dense_limit

    def is_sparse(self, num_pred, num_gt):
        """Whether an image with these counts is matched on candidate pairs only."""
        return self.candidates > 0 and num_pred * num_gt > self.dense_limit

    @torch.no_grad()
    def cost(self, logits, pred_points, gt_classes, gt_points):
        if self.class_cost == "focal":
            cls = focal_class_cost(logits.float(), gt_classes, self.focal_alpha, self.focal_gamma)
        else:
            cls = prob_class_cost(logits.float(), gt_classes)
        return self.class_weight * cls + self.point_weight * point_distance(
            pred_points, gt_points, self.distance)

    def pair_cost_fn(self, logits, pred_points, gt_classes, gt_points):
        """A function (pred_index, gt_index) -> float64 numpy costs of just those pairs, equal
        to the entries of `cost(...)` (up to float32 rounding of the distance)."""
        logits = logits.float()
        probs = logits.softmax(dim=1) if self.class_cost == "prob" else None
        pred_points, gt_points = pred_points.float(), gt_points.float()
        device = pred_points.device

        @torch.no_grad()
        def pair_cost(pred_index, gt_index):
            pi = torch.as_tensor(pred_index, device=device)
            gi = torch.as_tensor(gt_index, device=device)
            classes = gt_classes[gi]
            if probs is None:
                cls = _focal_cost_of_prob(logits[pi, classes].sigmoid(), self.focal_alpha,
                                          self.focal_gamma)
            else:
                cls = -probs[pi, classes]
            diff = pred_points[pi] - gt_points[gi]
            if self.distance == "L1":
                dist = diff.abs().sum(dim=1)
            else:
                dist = diff.square().sum(dim=1).sqrt()
            cost = self.class_weight * cls + self.point_weight * dist
            return cost.cpu().numpy().astype(np.float64)

        return pair_cost

    @torch.no_grad()
    def __call__(self, logits, pred_points, gt_classes, gt_points):
        """logits (P, C or C + 1), pred_points (P, 2), gt_classes (G,), gt_points (G, 2)
        -> (pred_index, gt_index), int64 tensors on the inputs' device."""
        device = pred_points.device
        if len(gt_points) == 0 or len(pred_points) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty.clone()
        if self.is_sparse(len(pred_points), len(gt_points)):
            pred_index, gt_index = match_sparse(
                pred_points.detach().cpu().double().numpy(),
                gt_points.detach().cpu().double().numpy(),
                self.pair_cost_fn(logits.detach(), pred_points.detach(), gt_classes,
                                  gt_points.detach()),
                self.topk, self.candidates, _minkowski_p(self.distance))
        else:
            cost = self.cost(logits, pred_points, gt_classes, gt_points)
            pred_index, gt_index = match_cost_matrix(cost.cpu().numpy(), self.topk)
        return (torch.as_tensor(pred_index, device=device),
                torch.as_tensor(gt_index, device=device))
