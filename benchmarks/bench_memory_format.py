"""A training step in torch's channels-last memory format against the default
(contiguous NCHW) one, at a forest config on the CPU, in one process.

    python benchmarks/bench_memory_format.py [--config-file configs/forest/p2p_R18_s8.yaml]
        [--steps 10] [--crops 4]

Builds the config's model twice with the same weights, one of them with its weights in
channels-last (the convolutions then compute and return channels-last maps), and times
forward + backward on the same real training crops (the config's mapper), interleaved
so that drift in the machine's speed hits both alike.
Also prints the largest difference between the two models' losses and gradients: the
layouts compute the same function with sums in another order.
"""
import argparse
import copy

import torch
from detectron2.modeling import build_model

import cpr_d2  # noqa: F401
from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import PointDatasetMapper
from cpr_d2.data.classes import resolve_num_classes

# Scripts in benchmarks/ run with this folder on sys.path.
from bench_cpr_step import forest_batch, interleaved_ms  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/forest/p2p_R18_s8.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--crops", type=int, default=None,
                        help="crops per step (default: the config's SOLVER.IMS_PER_BATCH)")
    parser.add_argument("opts", nargs="*", help="config overrides, KEY VALUE ...")
    args = parser.parse_args()
    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    resolve_num_classes(cfg, training=True)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    # Four 192 px crops hold fewer trees than two of 256 px: at least 5 each.
    batch = forest_batch(cfg, PointDatasetMapper(cfg, is_train=True),
                         args.crops or cfg.SOLVER.IMS_PER_BATCH, min_objects=5)

    def step(m, b):
        m.zero_grad(set_to_none=True)
        losses = m(b)
        sum(losses.values()).backward()
        return losses

    a, b = step(model, batch), step(last, batch)
    loss_diff = max(abs(a[k].item() - b[k].item()) for k in a)
    grad_diff = max((p.grad - q.grad).abs().max().item()
                    for p, q in zip(model.parameters(), last.parameters()) if p.grad is not None)
    nchw, nhwc = interleaved_ms(lambda: step(model, batch), lambda: step(last, batch),
                                args.steps)
    shape = tuple(batch[0]["image"].shape[-2:])
    print(f"{args.config_file}: {len(batch)} crops of {shape}, {torch.get_num_threads()} threads, "
          f"forward + backward, median of {args.steps} (3 interleaved rounds)")
    print(f"{'layout':16} {'ms':>8}")
    print(f"{'NCHW (default)':16} {nchw:8.1f}")
    print(f"{'channels-last':16} {nhwc:8.1f}")
    print(f"channels-last / default: {nhwc / nchw:.2f}x; largest difference: loss {loss_diff:.2e}, "
          f"gradient {grad_diff:.2e}")


if __name__ == "__main__":
    main()
