"""What the training augmentations cost: the P2PNet training mapper with and without
them, beside a training step, in one process.

    python benchmarks/bench_augment.py [--config-file configs/forest/p2p_R18_s8.yaml]
        [--steps 10] [--rounds 3] [KEY VALUE ...]

The config as given (its INPUT.POINT_AUG, overridden by KEY VALUE pairs) is "with"; the
same config with every INPUT.POINT_AUG option off is "without". Printed: the mapper's
median time per training image of each (every training record mapped once per round, the
two interleaved), the difference per step of SOLVER.IMS_PER_BATCH images, and the median
forward + backward of one step on a batch of that size, so that the last line is the
share of a step the augmentations add.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpr_d2  # noqa: E402,F401
from cpr_d2.config import get_cpr_d2_cfg  # noqa: E402
from cpr_d2.data import PointDatasetMapper  # noqa: E402
from cpr_d2.data.classes import resolve_num_classes  # noqa: E402

# Scripts in benchmarks/ run with this folder on sys.path.
from bench_cpr_step import median_ms  # noqa: E402

# Every INPUT.POINT_AUG option at its default, which is off.
OFF = get_cpr_d2_cfg().INPUT.POINT_AUG


def augmentations_off(cfg):
    off = cfg.clone()
    off.defrost()
    off.INPUT.POINT_AUG = OFF.clone()
    return off


def ms_per_image(mapper, records):
    start = time.perf_counter()
    for record in records:
        mapper(dict(record))
    return 1e3 * (time.perf_counter() - start) / len(records)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="configs/forest/p2p_R18_s8.yaml")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the training set")
    parser.add_argument("opts", nargs="*", help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    resolve_num_classes(cfg, training=True)
    off = augmentations_off(cfg)
    aug = {k: getattr(cfg.INPUT.POINT_AUG, k) for k in OFF
           if getattr(cfg.INPUT.POINT_AUG, k) != OFF[k]}
    if not aug:
        raise SystemExit(f"{args.config_file} turns no INPUT.POINT_AUG option on: nothing to "
                         "compare; pass one, e.g. INPUT.POINT_AUG.SCALE '(0.8, 1.25)'")
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    mappers = {"with": PointDatasetMapper(cfg, is_train=True),
               "without": PointDatasetMapper(off, is_train=True)}
    np.random.seed(0)
    for mapper in mappers.values():  # warm-up: file cache, first allocations
        ms_per_image(mapper, records[:4])
    times = {name: [] for name in mappers}
    for _ in range(args.rounds):
        for name, mapper in mappers.items():
            times[name].append(ms_per_image(mapper, records))
    med = {name: statistics.median(t) for name, t in times.items()}

    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = [mappers["with"](dict(r)) for r in records[:cfg.SOLVER.IMS_PER_BATCH]]

    def step():
        model.zero_grad()
        sum(model(batch).values()).backward()

    step_ms = median_ms(step, args.steps)  # after one warm-up step
    per_step = (med["with"] - med["without"]) * cfg.SOLVER.IMS_PER_BATCH
    print(f"augmentations on: {aug}; {len(records)} training images of "
          f"{cfg.DATASETS.TRAIN[0]}, {args.rounds} rounds, torch {torch.get_num_threads()} threads")
    print("| what | ms |\n| --- | ---: |")
    print(f"| mapper per image, without | {med['without']:.2f} |")
    print(f"| mapper per image, with | {med['with']:.2f} |")
    print(f"| difference per step ({cfg.SOLVER.IMS_PER_BATCH} images) | {per_step:.2f} |")
    print(f"| training step, forward + backward | {step_ms:.0f} |")
    print(f"added per step: {100 * per_step / step_ms:.1f}% of the step "
          f"(ratio with / without, mapper: {med['with'] / med['without']:.2f})")


if __name__ == "__main__":
    main()
