"""Where one CPRNet training step spends its time, at the forest config on the CPU.

    python benchmarks/bench_cpr_step.py [--config-file configs/forest/cpr_R18_s8_r2.yaml] [--steps 10]

Runs the step on two real 256 px forest crops, then the same step with the
earlier stages' outputs detached, so each stage's forward + backward is timed
in the same process:
  backbone = full step - (head + sampling + losses)
  head     = (head + sampling + losses) - (sampling + losses)
  sampling = negative masks + fused bag gather, forward + backward
  losses   = (sampling + losses) - sampling
Goal: head + sampling + losses <= 25% of the step.

Then the whole step again with MODEL.CPR.ADAPTIVE enabled (same weights, same
batch, same process), against the paper's step: goal <= 1.25x.

--compare-config F times the whole step of another config (its own model, the same
crops) interleaved with this one's, and prints the ratio, e.g. the stride-4 config
against the pipeline's:

    python benchmarks/bench_cpr_step.py \
        --config-file configs/forest/cpr_R18_s8_r2_c128_4x192_limit.yaml \
        --compare-config configs/forest/cpr_R18_s4_r4_c128_4x192_disc.yaml
"""
import argparse
import statistics
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import cpr_d2  # noqa: F401
from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper
from cpr_d2.data.classes import resolve_num_classes
from cpr_d2.layers import bag_gather
from cpr_d2.modeling.backbone import normalized_images


def forest_batch(cfg, mapper, count=2, min_objects=10):
    """`count` training crops of cfg.DATASETS.TRAIN[0] with >= `min_objects` objects each
    (a typical batch, not an empty corner; from the most crowded images), the same on
    every run."""
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    np.random.seed(0)  # detectron2's random crop draws from numpy
    batch = []
    for record in sorted(records, key=lambda r: -len(r["annotations"])):
        sample = mapper(record)
        if len(sample["instances"]) >= min_objects:
            batch.append(sample)
        if len(batch) == count:
            return batch
    raise RuntimeError(f"no {count} crops with >= {min_objects} objects")


def median_ms(fn, steps):
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def interleaved_ms(first, second, steps, rounds=3):
    """(first's ms, second's ms) per call: medians over `rounds` of median_ms, the two
    interleaved so that drift in the machine's speed hits both alike."""
    a, b = [], []
    for _ in range(rounds):
        a.append(median_ms(first, steps))
        b.append(median_ms(second, steps))
    return statistics.median(a), statistics.median(b)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/forest/cpr_R18_s8_r2.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compare-config", default=None,
                        help="another config whose whole step is timed against this one's")
    parser.add_argument("opts", nargs="*", help="config overrides, KEY VALUE ...")
    args = parser.parse_args()
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    resolve_num_classes(cfg, training=True)  # the forest configs take it from the data
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = forest_batch(cfg, PointDatasetMapper(cfg, is_train=True))

    images = normalized_images(batch, model.pixel_mean, model.pixel_std,
                               model.backbone.size_divisibility)
    targets = [x["instances"] for x in batch]
    points = torch.cat([t.gt_points for t in targets])
    labels = torch.cat([t.gt_classes for t in targets])
    counts = [len(t) for t in targets]
    batch_idx = torch.repeat_interleave(torch.arange(len(targets)), torch.tensor(counts))
    sizes = torch.tensor(images.image_sizes)
    c = model.num_classes

    def from_maps(cls_map, ins_map):
        bag, valid = bag_gather(torch.cat([cls_map, ins_map], 1), points, batch_idx, sizes,
                                model.radius, model.stride)
        bag_cls, bag_ins = bag.split(c, dim=2)
        return model.losses(cls_map, [(bag_cls, bag_ins, valid)], points, labels, counts,
                            images.image_sizes)

    def step(m):
        m.zero_grad(set_to_none=True)
        sum(m(batch).values()).backward()

    def full():
        step(model)

    features = model.backbone(images.tensor)[model.in_feature].detach()

    def head_on():
        f = features.clone().requires_grad_(True)
        sum(from_maps(*model.head(f)).values()).backward()

    cls_map, ins_map = (m.detach() for m in model.head(features))

    def losses_on():
        a, b = cls_map.clone().requires_grad_(True), ins_map.clone().requires_grad_(True)
        sum(from_maps(a, b).values()).backward()

    def sampling_only():
        maps = torch.cat([cls_map, ins_map], 1).requires_grad_(True)
        for pts, lab in zip(points.split(counts), labels.split(counts)):
            model._negative_logits(cls_map, pts, lab, [len(pts)], images.image_sizes)
        bag, _ = bag_gather(maps, points, batch_idx, sizes, model.radius, model.stride)
        bag.sum().backward()

    t_full = median_ms(full, args.steps)
    t_head = median_ms(head_on, args.steps)
    t_losses = median_ms(losses_on, args.steps)
    t_sampling = median_ms(sampling_only, args.steps)
    rows = [
        ("backbone (ResNet + FPN)", t_full - t_head),
        ("CPR head tower + outputs", t_head - t_losses),
        ("sampling (masks + bag gather)", t_sampling),
        ("losses", t_losses - t_sampling),
    ]
    print(f"{cfg.MODEL.RESNETS.DEPTH}-layer ResNet, stride {int(model.stride)}, R = {model.radius}, "
          f"{len(points)} objects in 2 crops of {tuple(images.tensor.shape[-2:])}, "
          f"{torch.get_num_threads()} threads; forward + backward, median of {args.steps}")
    print(f"{'part':32} {'ms':>8} {'share':>7}")
    for name, ms in rows:
        print(f"{name:32} {ms:8.1f} {100 * ms / t_full:6.1f}%")
    print(f"{'whole step':32} {t_full:8.1f} {100.0:6.1f}%")
    cpr = t_head
    print(f"CPR head + sampling + losses: {100 * cpr / t_full:.1f}% of the step (goal <= 25%)")

    adaptive_cfg = cfg.clone()
    adaptive_cfg.MODEL.CPR.ADAPTIVE.ENABLED = True
    # The paper's refinement-only keys do not combine with adaptive regions (refused);
    # they do not touch the training step.
    adaptive_cfg.MODEL.CPR.REFINE_MOVE_NEIGHBOUR_FRACTION = 0.0
    adaptive_cfg.MODEL.CPR.REFINE_RADIUS = 0
    adaptive_cfg.MODEL.CPR.REFINE_NEIGHBOUR_DISC = 0.0
    adaptive = build_model(adaptive_cfg).train()
    adaptive.load_state_dict(model.state_dict())
    paper_t, adaptive_t = interleaved_ms(full, lambda: step(adaptive), args.steps)
    a = adaptive_cfg.MODEL.CPR.ADAPTIVE
    print(f"adaptive regions ({a.STAGES} stages, {a.RINGS} rings): {adaptive_t:.1f} ms vs the "
          f"paper's {paper_t:.1f} ms per step: {adaptive_t / paper_t:.2f}x (goal <= 1.25x)")

    if args.compare_config:
        other_cfg = get_cpr_d2_cfg()
        other_cfg.merge_from_file(args.compare_config)
        resolve_num_classes(other_cfg, training=True)
        torch.manual_seed(0)
        other = build_model(other_cfg).train()
        this_t, other_t = interleaved_ms(full, lambda: step(other), args.steps)
        print(f"{args.compare_config} (stride {int(other.stride)}, R = {other.radius}): "
              f"{other_t:.1f} ms vs {this_t:.1f} ms per step on the same crops: "
              f"{other_t / this_t:.2f}x")


if __name__ == "__main__":
    main()
