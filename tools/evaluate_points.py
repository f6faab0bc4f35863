#!/usr/bin/env python
"""Score a file of predicted points against a dataset with true boxes: point AP and
counting, as the evaluator reports them after training.

    python tools/evaluate_points.py --predictions points.json \\
        (--dataset forest_test | --json gt.json --image-root images/) \\
        [--config-file configs/forest/p2p_R18_s8.yaml] [--count-threshold T] \\
        [--output-dir DIR] [KEY VALUE ...]

--predictions is a point json as tools/predict.py writes it (images with their
file names; annotations with point, score and the dataset's category_id). Its
images are matched to the dataset's by file name (the base name, so the two may
live in different folders); a dataset image without predictions counts as
empty. The point-AP settings (TEST.POINT_AP: taus, size ranges, max detections)
come from --config-file and the overrides, else detectron2's and cpr_d2's
defaults with the dataset's own size ranges. Counting uses --count-threshold,
else TEST.POINT_AP.COUNT_SCORE_THRESH. The table is printed and, with
--output-dir, point_ap_metrics.json and point_predictions.json are written there.
"""
import os
import sys

from cli_args import config_parser


def parse_args(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--predictions", required=True, help="point json of predictions")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a registered point dataset with true boxes")
    source.add_argument("--json", help="a point json with true boxes (with --image-root)")
    parser.add_argument("--image-root", help="folder of the images of --json")
    parser.add_argument("--count-threshold", type=float, default=None,
                        help="count predictions scoring above this (default: "
                             "TEST.POINT_AP.COUNT_SCORE_THRESH)")
    parser.add_argument("--output-dir", help="write point_ap_metrics.json and "
                                             "point_predictions.json here")
    args = parser.parse_args(argv)
    if args.json and not args.image_root:
        parser.error("--json needs --image-root")
    return args


def matched_outputs(predictions, records, source, dataset_name):
    """[(input, output)] for the evaluator: one per dataset record whose image the
    predictions have (matched by base file name), with Instances of the predicted points
    (category ids mapped to the dataset's class indices)."""
    import torch
    from detectron2.structures import Instances

    from cpr_d2.evaluation.evaluator import prediction_class_indices

    by_name = {}
    for r in records:
        name = os.path.basename(r["file_name"])
        if name in by_name:
            raise ValueError(f"dataset {dataset_name!r} has two images named {name} "
                             f"({by_name[name]['file_name']} and {r['file_name']}): "
                             "predictions are matched by file name")
        by_name[name] = r
    try:
        images = {im["id"]: im for im in predictions["images"]}
        annotations = predictions["annotations"]
    except (KeyError, TypeError):
        raise ValueError(f"{source}: not a point json (it needs 'images' and "
                         "'annotations'); write it with tools/predict.py") from None
    unknown = [im["file_name"] for im in images.values()
               if os.path.basename(im["file_name"]) not in by_name]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} predicted image(s) are not in dataset "
                         f"{dataset_name!r}, e.g. {unknown[0]}; evaluate on the dataset the "
                         "images come from")
    classes = prediction_class_indices(annotations, dataset_name, source)
    per_image = {k: ([], [], []) for k in images}
    for n, (a, c) in enumerate(zip(annotations, classes)):
        if a.get("image_id") not in per_image:
            raise ValueError(f"{source}: annotation {n} is for image_id {a.get('image_id')!r}, "
                             "which its 'images' do not list")
        points, scores, cls = per_image[a["image_id"]]
        points.append(a["point"])
        scores.append(a["score"])
        cls.append(c)
    pairs = []
    for image_id, (points, scores, cls) in per_image.items():
        record = by_name[os.path.basename(images[image_id]["file_name"])]
        inst = Instances((record["height"], record["width"]))
        inst.pred_points = torch.tensor(points, dtype=torch.float64).reshape(-1, 2)
        inst.scores = torch.tensor(scores, dtype=torch.float32).reshape(-1)
        inst.pred_classes = torch.tensor(cls, dtype=torch.int64).reshape(-1)
        pairs.append(({"image_id": record["image_id"]}, {"instances": inst}))
    return pairs


def main(args):
    """The evaluator's {"point_ap": {...}}."""
    # Imported here, after the arguments are parsed: --help answers without them.
    import uuid

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from cpr_d2.data import read_json, register_point_coco, register_point_jsons
    from cpr_d2.engine.defaults import merge_config, setup_logging
    from cpr_d2.evaluation import build_point_evaluator

    cfg = merge_config(args.config_file, args.opts)
    if args.count_threshold is not None:
        cfg.TEST.POINT_AP.COUNT_SCORE_THRESH = args.count_threshold
    setup_logging(args.output_dir or os.path.join(cfg.OUTPUT_DIR, "evaluate_points"))
    register_point_jsons(cfg)  # DATASETS.POINT_JSONS
    predictions = read_json(args.predictions, "--predictions",
                            fix="pass the point_predictions.json an evaluation or "
                            "tools/predict.py wrote")
    name = args.dataset
    if args.json:
        name = f"evaluate_points_{uuid.uuid4().hex[:8]}"
        register_point_coco(name, args.json, args.image_root)
    try:
        records = DatasetCatalog.get(name)
        evaluator = build_point_evaluator(cfg, name, output_dir=args.output_dir,
                                          distributed=False)
        evaluator.reset()
        for inp, out in matched_outputs(predictions, records, args.predictions, name):
            evaluator.process([inp], [out])
        results = evaluator.evaluate()
    finally:
        if args.json:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    return results


if __name__ == "__main__":
    main(parse_args())
    sys.exit(0)
