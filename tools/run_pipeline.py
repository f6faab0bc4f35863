#!/usr/bin/env python
"""The whole CPR pipeline in one command: coarse points -> CPRNet -> refined points ->
P2PNet on coarse, refined and true-centre points -> point AP on the test set -> one table.

    python tools/run_pipeline.py [--output DIR] [--quick] [--seed 0 | --seeds 0 1 2]
        [--train-dataset forest] [--test-dataset forest_test]
        [--cpr-config configs/forest/cpr_R18_s4_r4_f128_c64_4x192_disc_hflip.yaml] [--p2p-config configs/forest/p2p_R18_s8.yaml]
        [--cpr-iters N] [--p2p-iters N] [--iter-scale F] [--device cpu|cuda]
        [--coarse-seed S] [--subset N] [--folds K [--keep-unreliable agreed|coarse|refined]]
        [--force STAGE ...]

Stages (each a subprocess of tools/train_net.py or tools/refine_export.py, its output
shown as it runs and kept in DIR/logs/):
  data         the training jsons: coarse points (the dataset's own, or regenerated
               with --coarse-seed), the true box centres; --subset N keeps N images
  cpr          train CPRNet on the coarse points
  refine       refine every training annotation (DIR/refined.json)
  p2p_coarse, p2p_refined, p2p_centres
               train P2PNet on each set of points and evaluate it on the test set
  report       DIR/results.md and DIR/results.json (the table printed at the end),
               DIR/vis/*.png
A stage whose outputs exist is skipped (its recorded time is reused); an interrupted
training resumes from its last checkpoint. --force STAGE reruns STAGE and every stage
that depends on it (--force all reruns everything). DIR holds one run's settings: a
second run with other settings stops with a message instead of mixing the two.

--seeds S1 S2 ... runs every stage once per seed, each into DIR/seed_<S>/ (what
--seed S --output DIR/seed_<S> writes; resume, skip and --force work per seed), then
writes DIR/results.md and DIR/results.json: every seed's numbers, their mean +- std,
and a paired bootstrap interval over the test images of AP@0.5(refined) -
AP@0.5(coarse), pooled over the seeds. DIR defaults to
output/pipeline/<train dataset>[_quick]_seeds.

Any registered point dataset works (--train-dataset / --test-dataset: COCO, DOTA,
SeaPerson builtins, or a json registered by --point-json NAME JSON IMAGE_ROOT).
Defaults take about 25-30 minutes on a 2-core CPU (docs/pipeline.md, "Time"); --quick
(fewer iterations, same stages) under 5 and marks its table as a smoke run; --device cuda --iter-scale 4
scales up for a GPU.
"""
import argparse
import copy
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, _REPO)

from cli_args import DEFAULT_KEEP_UNRELIABLE, KEEP_UNRELIABLE  # noqa: E402

STAGES = ("data", "cpr", "refine", "p2p_coarse", "p2p_refined", "p2p_centres", "report")
# stage -> the stages whose outputs it reads
DEPENDS = {"cpr": ("data",), "refine": ("cpr",), "p2p_coarse": ("data",),
           "p2p_refined": ("refine",), "p2p_centres": ("data",),
           "report": ("refine", "p2p_coarse", "p2p_refined", "p2p_centres")}
LOCALIZERS = {"p2p_coarse": ("coarse points", "pipeline_coarse"),
              "p2p_refined": ("CPR-refined points", "pipeline_refined"),
              "p2p_centres": ("true box centres", "pipeline_centres")}
# Lines of the stages' output worth showing: iterations with ETA, results, problems.
_PROGRESS = re.compile(r"eta: |copypaste: |Error|error: |^refined \d+ of|WARNING|Traceback|Fold \d|"
                       r"^\| |semantic variance|^\s*(all|<|>=)")
QUICK_ITERS = {"cpr": 200, "p2p": 150}
# The settings of a run directory written before the overrides were recorded.
NO_OVERRIDES = {"opts": [], "cpr_opts": [], "p2p_opts": [], "folds": 1, "keep_unreliable": None}
FULL_ITERS = {"cpr": 1500, "p2p": 800}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None,
                   help="run directory (default output/pipeline/<train dataset>[_quick], "
                        "with --seeds output/pipeline/<train dataset>[_quick]_seeds)")
    p.add_argument("--train-dataset", default="forest")
    p.add_argument("--test-dataset", default="forest_test")
    p.add_argument("--point-json", nargs=3, action="append", default=[],
                   metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="register a point json as dataset NAME (repeatable)")
    p.add_argument("--cpr-config", default="configs/forest/cpr_R18_s4_r4_f128_c64_4x192_disc_hflip.yaml")
    p.add_argument("--p2p-config", default="configs/forest/p2p_R18_s8.yaml")
    p.add_argument("--seed", type=int, default=None,
                   help="training seed of every stage (default 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="run every stage once per seed, into DIR/seed_<S>/, and report the "
                        "mean +- std over the seeds and a paired bootstrap interval of "
                        "AP@0.5(refined) - AP@0.5(coarse); not with --seed")
    p.add_argument("--bootstrap-samples", type=int, default=2000, metavar="N",
                   help="--seeds: bootstrap samples of the interval (default 2000)")
    p.add_argument("--coarse-seed", type=int, default=None,
                   help="regenerate the coarse points from the true boxes with this seed "
                        "(noise --coarse-noise); default: the dataset's own points")
    p.add_argument("--coarse-noise", default="rg-0-0-0.25-0.25")
    p.add_argument("--folds", type=int, default=1, metavar="K",
                   help="cross-fitted refinement: train K CPRNets on K image folds and refine "
                        "each image with the one that never saw it (refine_export --folds; "
                        "default 1: the cpr stage's model refines)")
    p.add_argument("--keep-unreliable", choices=KEEP_UNRELIABLE, default=None,
                   help="with --folds K >= 2: move every point by the part of its move the "
                        "other fold models reproduce (agreed, the default), keep the coarse "
                        "point where they disagree by more than the move (coarse), or write "
                        "every refined point (refined); agreed and coarse keep every coarse "
                        "point of a class the trust report warns about; refine_export "
                        "--keep-unreliable")
    p.add_argument("--subset", type=int, default=None,
                   help="use only the first N images of the training and test sets")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: CPRNet {QUICK_ITERS['cpr']} and P2PNet {QUICK_ITERS['p2p']} "
                        "iterations")
    p.add_argument("--cpr-iters", type=int, default=None)
    p.add_argument("--p2p-iters", type=int, default=None)
    p.add_argument("--iter-scale", type=float, default=1.0,
                   help="multiply every iteration count (e.g. 4 on a GPU)")
    p.add_argument("--device", default="cpu", help="MODEL.DEVICE of every stage")
    p.add_argument("--num-workers", type=int, default=1, help="DATALOADER.NUM_WORKERS")
    p.add_argument("--force", nargs="+", default=[], metavar="STAGE",
                   help=f"rerun these stages and what depends on them: {', '.join(STAGES)}, all")
    p.add_argument("--vis-images", type=int, default=2, help="test images to draw")
    p.add_argument("--cpr-opt", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="a config override of the CPRNet stages only (cpr, refine); repeatable")
    p.add_argument("--p2p-opt", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="a config override of the P2PNet stages only; repeatable")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="config overrides of every training and refinement stage, after the "
                        "other options, e.g. SOLVER.BASE_LR 0.0005 INPUT.NORMALIZE range")
    return p


# Keys the pipeline sets itself: an override would break it; the message says what to use.
PIPELINE_KEYS = {
    "OUTPUT_DIR": "--output", "DATASETS.TRAIN": "--train-dataset",
    "DATASETS.TEST": "--test-dataset", "DATASETS.POINT_JSONS": "--point-json",
    "SEED": "--seed / --seeds", "MODEL.WEIGHTS": "nothing (each stage trains its model)",
    "MODEL.DEVICE": "--device", "SOLVER.MAX_ITER": "--cpr-iters / --p2p-iters",
    "DATALOADER.NUM_WORKERS": "--num-workers",
}


def check_overrides(p, args):
    """Refuse malformed KEY VALUE overrides and keys the pipeline sets itself, then merge
    each stage's overrides into its config here, so that a misspelt key or a bad value
    stops the run before any stage starts (with the config file and the key named)."""
    args.opts_words = len(args.opts)  # the tail of argv they came from
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs; got {len(args.opts)} words "
                f"({' '.join(args.opts)})")
    pairs = {"every stage": list(zip(args.opts[0::2], args.opts[1::2])),
             "--cpr-opt": [tuple(o) for o in args.cpr_opt],
             "--p2p-opt": [tuple(o) for o in args.p2p_opt]}
    for where, items in pairs.items():
        for key, _ in items:
            if key.startswith("-"):
                p.error(f"{where}: '{key}' is not a config key; options (--...) go before the "
                        "KEY VALUE overrides")
            if key in PIPELINE_KEYS:
                p.error(f"{where}: {key} is set by the pipeline itself; use {PIPELINE_KEYS[key]}")
    return pairs


def stage_overrides(args, cpr):
    """The KEY VALUE list of a CPRNet (`cpr`) or P2PNet stage: those of every stage,
    then the stage kind's own."""
    own = args.cpr_opt if cpr else args.p2p_opt
    return list(args.opts) + [v for pair in own for v in pair]


def validate_stage_configs(args):
    """Merge every stage's config file and overrides as train_net would (errors name the
    file or the override)."""
    import cpr_d2  # noqa: F401
    from cpr_d2.engine.defaults import merge_config

    for config, cpr in ((args.cpr_config, True), (args.p2p_config, False)):
        if not os.path.isfile(config):
            raise SystemExit(f"run_pipeline: config file not found: {config}")
        try:
            merge_config(config, stage_overrides(args, cpr), f"override of {config}")
        except (KeyError, ValueError) as e:
            raise SystemExit(f"run_pipeline: {str(e).strip(chr(34) + chr(39))}") from None


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    bad = [s for s in args.force if s not in STAGES + ("all",)]
    if bad:
        p.error(f"--force: unknown stage(s) {bad}; stages are {', '.join(STAGES)} or all")
    if args.subset is not None and args.subset < 1:
        p.error("--subset must be >= 1")
    if args.folds < 1:
        p.error(f"--folds must be >= 1, got {args.folds}")
    if args.keep_unreliable and args.folds < 2:
        p.error("--keep-unreliable needs --folds 2 or more: a point's reliability is the "
                "agreement of fold models trained on different images")
    if args.seeds is not None:
        if args.seed is not None:
            p.error(f"--seed {args.seed} and --seeds {' '.join(map(str, args.seeds))} exclude each "
                    "other: --seed S runs one seed in DIR, --seeds S1 S2 ... runs several into "
                    "DIR/seed_<S>/; pass only one of them")
        repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        if repeated:
            p.error(f"--seeds: seed(s) {repeated} given more than once; list each seed once")
        if len(args.seeds) < 2:
            p.error(f"--seeds needs at least two seeds (a spread over one seed is undefined); "
                    f"for one seed use --seed {args.seeds[0]}")
    if args.bootstrap_samples < 1:
        p.error("--bootstrap-samples must be >= 1")
    check_overrides(p, args)
    if args.seed is None:
        args.seed = 0
    return args


def single_seed_argv(argv, seed, output):
    """The arguments of the single-seed run that a --seeds run makes for `seed` (shown as
    the command in that seed's tables): argv without --seeds, --output and
    --bootstrap-samples, plus --seed and --output."""
    options = build_parser()._option_string_actions

    def dest(token):
        name = token.split("=", 1)[0]
        if name in options:
            return options[name].dest
        found = {options[o].dest for o in options if o.startswith("--") and o.startswith(name)}
        return found.pop() if len(found) == 1 else None  # argparse's unique abbreviations

    out, k = [], 0
    while k < len(argv):
        token = argv[k]
        k += 1
        what = dest(token) if token.startswith("--") else None
        if what in ("seeds", "output", "bootstrap_samples"):
            if "=" not in token:
                if what == "seeds":
                    while k < len(argv) and re.fullmatch(r"-?\d+", argv[k]):
                        k += 1
                else:
                    k += 1
            continue
        out.append(token)
    return out + ["--seed", str(seed), "--output", output]


def settings_differ(out, old, new):
    """The message that refuses a directory holding a run with other settings."""
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    return (f"run_pipeline: {out} holds a run with other settings "
            f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); pass "
            "another --output, or --force all to redo it with the new settings")


def iterations(args):
    base = QUICK_ITERS if args.quick else FULL_ITERS
    cpr = args.cpr_iters if args.cpr_iters is not None else base["cpr"]
    p2p = args.p2p_iters if args.p2p_iters is not None else base["p2p"]
    return max(1, int(round(cpr * args.iter_scale))), max(1, int(round(p2p * args.iter_scale)))


def forced_stages(force):
    if "all" in force:
        return set(STAGES)
    out = set(force)
    changed = True
    while changed:
        changed = False
        for stage, needs in DEPENDS.items():
            if stage not in out and out.intersection(needs):
                out.add(stage)
                changed = True
    return out


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Run:
    """One pipeline run in one directory: its settings, stage state and commands."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.out = os.path.abspath(args.output or os.path.join(
            "output", "pipeline", args.train_dataset + ("_quick" if args.quick else "")))
        self.cpr_iters, self.p2p_iters = iterations(args)
        self.state_path = os.path.join(self.out, "stages.json")
        self.forced = forced_stages(args.force)
        self.start = time.time()
        self.ran = []  # the stages this invocation ran (not skipped)
        self.settings = {
            "train_dataset": args.train_dataset, "test_dataset": args.test_dataset,
            "point_jsons": [list(p) for p in args.point_json],
            "cpr_config": args.cpr_config, "p2p_config": args.p2p_config, "seed": args.seed,
            "coarse_seed": args.coarse_seed, "coarse_noise": args.coarse_noise,
            "subset": args.subset, "folds": args.folds,
            "keep_unreliable": ((args.keep_unreliable or DEFAULT_KEEP_UNRELIABLE)
                                if args.folds > 1 else None),
            "cpr_iters": self.cpr_iters,
            "p2p_iters": self.p2p_iters,
            "device": args.device, "quick": args.quick,
            "opts": list(args.opts), "cpr_opts": [list(o) for o in args.cpr_opt],
            "p2p_opts": [list(o) for o in args.p2p_opt],
        }

    # ---- state ---------------------------------------------------------------------
    def check_settings(self):
        """The directory's state, or None for a new directory; refuses a directory that
        holds a run with other settings, or a --seeds run."""
        if not os.path.isfile(self.state_path):
            return None
        state = read_json(self.state_path, "pipeline state")
        old = {**NO_OVERRIDES, **state.get("settings", {})}
        if "seeds" in old:
            raise SystemExit(
                f"run_pipeline: {self.out} holds a --seeds run (seeds {old['seeds']}, one "
                "directory seed_<S> per seed); pass another --output for a single-seed run, "
                f"or --output {os.path.join(self.out, 'seed_<S>')} --seed <S> to resume one "
                "of its seeds")
        if old != self.settings and "all" not in self.args.force:
            raise SystemExit(settings_differ(self.out, old, self.settings))
        return state

    def load_state(self):
        state = self.check_settings()
        os.makedirs(self.out, exist_ok=True)
        if state is None:
            self.state = {"settings": self.settings, "stages": {}}
            self.save_state()
            return
        self.state = state
        self.state["settings"] = self.settings
        self.save_state()

    def save_state(self):
        from cpr_d2.utils.io import write_json_atomic

        write_json_atomic(self.state, self.state_path)

    def done(self, stage, outputs):
        if stage in self.forced:
            return False
        return stage in self.state["stages"] and all(os.path.exists(p) for p in outputs)

    def record(self, stage, seconds):
        self.state["stages"][stage] = {
            "seconds": round(seconds, 1),
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        self.save_state()

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    # ---- datasets ------------------------------------------------------------------
    def point_jsons_opt(self):
        triples = [tuple(p) for p in self.args.point_json]
        triples += [(name, json_file, root) for name, (json_file, root) in self.derived.items()
                    if os.path.isfile(json_file)]
        return ["DATASETS.POINT_JSONS", repr(tuple(triples))]

    def resolve_sources(self):
        import cpr_d2  # noqa: F401  (registers the builtin datasets)
        from cpr_d2.data import dataset_files, register_point_coco

        for name, json_file, root in self.args.point_json:
            from detectron2.data import DatasetCatalog

            if name not in DatasetCatalog.list():
                register_point_coco(name, json_file, root)
        self.train_json, self.image_root = dataset_files(self.args.train_dataset)
        self.test_json, self.test_root = dataset_files(self.args.test_dataset)
        self.derived = {
            "pipeline_coarse": (self.path("data", "train_coarse.json"), self.image_root),
            "pipeline_centres": (self.path("data", "train_centres.json"), self.image_root),
            "pipeline_refined": (self.path("refined.json"), self.image_root),
        }
        self.test_name = self.args.test_dataset
        if self.args.subset:
            self.derived["pipeline_test"] = (self.path("data", "test.json"), self.test_root)
            self.test_name = "pipeline_test"

    # ---- stages ----------------------------------------------------------------------
    def header(self, k, stage, text):
        elapsed = time.time() - self.start
        print(f"\n=== [{k}/{len(STAGES)}] {stage}: {text} (pipeline time {elapsed / 60:.1f} min)",
              flush=True)

    def run_cmd(self, stage, cmd):
        os.makedirs(self.path("logs"), exist_ok=True)
        log = self.path("logs", f"{stage}.log")
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, cwd=_REPO, env=env)
            for line in proc.stdout:
                f.write(line)
                if self.show(line):
                    print(f"  {line.rstrip()}", flush=True)
            code = proc.wait()
        if code != 0:
            raise SystemExit(f"run_pipeline: stage '{stage}' failed (exit {code}); its log is "
                             f"{log}. Rerun the same command to resume.")

    @staticmethod
    def show(line):
        """Progress lines only: iterations with ETA, results, warnings and errors."""
        if "FutureWarning" in line or "Build settings" in line or line.lstrip().startswith("#"):
            return False
        return bool(_PROGRESS.search(line))

    def stage_data(self):
        from cpr_d2.data.coarse import coarse_points_from_coco
        from cpr_d2.data.point_json import centres_json, subset_json, write_point_json

        train = read_json(self.train_json, f"training json of '{self.args.train_dataset}'")
        if self.args.subset:
            train = subset_json(train, self.args.subset)
            test = subset_json(read_json(self.test_json, "test json"), self.args.subset)
            write_point_json(test, self.derived["pipeline_test"][0])
        if self.args.coarse_seed is not None:
            train, report = coarse_points_from_coco(train, self.args.coarse_noise,
                                                    self.args.coarse_seed,
                                                    source=self.train_json)
            print(f"  coarse points {self.args.coarse_noise}, seed {self.args.coarse_seed}: "
                  f"{report.annotations} annotations")
        write_point_json(train, self.derived["pipeline_coarse"][0])
        write_point_json(centres_json(train, self.train_json), self.derived["pipeline_centres"][0])

    def schedule_opts(self, iters):
        """The training schedule of a stage of `iters` iterations, and the seed. Of the
        periodic checkpoints, only the newest stays on disk (to resume from); with the
        final model, a seed's run keeps about 1.5 GB of checkpoints instead of 4.5 GB."""
        return ["SEED", str(self.args.seed), "SOLVER.MAX_ITER", str(iters),
                "SOLVER.STEPS", f"({max(1, int(0.8 * iters))},)",
                "SOLVER.WARMUP_ITERS", str(min(100, max(1, iters // 10))),
                "SOLVER.CHECKPOINT_PERIOD", str(max(50, iters // 5)),
                "SOLVER.CHECKPOINT_MAX_KEEP", "1"]

    def train_cmd(self, config, out_dir, train_name, test_names, iters, extra=()):
        cmd = [sys.executable, os.path.join(_REPO, "tools", "train_net.py"), "--config-file", config,
               "--resume", "OUTPUT_DIR", out_dir,
               "DATASETS.TRAIN", repr((train_name,)), "DATASETS.TEST", repr(tuple(test_names)),
               *self.schedule_opts(iters), "MODEL.DEVICE", self.args.device,
               "DATALOADER.NUM_WORKERS", str(self.args.num_workers)]
        return (cmd + self.point_jsons_opt()
                + stage_overrides(self.args, config == self.args.cpr_config) + list(extra))

    def stage_cpr(self):
        self.run_cmd("cpr", self.train_cmd(self.args.cpr_config, self.path("cpr"), "pipeline_coarse",
                                           (), self.cpr_iters))

    def stage_refine(self):
        cmd = [sys.executable, os.path.join(_REPO, "tools", "refine_export.py"), "--config-file",
               self.args.cpr_config, "--dataset", "pipeline_coarse", "--output",
               self.path("refined.json")]
        if self.args.folds > 1:  # the fold models train with the cpr stage's schedule
            cmd += ["--folds", str(self.args.folds), "--keep-unreliable",
                    self.settings["keep_unreliable"], *self.schedule_opts(self.cpr_iters)]
        else:
            cmd += ["MODEL.WEIGHTS", self.path("cpr", "model_final.pth")]
        cmd += ["OUTPUT_DIR", self.path("cpr"), "MODEL.DEVICE", self.args.device,
                "DATALOADER.NUM_WORKERS", str(self.args.num_workers)] + self.point_jsons_opt()
        self.run_cmd("refine", cmd + stage_overrides(self.args, cpr=True))

    def metrics_path(self, stage):
        return self.path(stage, "inference", self.test_name, "point_ap_metrics.json")

    def predictions_path(self, stage):
        return self.path(stage, "inference", self.test_name, "point_predictions.json")

    def stage_p2p(self, stage):
        _, train_name = LOCALIZERS[stage]
        out_dir = self.path(stage)
        if not os.path.isfile(os.path.join(out_dir, "model_final.pth")) or stage in self.forced:
            self.run_cmd(stage, self.train_cmd(self.args.p2p_config, out_dir, train_name,
                                               (self.test_name,), self.p2p_iters))
        if not os.path.isfile(self.metrics_path(stage)):  # trained earlier, not evaluated
            cmd = self.train_cmd(self.args.p2p_config, out_dir, train_name, (self.test_name,),
                                 self.p2p_iters, ["MODEL.WEIGHTS",
                                                  os.path.join(out_dir, "model_final.pth")])
            cmd.insert(cmd.index("--resume"), "--eval-only")
            cmd.remove("--resume")
            self.run_cmd(stage, cmd)

    def outputs(self, stage):
        if stage == "data":
            return [p for p, _ in self.derived.values() if "refined" not in p]
        if stage == "cpr":
            return [self.path("cpr", "model_final.pth")]
        if stage == "refine":
            return [self.path("refined.json")]
        if stage in LOCALIZERS:
            return [self.path(stage, "model_final.pth"), self.metrics_path(stage)]
        return [self.path("results.md"), self.path("results.json")]

    def crossfit_dir(self):
        """Where refine_export --folds keeps the fold models (its OUTPUT_DIR/refine_export)."""
        return self.path("cpr", "refine_export", f"crossfit_{self.args.folds}")

    def smoke(self):
        return self.cpr_iters < FULL_ITERS["cpr"] or self.p2p_iters < FULL_ITERS["p2p"]

    def set_aside(self, stage):
        """A forced stage starts afresh: its earlier outputs move to <name>.previous (one
        generation kept), so a rerun never resumes from them and nothing is deleted
        before the new run has replaced it."""
        paths = {"cpr": [self.path("cpr")],
                 "refine": [self.path("refined.json"), self.crossfit_dir()],
                 "report": [self.path("results.md"), self.path("results.json")]}.get(
            stage, [self.path(stage)] if stage in LOCALIZERS else [])
        for p in paths:
            if os.path.exists(p):
                previous = p + ".previous"
                if os.path.isdir(previous):
                    shutil.rmtree(previous)
                elif os.path.exists(previous):
                    os.remove(previous)
                os.replace(p, previous)
                print(f"  --force: moved the earlier {os.path.basename(p)} to {previous}")

    def register_derived(self):
        """Register the run's jsons in this process too (the report reads them). A name
        registered earlier in this process for another directory (another seed of a
        --seeds run) is registered again for this one."""
        from detectron2.data import DatasetCatalog, MetadataCatalog

        from cpr_d2.data import register_point_coco

        for name, (json_file, root) in self.derived.items():
            if not os.path.isfile(json_file):
                continue
            if name in DatasetCatalog.list():
                if getattr(MetadataCatalog.get(name), "json_file", None) == json_file:
                    continue
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            register_point_coco(name, json_file, root)

    def main(self):
        self.resolve_sources()
        self.load_state()
        self.register_derived()
        print(f"run_pipeline: {self.args.train_dataset} -> {self.args.test_dataset}, output "
              f"{self.out}; CPRNet {self.cpr_iters} and P2PNet {self.p2p_iters} iterations, "
              f"seed {self.args.seed}, device {self.args.device}"
              + (" (QUICK smoke run)" if self.quick else ""))
        texts = {"data": "training jsons", "cpr": f"train CPRNet ({self.cpr_iters} it)",
                 "refine": "refine the training points" + (
                     f" (cross-fitted: {self.args.folds} CPRNets of {self.cpr_iters} it)"
                     if self.args.folds > 1 else ""),
                 "p2p_coarse": f"P2PNet on coarse points ({self.p2p_iters} it)",
                 "p2p_refined": f"P2PNet on refined points ({self.p2p_iters} it)",
                 "p2p_centres": f"P2PNet on true centres ({self.p2p_iters} it)",
                 "report": "table and pictures"}
        for k, stage in enumerate(STAGES, 1):
            self.header(k, stage, texts[stage])
            if self.done(stage, self.outputs(stage)):
                print(f"  done earlier ({self.state['stages'][stage]['seconds']:.0f} s); skipped "
                      f"(--force {stage} reruns it)")
                continue
            self.state["stages"].pop(stage, None)
            self.ran.append(stage)
            if stage in self.forced:
                self.set_aside(stage)
            t0 = time.time()
            if stage != "report":  # the command that produced the results, for the table
                self.state["command"] = " ".join(shlex.quote(a) for a in ["tools/run_pipeline.py"]
                                                 + self.args.argv)
            if stage == "data":
                self.stage_data()
            elif stage == "cpr":
                self.stage_cpr()
            elif stage == "refine":
                self.stage_refine()
            elif stage in LOCALIZERS:
                self.stage_p2p(stage)
            if stage == "data":
                self.register_derived()
            if stage == "report":
                self.report()
            self.record(stage, time.time() - t0)
        print(f"\nrun_pipeline: finished in {(time.time() - self.start) / 60:.1f} min; "
              f"results in {self.path('results.md')}")
        return self.path("results.json")

    # ---- report ----------------------------------------------------------------------
    def report(self):
        from cpr_d2.evaluation.tables import (localizer_rows, localizer_table, markdown_table,
                                              training_points_rows)
        from cpr_d2.utils.io import write_json_atomic, write_text_atomic

        coarse = read_json(self.derived["pipeline_coarse"][0], "coarse training json")
        refined = read_json(self.path("refined.json"), "refined json")
        points = training_points_rows(coarse, refined)
        metrics = {LOCALIZERS[s][0]: read_json(self.metrics_path(s), f"{s} metrics")
                   for s in LOCALIZERS}
        localizers = localizer_rows(metrics)
        times = [{"stage": s, "seconds": self.state["stages"].get(s, {}).get("seconds")}
                 for s in STAGES if s != "report"]
        total = sum(t["seconds"] or 0 for t in times)
        pictures = self.pictures()
        meta = {
            "command": self.state.get("command", "tools/run_pipeline.py"),
            "date": datetime.date.today().isoformat(),
            "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
            "device": self.args.device, "seed": self.args.seed,
            "smoke_run": self.smoke(), "total_minutes": round(total / 60, 1),
            **{k: v for k, v in self.settings.items() if k not in ("seed", "device", "quick")},
        }
        title = f"# CPR pipeline: {self.args.train_dataset} -> {self.args.test_dataset}"
        if self.smoke():
            title += ("\n\n**SMOKE RUN: fewer iterations than the defaults; the numbers show the "
                      "pipeline works, not what the method achieves.**")
        md = "\n\n".join([
            title,
            "\n".join(f"- {k}: {v}" for k, v in meta.items()),
            f"## Training points ({self.args.train_dataset}): coarse vs CPR-refined\n\n"
            "RSV = relative semantic variance, |o| = mean normalised distance to the true "
            "box centre (lower is better).\n\n" + markdown_table(points),
            f"## P2PNet on {self.args.test_dataset}"
            + (f" (first {self.args.subset} images)" if self.args.subset else "")
            + " (point AP in %, counting MAE/RMSE)\n\n" + localizer_table(localizers),
            "## Wall time per stage (seconds)\n\n" + markdown_table(times),
            "## Pictures\n\n" + "\n".join(f"- {os.path.relpath(p, self.out)}" for p in pictures),
        ]) + "\n"
        write_text_atomic(md, self.path("results.md"))
        write_json_atomic({"meta": meta, "training_points": points, "localizers": localizers,
                           "stage_seconds": times, "pictures": pictures},
                          self.path("results.json"))
        print("\n" + md)

    def pictures(self):
        """Coarse -> refined arrows on training images, and the three localizers'
        predictions side by side on test images."""
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from PIL import Image

        from cpr_d2.data.point_json import box_centre
        from cpr_d2.evaluation.evaluator import prediction_class_indices
        from cpr_d2.utils.io import save_image_atomic
        from cpr_d2.utils.visualizer import PointVisualizer

        os.makedirs(self.path("vis"), exist_ok=True)
        written = []
        refined = {a["id"]: a for a in read_json(self.path("refined.json"), "refined json")[
            "annotations"] if "refine_score" in a}
        train = DatasetCatalog.get("pipeline_coarse")
        train = sorted(train, key=lambda r: -len(r["annotations"]))[: self.args.vis_images]
        meta = MetadataCatalog.get("pipeline_coarse")
        for record in train:
            anns = [a for a in record["annotations"] if a["id"] in refined]
            image = np.asarray(Image.open(record["file_name"]).convert("RGB"))
            vis = PointVisualizer(image, meta, scale=2.0)
            out = vis.draw_refinement([a["point"] for a in anns],
                                      [refined[a["id"]]["point"] for a in anns],
                                      [a["category_id"] for a in anns])
            path = self.path("vis", f"refine_{record['image_id']}.png")
            save_image_atomic(out.get_image(), path)
            written.append(path)

        test = DatasetCatalog.get(self.test_name)[: self.args.vis_images]
        test_meta = MetadataCatalog.get(self.test_name)
        preds = {}
        for stage in LOCALIZERS:
            by_image = {}
            rows = read_json(self.predictions_path(stage), f"{stage} predictions")
            classes = prediction_class_indices(rows, self.test_name, self.predictions_path(stage))
            for row, c in zip(rows, classes):
                by_image.setdefault(row["image_id"], []).append(dict(row, category_id=c))
            preds[stage] = by_image
        for record in test:
            image = np.asarray(Image.open(record["file_name"]).convert("RGB"))
            panels = []
            for stage, (label, _) in LOCALIZERS.items():
                vis = PointVisualizer(image, test_meta, scale=1.5)
                truth = [box_centre(a["bbox"]) for a in record["annotations"]
                         if not a.get("iscrowd", 0)]
                if truth:
                    vis.draw_points(truth, labels=False, color="white", marker="x")
                # As many points as the image has objects, best first: a fair comparison
                # whatever each model's score scale.
                rows = sorted(preds[stage].get(record["image_id"], []),
                              key=lambda r: -r["score"])[: len(truth)]
                vis.draw_points([r["point"] for r in rows] or np.zeros((0, 2)),
                                [r["category_id"] for r in rows], labels=False)
                vis.draw_text(f"P2PNet on {label}: top {len(rows)} (x: true centres)",
                              (4, 4), horizontal_alignment="left", font_size=9)
                panels.append(vis.output.get_image())
            path = self.path("vis", f"predictions_{record['image_id']}.png")
            save_image_atomic(np.concatenate(panels, axis=1), path)
            written.append(path)
        return written


class SeedsRun:
    """A --seeds run: one Run per seed in DIR/seed_<S>/ (each what a single-seed run with
    that seed and directory writes), then DIR/results.md and DIR/results.json over the
    seeds. DIR/stages.json holds the settings (with the seeds) and the report's state."""

    BOOTSTRAP_SEED = 0

    def __init__(self, args):
        self.args = args
        shown = args.output or os.path.join(
            "output", "pipeline", args.train_dataset + ("_quick" if args.quick else "") + "_seeds")
        self.out = os.path.abspath(shown)
        self.state_path = os.path.join(self.out, "stages.json")
        self.forced = forced_stages(args.force)
        self.start = time.time()
        self.runs = []
        for seed in args.seeds:
            one = copy.copy(args)
            one.seed, one.seeds = seed, None
            one.output = os.path.join(self.out, f"seed_{seed}")
            tail = len(args.argv) - args.opts_words  # the overrides stay last
            one.argv = single_seed_argv(args.argv[:tail], seed, os.path.join(
                shown, f"seed_{seed}")) + args.argv[tail:]
            self.runs.append(Run(one))
        self.settings = {k: v for k, v in self.runs[0].settings.items() if k != "seed"}
        self.settings["seeds"] = list(args.seeds)

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def save_state(self):
        from cpr_d2.utils.io import write_json_atomic

        write_json_atomic(self.state, self.state_path)

    def load_state(self):
        """Refuses a directory with a single-seed run, or a --seeds run with other
        settings (the seeds included), before any seed runs."""
        state = None
        if os.path.isfile(self.state_path):
            state = read_json(self.state_path, "pipeline state")
            old = {**NO_OVERRIDES, **state.get("settings", {})}
            if "seeds" not in old:
                raise SystemExit(
                    f"run_pipeline: {self.out} holds a single-seed run (seed {old.get('seed')}); "
                    "pass another --output for the --seeds run")
            if old != self.settings and "all" not in self.args.force:
                raise SystemExit(settings_differ(self.out, old, self.settings))
        for run in self.runs:  # each seed's directory, before anything runs
            run.check_settings()
        os.makedirs(self.out, exist_ok=True)
        self.state = state or {"stages": {}}
        self.state["settings"] = self.settings
        self.state.setdefault("stages", {})
        self.save_state()

    def main(self):
        self.load_state()
        seeds = self.args.seeds
        print(f"run_pipeline: {len(seeds)} seeds ({', '.join(map(str, seeds))}), each into "
              f"{self.path('seed_<S>')}")
        for k, run in enumerate(self.runs, 1):
            print(f"\n##### seed {run.args.seed} ({k} of {len(seeds)}): {run.out}", flush=True)
            run.start = time.time()
            run.main()
        print(f"\n=== seeds report: every seed's numbers, mean +- std, paired bootstrap "
              f"(pipeline time {(time.time() - self.start) / 60:.1f} min)", flush=True)
        earlier = self.state["stages"].get("report")
        outputs = [self.path("results.md"), self.path("results.json")]
        if (earlier and "report" not in self.forced and not any(run.ran for run in self.runs)
                and earlier.get("bootstrap_samples") == self.args.bootstrap_samples
                and all(os.path.isfile(p) for p in outputs)):
            print(f"  done earlier ({earlier['seconds']:.0f} s); skipped (--force report reruns "
                  "it)")
        else:
            self.state["stages"].pop("report", None)
            t0 = time.time()
            self.report()
            self.state["stages"]["report"] = {
                "seconds": round(time.time() - t0, 1),
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "bootstrap_samples": self.args.bootstrap_samples}
            self.save_state()
        print(f"\nrun_pipeline: {len(seeds)} seeds finished in "
              f"{(time.time() - self.start) / 60:.1f} min; results in {self.path('results.md')}")
        return self.path("results.json")

    # ---- report ----------------------------------------------------------------------
    def bootstrap(self, metrics_by_seed):
        """The paired bootstrap over test images of AP@0.5(refined) - AP@0.5(coarse),
        pooled over the seeds, in AP points (%)."""
        from detectron2.data import MetadataCatalog

        from cpr_d2.evaluation.evaluator import point_ap_dets, point_ap_settings
        from cpr_d2.evaluation import load_point_ground_truth
        from cpr_d2.evaluation.seed_stats import paired_bootstrap_ap

        first = self.runs[0]
        test_name = self.runs[-1].test_name  # registered for the last seed's directory
        class_names, image_ids, gts = load_point_ground_truth(test_name)
        settings = point_ap_settings(first.path("p2p_coarse", "config.yaml"),
                                     MetadataCatalog.get(test_name))
        if settings is None:
            print("  bootstrap: the evaluation's size ranges have no range 'all'; skipped")
            return None
        triples = []
        for run in self.runs:
            dets = {stage: point_ap_dets(read_json(run.predictions_path(stage),
                                                   f"{stage} predictions"),
                                         image_ids, run.predictions_path(stage), test_name)
                    for stage in ("p2p_coarse", "p2p_refined")}
            triples.append((gts, dets["p2p_coarse"], dets["p2p_refined"]))
        samples = self.args.bootstrap_samples
        print(f"  bootstrap: {samples} resamples of the {len(gts)} test images x "
              f"{len(triples)} seeds ...", flush=True)
        t0 = time.time()
        result = paired_bootstrap_ap(triples, num_classes=len(class_names), tau=0.5,
                                     num_samples=samples, seed=self.BOOTSTRAP_SEED, **settings)
        seconds = time.time() - t0
        per_seed, matches = [], True
        for run, a, b in zip(self.runs, result.ap_a, result.ap_b):
            seed = run.args.seed
            recorded = {s: metrics_by_seed[seed][LOCALIZERS[s][0]].get("AP@0.5")
                        for s in ("p2p_coarse", "p2p_refined")}
            for stage, value in (("p2p_coarse", a), ("p2p_refined", b)):
                if recorded[stage] is not None and abs(100 * value - recorded[stage]) > 1e-6:
                    matches = False
                    print(f"  WARNING: seed {seed}: AP@0.5 of {stage} recomputed from its "
                          f"predictions is {100 * value:.4f}, its metrics say "
                          f"{recorded[stage]:.4f}; the bootstrap may not use the evaluation's "
                          "settings")
            per_seed.append({"seed": seed, "coarse": 100 * a, "refined": 100 * b,
                             "difference": 100 * (b - a)})
        print(f"  bootstrap: {seconds:.1f} s")
        return {
            "statistic": "AP@0.5(CPR-refined points) - AP@0.5(coarse points), mean over seeds",
            "units": "AP points (%)",
            "estimate": 100 * result.estimate, "lower": 100 * result.lower,
            "upper": 100 * result.upper, "confidence": result.confidence,
            "num_samples": result.num_samples, "seed": result.seed,
            "num_images": result.num_images, "seeds": [r.args.seed for r in self.runs],
            "num_undefined": result.num_undefined, "per_seed": per_seed,
            "matches_metrics": matches, "seconds": round(seconds, 1),
            "evaluation": {"tau": result.tau, "size_range": list(settings["size_range"]),
                           "max_dets": settings["max_dets"], "clean": settings["clean"]},
        }

    def report(self):
        from cpr_d2.evaluation.tables import (localizer_rows, markdown_table, seeds_localizer_rows,
                                              seeds_training_rows)
        from cpr_d2.utils.io import write_json_atomic, write_text_atomic

        seeds = [run.args.seed for run in self.runs]
        metrics_by_seed, points_by_seed, per_seed = {}, {}, {}
        for run in self.runs:
            seed = run.args.seed
            metrics_by_seed[seed] = {LOCALIZERS[s][0]: read_json(run.metrics_path(s),
                                                                 f"seed {seed} {s} metrics")
                                     for s in LOCALIZERS}
            results = read_json(run.path("results.json"), f"seed {seed} results")
            points_by_seed[seed] = results["training_points"]
            per_seed[str(seed)] = {
                "dir": run.out, "results": run.path("results.md"),
                "localizers": localizer_rows(metrics_by_seed[seed]),
                "training_points": results["training_points"],
                "stage_seconds": {s: run.state["stages"].get(s, {}).get("seconds")
                                  for s in STAGES}}
        localizer_md, localizer_summary = seeds_localizer_rows(metrics_by_seed)
        points_md, points_summary = seeds_training_rows(points_by_seed)
        boot = self.bootstrap(metrics_by_seed)
        times = [{"stage": s, **{f"seed {seed}": per_seed[str(seed)]["stage_seconds"][s]
                                 for seed in seeds}} for s in STAGES]
        total = sum(v or 0 for row in times for k, v in row.items() if k != "stage")
        smoke = any(run.smoke() for run in self.runs)
        meta = {
            "command": " ".join(shlex.quote(a) for a in ["tools/run_pipeline.py"]
                                + self.args.argv),
            "date": datetime.date.today().isoformat(),
            "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
            "device": self.args.device, "seeds": seeds,
            "smoke_run": smoke, "total_minutes": round(total / 60, 1),
            **{k: v for k, v in self.settings.items() if k not in ("seeds", "device", "quick")},
        }
        test = self.args.test_dataset + (f" (first {self.args.subset} images)"
                                         if self.args.subset else "")
        title = (f"# CPR pipeline: {self.args.train_dataset} -> {self.args.test_dataset}, "
                 f"{len(seeds)} seeds")
        if smoke:
            title += ("\n\n**SMOKE RUN: fewer iterations than the defaults; the numbers show the "
                      "pipeline works, not what the method achieves.**")
        if boot is None:
            boot_md = "Not computed: the evaluation's size ranges have no range `all`."
        else:
            boot_md = (
                "AP@0.5 of P2PNet on the CPR-refined points minus AP@0.5 on the coarse points, "
                f"in AP points, mean over the {len(seeds)} seeds. Each of the "
                f"{boot['num_samples']} samples draws the {boot['num_images']} test images "
                "with replacement, the same draw for both localizers and every seed; the "
                "interval is the 2.5th to 97.5th percentile of the samples. It shows how much "
                "the difference depends on which test images are drawn; the spread over seeds "
                "is in the table above.\n\n" + markdown_table([{
                    "statistic": "AP@0.5 refined - coarse",
                    "estimate": f"{boot['estimate']:+.2f}",
                    "95% interval": f"[{boot['lower']:+.2f}, {boot['upper']:+.2f}]",
                    "samples": boot["num_samples"], "test images": boot["num_images"],
                    "seeds": ", ".join(map(str, seeds))}])
                + "\n\n" + markdown_table([{"seed": r["seed"], "coarse": r["coarse"],
                                             "refined": r["refined"],
                                             "refined - coarse": r["difference"]}
                                            for r in boot["per_seed"]]))
        md = "\n\n".join([
            title,
            "\n".join(f"- {k}: {v}" for k, v in meta.items()),
            "Each seed's own tables and pictures: "
            + ", ".join(f"`{os.path.relpath(run.path('results.md'), self.out)}`"
                        for run in self.runs) + ".",
            f"## Training points ({self.args.train_dataset}): coarse -> CPR-refined, change "
            "in %\n\nRSV = relative semantic variance, |o| = mean normalised distance to the "
            "true box centre (lower is better, so negative changes are improvements). Mean "
            "± sample std over the seeds.\n\n" + markdown_table(points_md),
            f"## P2PNet on {test} (point AP in %, counting MAE/RMSE)\n\nEvery seed, then "
            "the mean ± sample std over the seeds.\n\n" + markdown_table(localizer_md),
            "## Refined vs coarse: paired bootstrap over test images\n\n" + boot_md,
            "## Wall time per stage (seconds)\n\n" + markdown_table(times),
        ]) + "\n"
        write_text_atomic(md, self.path("results.md"))
        write_json_atomic({"meta": meta, "seeds": seeds, "per_seed": per_seed,
                           "localizers": localizer_summary, "training_points": points_summary,
                           "bootstrap": boot, "stage_seconds": times},
                          self.path("results.json"))
        print("\n" + md)


def read_json(path, what):
    """A json file the pipeline wrote (its state, metrics, predictions, derived jsons),
    with an error that names it and says to rerun the stage that writes it."""
    from cpr_d2.data.point_json import read_json as read

    return read(path, what, fix="delete it and rerun the stage that writes it")


def main(argv=None):
    args = parse_args(argv)
    validate_stage_configs(args)
    if args.seeds is not None:
        return SeedsRun(args).main()
    return Run(args).main()


if __name__ == "__main__":
    main()
