"""Command-line arguments of the tools, built from the standard library alone.

A tool parses its arguments before it imports torch, detectron2 or cpr_d2
(seconds of imports), so `--help` and usage errors answer at once. The flags
are those of detectron2's `default_argument_parser` (the same names, defaults
and meaning), plus cpr_d2's launch flags; `cpr_d2.engine.launch.check_launch`
checks their combinations once the tool runs.
"""
import argparse
import os
import re

BACKENDS = ("auto", "nccl", "gloo")  # cpr_d2.engine.launch.BACKENDS
# --keep-unreliable: cpr_d2.engine.trust.KEEP_UNRELIABLE, DEFAULT_KEEP_UNRELIABLE.
KEEP_UNRELIABLE = ("agreed", "coarse", "refined")
DEFAULT_KEEP_UNRELIABLE = "agreed"
# A config override's key (e.g. MODEL.WEIGHTS).
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")

_OPTS_HELP = ("config overrides as KEY VALUE pairs, last on the command line, e.g. "
              "SOLVER.MAX_ITER 100 MODEL.WEIGHTS model_final.pth; keys and their meaning: "
              "cpr_d2/config.py and detectron2's config/defaults.py")


def config_parser(description, opts=True):
    """A parser with --config-file and (when `opts`) trailing KEY VALUE overrides;
    `description` is shown as written (a tool's docstring)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    if opts:
        parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help=_OPTS_HELP)
    return parser


def launch_parser(description, training=True):
    """config_parser plus the launch flags: detectron2's --num-gpus, --num-machines,
    --machine-rank and --dist-url, and cpr_d2's --num-workers and --backend (see
    cpr_d2/engine/launch.py); with `training`, --resume and --eval-only too."""
    parser = config_parser(description, opts=False)
    if training:
        parser.add_argument("--resume", action="store_true",
                            help="continue from the last checkpoint of OUTPUT_DIR (a damaged "
                                 "one falls back to the one before it); with --eval-only, "
                                 "evaluate that checkpoint")
        parser.add_argument("--eval-only", action="store_true",
                            help="evaluate MODEL.WEIGHTS on DATASETS.TEST, no training")
    parser.add_argument("--num-gpus", type=int, default=1, help="number of GPUs per machine")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0,
                        help="the rank of this machine (unique per machine)")
    # detectron2's default URL is a port fixed per user: a second job started on the
    # machine at the same time fails with EADDRINUSE. "auto" picks a free port on one
    # machine; jobs over several machines must name machine 0's address.
    parser.add_argument("--dist-url", default="auto",
                        help="initialization URL for torch.distributed: 'auto' (one machine) "
                             "or tcp://<machine 0's address>:<port>")
    parser.add_argument(
        "--num-workers", type=int, default=0, metavar="N",
        help="CPU processes per machine (gloo) when --num-gpus is 0; 0 or 1 runs in this "
             "process. Not the data loader workers (DATALOADER.NUM_WORKERS)")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="torch.distributed backend: auto (nccl with --num-gpus >= 1, gloo with "
             "--num-gpus 0), nccl (CUDA GPUs) or gloo (CPU processes, needs --num-gpus 0)")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help=_OPTS_HELP)
    return parser


def hand_back_overrides(args, name="input"):
    """`--input a.png MODEL.WEIGHTS m.pth`: an nargs="+" option swallows the overrides
    that follow it. Move them, from the first upper-case dotted key that is not an
    existing file, back to args.opts."""
    values = getattr(args, name)
    for k, item in enumerate(values):
        if CONFIG_KEY.match(item) and not os.path.exists(item):
            args.opts = values[k:] + list(args.opts)
            setattr(args, name, values[:k])
            break
    return args
