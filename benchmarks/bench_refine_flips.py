"""What flip-averaged refinement (MODEL.CPR.REFINE_FLIPS) costs: CPRNet refinement of
whole forest tiles with one view and with the flips, interleaved in one process.

    python benchmarks/bench_refine_flips.py [--config-file configs/forest/cpr_R18_s8_r2_c128_4x192_limit.yaml]
        [--images 6] [--rounds 3] [KEY VALUE ...]

The model is untrained (its weights do not change the time). Per setting it prints the
median time per tile over the rounds and the ratio to one view; the views run one after
the other, so the ratio should be close to the number of views.
"""
import argparse
import statistics
import time

import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import cpr_d2  # noqa: F401
from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper
from cpr_d2.data.classes import resolve_num_classes

SETTINGS = (("one view (the paper)", []), ("+ horizontal", ["horizontal"]),
            ("+ horizontal, vertical, both", ["horizontal", "vertical", "both"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/forest/cpr_R18_s8_r2_c128_4x192_limit.yaml")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    resolve_num_classes(cfg, training=True)
    cfg.MODEL.DEVICE = "cpu"
    mapper = PointDatasetMapper(cfg, is_train=False, with_annotations=True)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    samples = [mapper(r) for r in sorted(records, key=lambda r: -len(r["annotations"]))
               [:args.images]]
    torch.manual_seed(0)
    models = []
    for _, flips in SETTINGS:
        c = cfg.clone()
        c.MODEL.CPR.REFINE_FLIPS = flips
        model = build_model(c).eval()
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model)
    times = [[] for _ in SETTINGS]
    with torch.no_grad():
        for model in models:  # warm-up
            model(samples[:1])
        for _ in range(args.rounds):
            for k, model in enumerate(models):
                start = time.perf_counter()
                for sample in samples:
                    model([sample])
                times[k].append((time.perf_counter() - start) / len(samples))
    objects = sum(len(s["instances"]) for s in samples)
    print(f"{args.config_file}: {len(samples)} tiles ({objects} objects), {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    base = statistics.median(times[0])
    print("| views | ms per tile | ratio to one view |")
    print("| --- | ---: | ---: |")
    for (name, _), t in zip(SETTINGS, times):
        med = statistics.median(t)
        print(f"| {name} | {1000 * med:.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
