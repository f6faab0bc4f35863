#!/usr/bin/env python
"""Refine every annotated point of a dataset with a trained CPRNet and write the json.

    python tools/refine_export.py --config-file configs/forest/cpr_R18_s8_r2.yaml \\
        (--dataset forest | --json points.json --image-root images/) --output refined.json \\
        MODEL.WEIGHTS output/forest/cpr_R18_s8_r2/model_final.pth

The output keeps every field of the input json; each refined annotation (matched
by id) gets the refined `point`, the replaced `coarse_point` and `refine_score`.
It is written atomically (a killed run leaves no partial file) and loads
straight into register_point_coco, e.g. to train P2PNet on refined points.
--output is checked before any work: it must be a file path (not a folder, not
the input json) in a folder that exists or can be created, and that this user can
write in.
With true boxes in the json, the semantic variance before and after is printed.

--folds K (K >= 2) cross-fits the refinement: K CPRNets train, with the config's
training settings (MODEL.WEIGHTS is then their initialisation, as for train_net), each
on every image fold but its own, and each image is refined by the model that never saw
it. The fold models go to OUTPUT_DIR/refine_export/crossfit_<K>/fold_<k>/ (a rerun
skips those already trained); each annotation also gets `refine_fold` and
`refine_disagreement`, the distance in pixels from its point to the other fold
models' points. A fold model whose training images hold no objects is not trained:
the objects of its fold keep their coarse points, and the report warns. --folds 1
(the default) refines with the one model MODEL.WEIGHTS.

A trust report that needs no true boxes is printed and written beside the json
(refined.json -> refined.trust.json): per range of the object size estimated from the
kept points, how many points moved, how far, how much the fold models disagree, and
how many are unreliable. With --folds >= 2 a point is unreliable when models trained
on different images disagree about it by more than the refinement moved it, and its
move agreement is the share of its move that the models which saw its image
reproduce; each annotation then gets `refine_reliability`, `refine_reliable`,
`refine_agreement` and `refine_trust` (a ranking of the moved points, from the other
models' support, the move's heading relative to the nearest neighbour and its length
relative to that neighbour's distance; the report lists the least trusted). --keep-unreliable decides what is written: agreed (the
default) moves every point by the agreed part of its move, coarse keeps the coarse
point of the unreliable ones and moves the others fully, refined writes every refined
point; wherever the written point is not the refined one, the refined point stays as
`refine_point`. With one model the json is as before and the report only measures the
moves. The report ends with a warning, per class, when the refinement looks
unreliable (too little data, or fold models that disagree); agreed and coarse then
keep every coarse point of that class (`refine_distrusted`).

Several processes share the images: --num-gpus N (CUDA, NCCL) or --num-gpus 0
--num-workers N (CPU, gloo); the main process writes the json.
"""
import argparse
import hashlib
import os
import sys

from cli_args import DEFAULT_KEEP_UNRELIABLE, KEEP_UNRELIABLE, launch_parser


def parse_args(argv=None):
    parser = launch_parser(__doc__, training=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a registered point dataset (e.g. forest)")
    source.add_argument("--json", help="a point json to refine (with --image-root)")
    parser.add_argument("--image-root", help="folder of the images of --json")
    parser.add_argument("--output", required=True, help="refined json to write")
    parser.add_argument("--folds", type=int, default=1,
                        help="cross-fit over K image folds: train K CPRNets and refine each "
                             "image with the one that never saw it (default 1: MODEL.WEIGHTS)")
    parser.add_argument("--keep-unreliable", choices=KEEP_UNRELIABLE, default=None,
                        help="with --folds >= 2: move every point by the part of its move the "
                             "other fold models reproduce (agreed, the default), keep the "
                             "coarse point where they disagree by more than the move (coarse), "
                             "or write every refined point (refined); agreed and coarse keep "
                             "every coarse point of a class the report warns about")
    args = parser.parse_args(argv)
    if args.keep_unreliable and args.folds < 2:
        parser.error("--keep-unreliable needs --folds 2 or more: a point's reliability is the "
                     "agreement of fold models trained on different images")
    if args.json and not args.image_root:
        parser.error("--json needs --image-root")
    if args.folds < 1:
        parser.error(f"--folds must be >= 1, got {args.folds}")
    return args


def main(args):
    # Imported here, after the arguments are parsed: --help answers without them.
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils import comm

    from cpr_d2.data import dataset_files, read_json, register_point_coco
    from cpr_d2.engine import Trainer, load_inference_weights, setup_cfg
    from cpr_d2.engine.crossfit import crossfit_refine, image_folds, training_objects
    from cpr_d2.engine.trust import apply_safe_mode, format_trust_report, trust_report
    from cpr_d2.utils.io import write_json_atomic
    from cpr_d2.engine.refine import check_refined_output, export_refined, refine_dataset
    from cpr_d2.evaluation.semantic_variance import compare_point_jsons, format_comparison

    # Before any work: a refinement whose json cannot be written is lost.
    check_refined_output(args.output, args.json)
    report_file = trust_report_path(args.output)
    check_refined_output(report_file, args.json, flag=TRUST_FLAG)
    name = args.dataset
    if args.json:
        # The same name in every process (the fold models' datasets derive from it).
        name = f"refine_export_{hashlib.sha1(os.path.abspath(args.json).encode()).hexdigest()[:8]}"
        register_point_coco(name, args.json, args.image_root)
    try:
        if args.folds > 1:  # the fold models train on `name`'s images: its classes
            args = argparse.Namespace(**vars(args))
            args.opts = list(args.opts) + ["DATASETS.TRAIN", repr((name,))]
        cfg = setup_cfg(args, output_subdir="refine_export", training=args.folds > 1)
        if cfg.MODEL.META_ARCHITECTURE != "CPRNet":
            raise ValueError(f"{args.config_file} builds {cfg.MODEL.META_ARCHITECTURE}; "
                             "refinement needs a CPRNet config")
        if args.json:
            source_json, image_root = args.json, args.image_root
        else:  # registered by now (DATASETS.POINT_JSONS too)
            source_json, image_root = dataset_files(name)
            check_refined_output(args.output, source_json)
            check_refined_output(report_file, source_json, flag=TRUST_FLAG)
        if args.folds > 1:
            refined = crossfit_refine(cfg, name, source_json, image_root, args.folds,
                                      os.path.join(cfg.OUTPUT_DIR, f"crossfit_{args.folds}"))
        else:
            model = Trainer.build_model(cfg)
            load_inference_weights(model, cfg.MODEL.WEIGHTS)
            refined = refine_dataset(cfg, model, name)
    finally:
        if args.json:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    if not comm.is_main_process():
        return None
    keep = args.keep_unreliable or DEFAULT_KEEP_UNRELIABLE
    source = read_json(source_json, "point json")
    trained = class_of = None
    if args.folds > 1:  # one model: no reliability, the json as without the report
        trained = training_objects(source, image_folds(source.get("images", []), args.folds))
        class_of = {a.get("id"): a.get("category_id") for a in source.get("annotations", [])}
        refined = apply_safe_mode(refined, keep, trained, class_of)
    source, data, count = export_refined(source_json, refined, args.output, source)
    moved = sum(r["refined"] for r in refined.values())
    print(f"refined {count} of {len(source.get('annotations', []))} annotations "
          f"({moved} moved, {count - moved} kept their point); wrote {args.output}")
    try:
        print(format_comparison(compare_point_jsons(source, data), names=("coarse", "refined")))
    except ValueError as e:  # no true boxes: nothing to compare
        print(f"semantic variance not measured: {e}")
    report = trust_report(refined, args.folds, trained, keep if args.folds > 1 else None,
                          class_of)
    write_json_atomic(report, report_file, indent=1)
    # Last, so that the warnings are what the user reads when the tool ends.
    print(format_trust_report(report))
    print(f"wrote the trust report {report_file}")
    return refined


TRUST_FLAG = "the trust report beside --output,"


def trust_report_path(output):
    """refined.json -> refined.trust.json, beside the refined json."""
    return os.path.splitext(output)[0] + ".trust.json"


if __name__ == "__main__":
    args = parse_args()
    from cpr_d2.engine.launch import launch_from_args

    launch_from_args(main, args)
    sys.exit(0)
