#!/usr/bin/env python
"""Fit a trained P2PNet's counting again on annotated images, without training.

    python tools/calibrate_count.py --config-file configs/forest/p2p_R18_s8.yaml \\
        --output model_recounted.pth [--datasets NAME [NAME ...]] \\
        MODEL.WEIGHTS output/forest/p2p_R18_s8/model_final.pth

The model predicts every image of --datasets (registered datasets; default: the
config's DATASETS.TRAIN, the images training calibrates on) and chooses its counting
threshold on them, and with MODEL.P2PNET.COUNT_RULE "soft" fits its soft count
(MODEL.P2PNET.COUNT_SOFT_FIT says which way), exactly as training does after its
last step (cpr_d2/engine/count_calibration.py). It writes a copy of MODEL.WEIGHTS with
the new `count_threshold` and `count_soft` to --output; every other weight is copied
unchanged, and MODEL.WEIGHTS itself is never written to.

For: a model trained before the soft count was fitted the inverse way; or images of
the kind you will count (another site, denser stands), annotated with points and
registered with DATASETS.POINT_JSONS, which count better calibrated on their own
kind (docs/p2pnet.md, "The soft count"). A dataset of DATASETS.TEST is refused: a
count calibrated on the test set says nothing about new images.
"""
import sys

from cli_args import config_parser, hand_back_overrides


def parse_args(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--output", required=True,
                        help="the checkpoint to write (a new file, e.g. model_recounted.pth)")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                        help="registered datasets to calibrate on (default: DATASETS.TRAIN)")
    args = parser.parse_args(argv)
    if args.datasets:
        hand_back_overrides(args, name="datasets")
    return args


def check_datasets(cfg, names):
    """The dataset names to calibrate on, checked: registered, not of DATASETS.TEST."""
    from detectron2.data import DatasetCatalog

    names = list(names) if names else list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("no dataset to calibrate on: pass --datasets NAME, or set "
                         "DATASETS.TRAIN in the config")
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise ValueError(f"--datasets: {name!r} is not a registered dataset; register a "
                             "point json with DATASETS.POINT_JSONS '((\"NAME\", \"points.json\", "
                             "\"image_root\"),)' on the command line (docs/data.md), or use a "
                             "built-in one such as forest")
        if name in tuple(cfg.DATASETS.TEST):
            raise ValueError(f"--datasets: {name!r} is the config's test set (DATASETS.TEST); a "
                             "count calibrated on the images it is judged on means nothing. "
                             "Calibrate on training images or on annotated images kept apart "
                             "from the test set")
    return names


def write_checkpoint(weights, output, threshold, soft):
    """Copy the checkpoint `weights` to `output` (atomically) with the counting buffers
    replaced; everything else in the file (every other weight, what the trainer stored
    beside them) is copied as it is."""
    import torch

    from cpr_d2.utils.io import atomic_path

    data = torch.load(weights, map_location="cpu", weights_only=False)
    state = data["model"] if isinstance(data, dict) and isinstance(data.get("model"), dict) \
        else data
    state["count_threshold"] = threshold.detach().cpu().clone()
    state["count_soft"] = soft.detach().cpu().clone()
    with atomic_path(output) as tmp:
        torch.save(data, tmp)


def main(args):
    # Imported here, after the arguments are parsed: --help answers without them.
    import logging

    from detectron2.data import DatasetCatalog, build_detection_test_loader

    from cpr_d2.data.mapper import PointDatasetMapper
    from cpr_d2.engine import setup_cfg
    from cpr_d2.engine.count_calibration import (calibrate_count_threshold,
                                                 check_count_calibration, log_calibration)
    from cpr_d2.engine.predictor import PointPredictor
    from cpr_d2.utils.io import check_output_file

    cfg = setup_cfg(args, output_subdir="calibrate_count")
    logger = logging.getLogger("cpr_d2.calibrate_count")
    if cfg.MODEL.META_ARCHITECTURE != "P2PNet":
        raise ValueError(f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}: only a "
                         "P2PNet counts; pass a P2PNet config (e.g. "
                         "configs/forest/p2p_R18_s8.yaml)")
    check_count_calibration(cfg)
    check_output_file(args.output, example="model_recounted.pth", inputs=[cfg.MODEL.WEIGHTS],
                      inputs_are="MODEL.WEIGHTS, the trained model",
                      inputs_fix="write the recalibrated model to a new file")
    names = check_datasets(cfg, args.datasets)
    dicts = [d for name in names for d in DatasetCatalog.get(name)]
    if not dicts:
        raise ValueError(f"--datasets {' '.join(names)}: no images to calibrate on")
    model = PointPredictor(cfg).model
    before = float(model.count_threshold), [float(v) for v in model.count_soft]
    loader = build_detection_test_loader(dicts, mapper=PointDatasetMapper(cfg, is_train=False),
                                         num_workers=0)
    soft_fit = cfg.MODEL.P2PNET.COUNT_SOFT_FIT
    threshold, mae, n = calibrate_count_threshold(model, loader, dicts, soft_fit=soft_fit)
    log_calibration(model, f"{', '.join(names)} ({n} images)", threshold, mae, n, soft_fit)
    write_checkpoint(cfg.MODEL.WEIGHTS, args.output, model.count_threshold, model.count_soft)
    logger.info(f"Wrote {args.output}: MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} with the counting "
                f"threshold {before[0]:.4f} -> {threshold:.4f} and the soft count "
                f"{before[1]} -> {[round(float(v), 6) for v in model.count_soft]} "
                "((-1, 0): none)")
    return threshold, mae, n


if __name__ == "__main__":
    main(parse_args())
    sys.exit(0)
