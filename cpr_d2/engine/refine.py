"""Refine every annotation of a dataset with a trained CPRNet and export the result."""
import copy
import itertools
import logging

import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.utils import comm
from tqdm import tqdm

from cpr_d2.data import PointDatasetMapper, read_json
from cpr_d2.data.checks import check_images_of
from cpr_d2.utils.io import check_output_file, write_json_atomic
from cpr_d2.utils.threads import machine_share

__all__ = ["check_refined_output", "export_refined", "refine_dataset", "refined_json"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def refine_dataset(cfg, model, dataset_name, progress=True):
    """{annotation id: {"point", "score", "coarse_point", "refined", "num_kept", "size"}}
    for every object CPRNet saw (crowd objects and points off their image are not
    refined); "size" is the object's size estimated from its kept points (pixels, 0
    when none is kept).

    Runs on this process's share of the dataset and gathers all shares on the
    main process (other processes get {}).
    """
    dicts = DatasetCatalog.get(dataset_name)
    check_images_of(cfg, (dataset_name,), dicts)  # every image, before the first is refined
    records = {r["image_id"]: r for r in dicts}
    mapper = PointDatasetMapper(cfg, is_train=False, with_annotations=True)
    # The loaded dicts, not the name: the loader would load the json a second time.
    loader = build_detection_test_loader(dicts, mapper=mapper,
                                         num_workers=cfg.DATALOADER.NUM_WORKERS)
    was_training = model.training
    model.eval()
    rows = {}
    with machine_share() as share:
        try:
            show = progress and comm.is_main_process()
            for inputs in tqdm(loader, desc=f"refining {dataset_name}", disable=not show):
                share.recheck()
                for inp, out in zip(inputs, model(inputs)):
                    inst = out["instances"].to("cpu")
                    anns = records[inp["image_id"]]["annotations"]
                    for k, index in enumerate(inst.gt_ann_index.tolist()):
                        rows[anns[index]["id"]] = {
                            "point": inst.pred_points[k].tolist(),
                            "score": float(inst.scores[k]),
                            "coarse_point": inst.coarse_points[k].tolist(),
                            "refined": bool(inst.refined[k]),
                            "num_kept": int(inst.num_kept[k]),
                            "size": float(inst.est_sizes[k]),
                        }
        finally:
            model.train(was_training)
    if comm.get_world_size() > 1:
        gathered = comm.gather(rows, dst=0)
        if not comm.is_main_process():
            return {}
        rows = dict(itertools.chain.from_iterable(r.items() for r in gathered))
    return rows


def refined_json(source, refined):
    """A copy of the point json `source` (a dict) whose annotations, matched by id, have
    `point` replaced by the refined point, plus `coarse_point` (the point it replaced)
    and `refine_score`; cross-fitted rows add `refine_fold` and `refine_disagreement`
    (pixels), rows of cpr_d2.engine.trust.apply_safe_mode `refine_reliability`,
    `refine_reliable`, `refine_agreement`, `refine_trust` and `refine_size` (the size
    estimated from the kept points), and `refine_distrusted` True for the objects of a
    class a dataset-level warning distrusts. Where safe mode kept the coarse point,
    `point` stays the coarse point; where it wrote any point but the refined one,
    `refine_point` holds the refined one. Every other field is kept; annotations
    without a refinement are left as they are. Returns (json dict, number of
    annotations refined)."""
    out = copy.deepcopy(source)
    count = 0
    for ann in out.get("annotations", []):
        row = refined.get(ann.get("id"))
        if row is None:
            continue
        ann["coarse_point"] = ann["point"] if "point" in ann else row["coarse_point"]
        ann["point"] = ann["coarse_point"] if row.get("kept_coarse") else row["point"]
        ann["refine_score"] = row["score"]
        if "fold" in row:  # cross-fitted (cpr_d2.engine.crossfit)
            ann["refine_fold"] = row["fold"]
            ann["refine_disagreement"] = row["disagreement"]
        if "reliability" in row:  # cpr_d2.engine.trust
            ann["refine_reliability"] = row["reliability"]
            ann["refine_reliable"] = row["reliable"]
            ann["refine_agreement"] = row.get("agreement")
            ann["refine_trust"] = row.get("trust")
            ann["refine_size"] = row.get("size")
            if row.get("distrusted"):
                ann["refine_distrusted"] = True
        if "refine_point" in row:  # safe mode wrote another point than the refined one
            ann["refine_point"] = row["refine_point"]
        count += 1
    return out, count


def check_refined_output(output, source_json=None, flag="--output"):
    """Raise a ValueError naming --output and the fix unless the refined json can be
    written there (cpr_d2.utils.io.check_output_file): not a folder, not `source_json`
    (the input), in a folder this user can create files in. Nothing is created."""
    check_output_file(
        output, flag=flag, what="json", example="refined.json", inputs=[source_json] if source_json else [],
        inputs_are=f"the input json {source_json}",
        inputs_fix="write the refined points to a new file (the output keeps every field of "
                   "the input, the coarse points included)")


def export_refined(source_json, refined, output, source=None):
    """Write refined_json(...) atomically to `output` (checked by check_refined_output:
    never over `source_json`); `source`, the json already read from `source_json`, spares
    a second read."""
    check_refined_output(output, source_json)
    if source is None:
        source = read_json(source_json)
    data, count = refined_json(source, refined)
    write_json_atomic(data, output)
    return source, data, count
