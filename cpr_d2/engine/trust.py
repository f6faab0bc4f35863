"""Whether a refinement can be trusted, from what is known without true boxes
(docs/cprnet.md, "Trusting a refinement without true boxes").

Per object, the cross-fitted refinement (cpr_d2.engine.crossfit) gives two lengths:
the move m, from the coarse point to the point refined by the model that never saw the
image, and the disagreement D, the mean distance from that point to the points of the
models that did see it. Their reliability is

    reliability = m / (m + D)        (1 for an object whose point did not move)

so an object is *unreliable* when reliability < 0.5, i.e. when models trained on
different images disagree about its point by more than the refinement moved it: the
move is then no larger than the models' own noise. The rule has no constant fitted to
any dataset; it needs at least two fold models (refine_export --folds K, K >= 2).

The dataset-level estimate warns, per class, when its refinement as a whole cannot be
trusted:

* more than half of its moved objects are unreliable (the move is mostly noise), or
* a fold model trained on fewer than MIN_TRAIN_OBJECTS objects of the class (CPRNet
  trained on about a hundred objects was seen to move a third of the points away
  from their objects' centres).

The move agreement of an object is the share of its move that the models which saw
its image reproduce: with s its move and o the mean move of those models (both from the
coarse point),

    agreement = clip(<o, s> / |s|^2, 0, 1)      (1 for an object whose point did not move)

the projection of their move onto its own, as a fraction of its length.

The trust of a moved object ranks it among the dataset's moved objects by three things:
its support <o, s> / |s| (how far, in pixels, the other models moved it its own way);
how much its move heads away from its nearest annotated neighbour (of its class, on its
image: -cos between s and the direction to that neighbour, 0 without one; a point
pulled onto a neighbour is the refinement's typical mistake among small, crowded
objects); and its move on the objects' own scale, |s| over the distance from its coarse
point to that neighbour's (0 without one: a move short for the spacing of its objects
is more often noise around a coarse point that was already good). With R the average
rank (1 = lowest) among the M moved objects whose trust is known,

    trust = (R(support) + R(away) + R(scaled move)) / (3 M)
                                                 (in (0, 1]; 1 for an unmoved object)

Ranks put pixels and cosines on one scale without a fitted weight. Being a rank within
the dataset, it orders the objects (which to look at first) but says nothing of the
dataset as a whole, so safe mode does not read it.

Safe mode, `--keep-unreliable`, decides what is written:

* ``agreed`` (the default) moves every point by the agreed part of its move, coarse +
  agreement * s: a move the other models reproduce stays whole, one they contradict is
  undone, and the rest is shortened;
* ``coarse`` keeps the coarse point of every unreliable object and moves the others
  fully;
* ``refined`` writes every refined point and only marks the unreliable ones.

When a dataset-level warning distrusts a class (too little data for it, or most of its
moved points unreliable), the ``agreed`` and ``coarse`` modes keep the coarse point of
every object of that class ("distrusted" in its row): the tool has just said that it
cannot tell good moves from bad ones there, and a point left alone is never made worse.
``refined`` writes them all.

Wherever the written point is not the refined one, the refined point stays in the json
as `refine_point`.
"""
import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import rankdata

from cpr_d2.evaluation.semantic_variance import DEFAULT_SIZE_RANGES

__all__ = [
    "DEFAULT_KEEP_UNRELIABLE",
    "KEEP_UNRELIABLE",
    "MIN_TRAIN_OBJECTS",
    "RELIABLE_AT",
    "apply_safe_mode",
    "dataset_warnings",
    "format_trust_report",
    "move_agreement",
    "move_trust",
    "object_reliability",
    "trust_report",
]

RELIABLE_AT = 0.5
LEAST_TRUSTED = 10  # how many of the least trusted points the report lists
MIN_TRAIN_OBJECTS = 200
KEEP_UNRELIABLE = ("agreed", "coarse", "refined")
DEFAULT_KEEP_UNRELIABLE = "agreed"

# The evaluator's finer size ranges, here of the size estimated from the kept points
# (no true boxes): the ones that split the sizes into disjoint parts.
_SIZE_RANGES = tuple(r for r in DEFAULT_SIZE_RANGES
                     if r[0] in ("<12 px", "12-20 px", "20-32 px", ">=32 px"))


def _move(row):
    return float(np.linalg.norm(np.subtract(row["point"], row["coarse_point"], dtype=float)))


def object_reliability(row):
    """The reliability m / (m + D) of one refined object (module doc) from its row
    (refine_dataset's, with "disagreement" from combine_fold_rows): 1.0 when its point
    did not move, None when its disagreement is unknown (a single model)."""
    move = _move(row)
    if move == 0:
        return 1.0
    disagreement = row.get("disagreement")
    if disagreement is None:
        return None
    return move / (move + float(disagreement))


def _moves(row):
    """(s, o): the object's move from its coarse point, and the mean move of the models
    in its row's "other_points" (combine_fold_rows; None without other models)."""
    coarse = np.asarray(row["coarse_point"], dtype=float)
    move = np.asarray(row["point"], dtype=float) - coarse
    others = row.get("other_points")
    if not others:
        return move, None
    return move, np.mean(np.asarray(others, dtype=float), axis=0) - coarse


def move_agreement(row):
    """The move agreement clip(<o, s> / |s|^2, 0, 1) of one refined object (module doc):
    s its move, o the mean move of the models in its row's "other_points"
    (combine_fold_rows). 1.0 when its point did not move, None without other models."""
    move, other_move = _moves(row)
    length2 = float(move @ move)
    if length2 == 0:
        return 1.0
    if other_move is None:
        return None
    return float(np.clip(other_move @ move / length2, 0.0, 1.0))


def _nearest_neighbours(rows, class_of):
    """{annotation id: (direction, distance)}: the unit vector from its coarse point to
    the nearest coarse point of another object of its class on its image ("image_id" of
    the rows) and the distance to it; (None, None) when it has none (or that point lies
    where its own does)."""
    groups = {}
    for ann_id, row in rows.items():
        groups.setdefault((row.get("image_id"), class_of.get(ann_id)), []).append(ann_id)
    out = {}
    for ids in groups.values():
        if len(ids) == 1:
            out[ids[0]] = (None, None)
            continue
        coarse = np.asarray([rows[k]["coarse_point"] for k in ids], dtype=float).reshape(-1, 2)
        # A k-d tree: an image of a crowd can hold thousands of points.
        dist, index = cKDTree(coarse).query(coarse, k=2)
        for i, ann_id in enumerate(ids):
            # The nearest point is the object itself (or one at the same place).
            d, j = dist[i, 1], index[i, 1]
            out[ann_id] = ((coarse[j] - coarse[i]) / d, float(d)) if d > 0 else (None, None)
    return out


def move_trust(rows, class_of=None):
    """{annotation id: trust} (module doc) of rows with "other_points" and "image_id"
    (combine_fold_rows's): 1.0 for an object whose point did not move, None for a moved
    one without other models; `class_of` ({annotation id: category id}) restricts the
    neighbours to the object's class."""
    class_of = class_of or {}
    nearest = _nearest_neighbours(rows, class_of)
    out, signals = {}, {}
    for ann_id, row in rows.items():
        move, other = _moves(row)
        length = float(np.linalg.norm(move))
        if length == 0:
            out[ann_id] = 1.0
            continue
        out[ann_id] = None
        if other is None:
            continue
        direction, distance = nearest[ann_id]
        signals[ann_id] = (float(other @ move) / length,  # support
                           0.0 if direction is None else -float(move @ direction) / length,
                           0.0 if distance is None else length / distance)  # scaled move
    if signals:
        ids = list(signals)
        values = np.array([signals[k] for k in ids])
        ranks = sum(rankdata(values[:, c]) for c in range(values.shape[1]))
        for ann_id, rank in zip(ids, ranks / (values.shape[1] * len(ids))):
            out[ann_id] = float(rank)
    return out


def _keep_coarse(row):
    """Set `row` back to its coarse point, keeping the refined one as "refine_point"."""
    row.update(refine_point=row["point"], point=list(row["coarse_point"]), refined=False,
               kept_coarse=True)


def apply_safe_mode(rows, keep_unreliable=DEFAULT_KEEP_UNRELIABLE, train_objects=None,
                    class_of=None):
    """Rows with "reliability", "reliable", "agreement" and "trust" (None where unknown)
    added, and the point to write set by `keep_unreliable` (module doc): "agreed" moves
    every point by the agreed part of its move ("shortened" True where that is less
    than the whole move and more than none), "coarse" sets every unreliable point back
    to its coarse point. In both, the objects of a class that a dataset-level warning
    distrusts (dataset_warnings, from `train_objects` and `class_of`, {annotation id:
    category id}; without `class_of`, any such warning distrusts every object) keep
    their coarse points ("distrusted" True). Where the point is set back to the coarse
    point, "kept_coarse" is True and "refined" False; wherever it changes,
    "refine_point" keeps the refined one. A new dict: the input rows are not changed."""
    if keep_unreliable not in KEEP_UNRELIABLE:
        raise ValueError(f"--keep-unreliable must be one of {', '.join(KEEP_UNRELIABLE)}, "
                         f"got {keep_unreliable!r}")
    judged = {}
    trust = move_trust(rows, class_of)
    for ann_id, row in rows.items():
        reliability = object_reliability(row)
        judged[ann_id] = {**row, "reliability": reliability, "agreement": move_agreement(row),
                          "reliable": None if reliability is None else reliability >= RELIABLE_AT,
                          "trust": trust[ann_id]}
    distrusted = set()
    if keep_unreliable != "refined":
        for classes, _ in dataset_warnings(judged, train_objects, class_of):
            distrusted |= classes
    if class_of is None:  # the classes are not known: a warning about one is about all
        class_of, distrusted = {}, {None} if distrusted else set()
    out = {}
    for ann_id, row in judged.items():
        agreement = row["agreement"]
        if class_of.get(ann_id) in distrusted:
            row["distrusted"] = True
            if _move(row) > 0:
                _keep_coarse(row)
        elif keep_unreliable == "coarse" and row["reliable"] is False:
            _keep_coarse(row)
        elif keep_unreliable == "agreed" and agreement is not None and agreement < 1.0:
            if agreement == 0.0:
                _keep_coarse(row)
            else:
                coarse = np.asarray(row["coarse_point"], dtype=float)
                point = coarse + agreement * (np.asarray(row["point"], dtype=float) - coarse)
                row.update(refine_point=row["point"], point=[float(v) for v in point],
                           shortened=True)
        out[ann_id] = row
    return out


def _median(values):
    return float(np.median(values)) if len(values) else None


def _range_row(name, rows):
    moved = [r for r in rows if _move_of(r) > 0]
    judged = [r for r in moved if r.get("reliable") is not None]
    unreliable = [r for r in judged if not r["reliable"]]
    disagreement = [r["disagreement"] for r in moved if r.get("disagreement") is not None]
    return {
        "size range": name,
        "objects": len(rows),
        "moved": len(moved),
        "median move px": _median([_move_of(r) for r in moved]),
        "median disagreement px": _median(disagreement),
        "unreliable": len(unreliable) if judged else None,
        "unreliable %": 100.0 * len(unreliable) / len(judged) if judged else None,
        "kept coarse": sum(bool(r.get("kept_coarse")) for r in rows),
        "shortened": sum(bool(r.get("shortened")) for r in rows),
    }


def _move_of(row):
    """The move of the refinement itself (also where safe mode kept the coarse point)."""
    return _move({**row, "point": row.get("refine_point", row["point"])})


def _unreliable_share(rows):
    """The share of the moved rows whose reliability is known that are unreliable (None
    when there is none)."""
    judged = [r for r in rows if _move_of(r) > 0 and r.get("reliable") is not None]
    return sum(not r["reliable"] for r in judged) / len(judged) if judged else None


def _fewest(train_objects):
    """(objects, fold, class) of the fold model that trained on the fewest objects of a
    class; a fold model whose training images hold no object counts as (0, fold, None)."""
    return min([(n, fold, c) for fold, per_class in train_objects.items()
                for c, n in per_class.items()]
               + [(0, fold, None) for fold, per_class in train_objects.items()
                  if not any(per_class.values())])


def dataset_warnings(rows, train_objects=None, class_of=None):
    """The dataset-level warnings (module doc) of rows with "reliable" set
    (apply_safe_mode's): a list of (classes, sentence), `classes` the set of category ids
    whose points the warning distrusts. Per class (`class_of`, {annotation id: category
    id}; without it every row is of class None): more than half of its moved points
    unreliable, or a trained fold model that saw fewer than MIN_TRAIN_OBJECTS objects of
    it (none at all counts). A fold model with no objects at all to train on is warned
    of too, and distrusts nothing: the objects of its images were not moved."""
    class_of = class_of or {}
    by_class = {}
    for ann_id, row in rows.items():
        by_class.setdefault(class_of.get(ann_id), []).append(row)
    out = []
    for c in sorted(by_class, key=str):
        share = _unreliable_share(by_class[c])
        if share is not None and share > 0.5:
            of = "" if c is None else f" of class {c}"
            out.append(({c}, (
                f"the refinement looks unreliable: for {100 * share:.0f}% of the moved points"
                f"{of}, models trained on different images disagree by more than the "
                f"refinement moved them. Annotate more images, train CPRNet with a smaller "
                f"MODEL.CPR.RADIUS, or keep the coarse points (what --keep-unreliable agreed "
                f"and --keep-unreliable coarse do for these objects)")))
    if not train_objects:
        return out
    trained = {fold: per_class for fold, per_class in train_objects.items()
               if any(per_class.values())}
    for fold, per_class in train_objects.items():
        if fold not in trained:
            out.append((set(), (
                f"too little data: fold model {fold} had no objects to train on (its "
                f"training images hold none), so the objects of its own images keep their "
                f"coarse points. Annotate more images, or use fewer folds")))
    classes = set().union(*(per_class for per_class in trained.values()))
    for c in sorted(classes, key=str):
        n, fold = min((per_class.get(c, 0), fold) for fold, per_class in trained.items())
        if n < MIN_TRAIN_OBJECTS:
            out.append(({c}, (
                f"too little data: fold model {fold} trained on only {n} objects of class {c} "
                f"(fewer than {MIN_TRAIN_OBJECTS}); CPRNet trained on so few objects can move "
                f"points away from their objects. Annotate more images, or use fewer folds "
                f"(each fold model then sees more of them)")))
    return out


def trust_report(rows, folds=1, train_objects=None, keep_unreliable=DEFAULT_KEEP_UNRELIABLE,
                 class_of=None):
    """The trust report of apply_safe_mode's rows: a dict with "ranges" (a row per range
    of the estimated object size, "all" first, then "no kept points"), "moved",
    "unreliable share" (of the moved objects whose reliability is known), "warnings"
    (sentences for a practitioner, empty when the refinement looks trustworthy; see
    dataset_warnings), "distrusted" (the objects of the classes they distrust) and
    "distrusted moved" (those of them the refinement moved), "least trusted" (the
    LEAST_TRUSTED moved objects of lowest trust, the points to look at first), "notes"
    and the settings. train_objects: {fold: {class: objects}} the fold models trained on;
    class_of: {annotation id: category id}."""
    warnings = [sentence for _, sentence in dataset_warnings(rows, train_objects, class_of)]
    distrusted = [r for r in rows.values() if r.get("distrusted")]
    ranked = sorted(((r["trust"], k) for k, r in rows.items()
                     if r.get("trust") is not None and _move_of(r) > 0), key=lambda t: t[0])
    least = [{"annotation": k, "image": rows[k].get("image_id"),
              "move px": round(_move_of(rows[k]), 2), "trust": round(t, 4)}
             for t, k in ranked[:LEAST_TRUSTED]]
    rows = list(rows.values())
    ranges = [_range_row("all", rows)]
    for name, lo, hi in _SIZE_RANGES:
        ranges.append(_range_row(name, [r for r in rows if r.get("num_kept", 1) > 0
                                        and lo <= r.get("size", 0.0) < hi]))
    ranges.append(_range_row("no kept points", [r for r in rows if r.get("num_kept", 1) == 0]))
    total = ranges[0]
    share = total["unreliable %"] / 100.0 if total["unreliable %"] is not None else None
    notes = []
    if folds < 2:
        notes.append(
            "the reliability of each point is not known with one model: rerun with --folds 2 "
            "(or more) to measure it and to keep the coarse points the models disagree on")
    fewest = _fewest(train_objects) if train_objects else None
    return {"folds": folds, "keep unreliable": keep_unreliable, "reliable at": RELIABLE_AT,
            "objects": total["objects"], "moved": total["moved"], "unreliable share": share,
            "kept coarse": total["kept coarse"], "shortened": total["shortened"],
            "distrusted": len(distrusted),
            "distrusted moved": sum(_move_of(r) > 0 for r in distrusted),
            "fewest training objects": None if fewest is None else fewest[0],
            "least trusted": least, "ranges": ranges, "warnings": warnings, "notes": notes}


def format_trust_report(report):
    """The report as text: its table, the kept-coarse count and its warnings."""
    from cpr_d2.evaluation.tables import markdown_table

    lines = ["trust in the refinement, per size estimated from the kept points (no true boxes):",
             markdown_table(report["ranges"])]
    mode = report["keep unreliable"]
    if mode == "agreed":
        lines.append(f"each point moved by the part of its move that the fold models which saw "
                     f"its image reproduce: {report['kept coarse']} kept their coarse point, "
                     f"{report['shortened']} moved part of the way (--keep-unreliable agreed)")
    elif mode is not None:
        lines.append(f"an object is unreliable when the fold models disagree by more than its "
                     f"move; {report['kept coarse']} unreliable objects kept their coarse point "
                     f"(--keep-unreliable {mode})")
    if report.get("least trusted"):
        lines += [f"the {len(report['least trusted'])} moved points of lowest trust "
                  f"(refine_trust; the ones to look at first):",
                  markdown_table(report["least trusted"])]
    lines += ["note: " + n for n in report["notes"]]
    if report["warnings"]:
        lines += ["WARNING: " + w for w in report["warnings"]]
        if mode in ("agreed", "coarse"):
            lines.append(
                f"safe mode left the {report.get('distrusted', 0)} objects of the classes these "
                f"warnings distrust at their coarse points ({report.get('distrusted moved', 0)} "
                f"of them were moved by the refinement: their refined points are in the json "
                f"as refine_point; --keep-unreliable refined writes them)")
    elif report["folds"] >= 2:
        lines.append("no warning: the fold models agree on most moved points")
    return "\n".join(lines)
