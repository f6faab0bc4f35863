#!/usr/bin/env python
"""Train or evaluate a cpr_d2 model (CPRNet or P2PNet: the config's META_ARCHITECTURE decides).

    python tools/train_net.py --config-file configs/forest/cpr_R18_s8.yaml [--eval-only]
        [--resume] [--num-gpus N | --num-gpus 0 --num-workers N] [KEY VALUE ...]

--eval-only loads MODEL.WEIGHTS and evaluates on DATASETS.TEST (CPRNet: semantic
variance of coarse vs refined points; P2PNet: point AP). Several processes:
--num-gpus N (one per CUDA GPU, NCCL) or --num-gpus 0 --num-workers N (CPU, gloo);
SOLVER.IMS_PER_BATCH is the total batch over all of them (see cpr_d2/engine/launch.py).
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser

import cpr_d2  # noqa: F401  (registers datasets and models)
from cpr_d2.engine import Trainer, load_inference_weights, setup_cfg
from cpr_d2.engine.launch import add_launch_arguments, launch_from_args


def main(args):
    cfg = setup_cfg(args, training=not args.eval_only)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if args.resume and checkpointer.has_checkpoint():
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
        else:
            load_inference_weights(model, cfg.MODEL.WEIGHTS)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # The final evaluation's results (DefaultTrainer.train returns them only
    # when TEST.EXPECTED_RESULTS is set).
    return getattr(trainer, "_last_eval_results", None)


def argument_parser():
    """detectron2's default_argument_parser plus --num-workers and --backend."""
    return add_launch_arguments(default_argument_parser())


if __name__ == "__main__":
    launch_from_args(main, argument_parser().parse_args())
