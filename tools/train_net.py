#!/usr/bin/env python
"""Train or evaluate a cpr_d2 model (CPRNet or P2PNet: the config's META_ARCHITECTURE decides).

    python tools/train_net.py --config-file configs/forest/cpr_R18_s8.yaml [--eval-only]
        [--resume] [--num-gpus N | --num-gpus 0 --num-workers N] [KEY VALUE ...]

--eval-only loads MODEL.WEIGHTS (with --resume: the last checkpoint of OUTPUT_DIR)
and evaluates on DATASETS.TEST (CPRNet: semantic variance of coarse vs refined
points; P2PNet: point AP). Several processes:
--num-gpus N (one per CUDA GPU, NCCL) or --num-gpus 0 --num-workers N (CPU, gloo);
SOLVER.IMS_PER_BATCH is the total batch over all of them (see cpr_d2/engine/launch.py).
"""
from cli_args import launch_parser


def main(args):
    # Imported here, after the arguments are parsed: --help answers without them.
    from cpr_d2.engine import Trainer, setup_cfg
    from cpr_d2.engine.checkpoint import load_evaluation_weights

    cfg = setup_cfg(args, training=not args.eval_only)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_evaluation_weights(cfg, model, args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # The final evaluation's results (DefaultTrainer.train returns them only
    # when TEST.EXPECTED_RESULTS is set).
    return getattr(trainer, "_last_eval_results", None)


def argument_parser():
    """detectron2's default_argument_parser flags plus --num-workers and --backend."""
    return launch_parser(__doc__)


if __name__ == "__main__":
    args = argument_parser().parse_args()
    from cpr_d2.engine.launch import launch_from_args

    launch_from_args(main, args)
