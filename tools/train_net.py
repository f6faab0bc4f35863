#!/usr/bin/env python
"""Train or evaluate a cpr_d2 model (CPRNet or P2PNet: the config's META_ARCHITECTURE decides).

    python tools/train_net.py --config-file configs/forest/cpr_R18_s8.yaml [--eval-only]
        [--resume] [--num-gpus N] [KEY VALUE ...]

Training runs through detectron2's launch(); --eval-only loads MODEL.WEIGHTS and
evaluates on DATASETS.TEST (CPRNet: semantic variance of coarse vs refined
points; P2PNet: point AP).
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch

import cpr_d2  # noqa: F401  (registers datasets and models)
from cpr_d2.engine import Trainer, setup_cfg


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # The final evaluation's results (DefaultTrainer.train returns them only
    # when TEST.EXPECTED_RESULTS is set).
    return getattr(trainer, "_last_eval_results", None)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
