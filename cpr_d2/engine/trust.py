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

The dataset-level estimate warns when the refinement as a whole cannot be trusted:

* more than half of the moved objects are unreliable (the move is mostly noise), or
* a fold model trained on fewer than MIN_TRAIN_OBJECTS objects of a class (CPRNet
  trained on about a hundred objects was seen to move a third of the points away
  from their objects' centres).

Safe mode (`--keep-unreliable coarse`) keeps the coarse point of every unreliable
object; the refined point stays in the json as `refine_point`.
"""
import numpy as np

from cpr_d2.evaluation.semantic_variance import DEFAULT_SIZE_RANGES

__all__ = [
    "KEEP_UNRELIABLE",
    "MIN_TRAIN_OBJECTS",
    "RELIABLE_AT",
    "apply_safe_mode",
    "format_trust_report",
    "object_reliability",
    "trust_report",
]

RELIABLE_AT = 0.5
MIN_TRAIN_OBJECTS = 200
KEEP_UNRELIABLE = ("coarse", "refined")

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


def apply_safe_mode(rows, keep_unreliable="coarse"):
    """Rows with "reliability" and "reliable" (None where unknown) added; with
    keep_unreliable "coarse", every unreliable object's point set back to its coarse
    point ("refine_point" keeps the refined one, "kept_coarse" True). A new dict: the
    input rows are not changed."""
    if keep_unreliable not in KEEP_UNRELIABLE:
        raise ValueError(f"--keep-unreliable must be one of {', '.join(KEEP_UNRELIABLE)}, "
                         f"got {keep_unreliable!r}")
    out = {}
    for ann_id, row in rows.items():
        reliability = object_reliability(row)
        row = {**row, "reliability": reliability,
               "reliable": None if reliability is None else reliability >= RELIABLE_AT}
        if keep_unreliable == "coarse" and row["reliable"] is False:
            row.update(refine_point=row["point"], point=list(row["coarse_point"]),
                       refined=False, kept_coarse=True)
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
    }


def _move_of(row):
    """The move of the refinement itself (also where safe mode kept the coarse point)."""
    return _move({**row, "point": row.get("refine_point", row["point"])})


def trust_report(rows, folds=1, train_objects=None, keep_unreliable="coarse"):
    """The trust report of apply_safe_mode's rows: a dict with "ranges" (a row per range
    of the estimated object size, "all" first, then "no kept points"), "moved",
    "unreliable share" (of the moved objects whose reliability is known), "warnings"
    (sentences for a practitioner, empty when the refinement looks trustworthy), "notes"
    and the settings. train_objects: {fold: {class: objects}} the fold models trained on."""
    rows = list(rows.values())
    ranges = [_range_row("all", rows)]
    for name, lo, hi in _SIZE_RANGES:
        ranges.append(_range_row(name, [r for r in rows if r.get("num_kept", 1) > 0
                                        and lo <= r.get("size", 0.0) < hi]))
    ranges.append(_range_row("no kept points", [r for r in rows if r.get("num_kept", 1) == 0]))
    total = ranges[0]
    share = total["unreliable %"] / 100.0 if total["unreliable %"] is not None else None
    warnings, notes = [], []
    if folds < 2:
        notes.append(
            "the reliability of each point is not known with one model: rerun with --folds 2 "
            "(or more) to measure it and to keep the coarse points the models disagree on")
    if share is not None and share > 0.5:
        warnings.append(
            f"the refinement looks unreliable: for {100 * share:.0f}% of the moved points, models "
            f"trained on different images disagree by more than the refinement moved them. "
            f"Annotate more images, train CPRNet with a smaller MODEL.CPR.RADIUS, or keep the "
            f"coarse points (--keep-unreliable coarse)")
    fewest = None
    if train_objects:
        # A fold model whose training images hold no object at all counts as 0 objects.
        fewest = min([(n, fold, c) for fold, per_class in train_objects.items()
                      for c, n in per_class.items()]
                     + [(0, fold, None) for fold, per_class in train_objects.items()
                        if not any(per_class.values())])
        if fewest[2] is None:
            warnings.append(
                f"too little data: fold model {fewest[1]} had no objects to train on (its "
                f"training images hold none), so the objects of its own images keep their "
                f"coarse points. Annotate more images, or use fewer folds")
        elif fewest[0] < MIN_TRAIN_OBJECTS:
            warnings.append(
                f"too little data: fold model {fewest[1]} trained on only {fewest[0]} objects of "
                f"class {fewest[2]} (fewer than {MIN_TRAIN_OBJECTS}); CPRNet trained on so few "
                f"objects can move points away from their objects. Annotate more images, or "
                f"use fewer folds (each fold model then sees more of them)")
    return {"folds": folds, "keep unreliable": keep_unreliable, "reliable at": RELIABLE_AT,
            "objects": total["objects"], "moved": total["moved"], "unreliable share": share,
            "kept coarse": total["kept coarse"],
            "fewest training objects": None if fewest is None else fewest[0],
            "ranges": ranges, "warnings": warnings, "notes": notes}


def format_trust_report(report):
    """The report as text: its table, the kept-coarse count and its warnings."""
    from cpr_d2.evaluation.tables import markdown_table

    lines = ["trust in the refinement, per size estimated from the kept points (no true boxes):",
             markdown_table(report["ranges"])]
    if report["keep unreliable"] is not None:
        lines.append(f"an object is unreliable when the fold models disagree by more than its "
                     f"move; {report['kept coarse']} unreliable objects kept their coarse point "
                     f"(--keep-unreliable {report['keep unreliable']})")
    lines += ["note: " + n for n in report["notes"]]
    if report["warnings"]:
        lines += ["WARNING: " + w for w in report["warnings"]]
    elif report["folds"] >= 2:
        lines.append("no warning: the fold models agree on most moved points")
    return "\n".join(lines)
