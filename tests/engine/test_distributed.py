"""Two CPU processes (gloo, cpr_d2.engine.launch) against one process, on the forest data.

One module fixture launches 2 processes once. Each rank trains CPRNet and P2PNet
for 3 steps through tools/train_net.py's main (IMS_PER_BATCH 2: one image per
rank), P2PNet's final evaluation runs on forest_test, and each rank writes what
it saw to rank<r>.json. The tests then compare with one process:

1. weights: after training, the state_dict hash is the same on both ranks and in
   model_final.pth.
2. loss: every training step's total loss (metrics.json) equals a 1-process run
   with the same total batch (the resumable sampler gives both the same images and
   the same crops, seeded by stream position); and on a fixed batch of 2 mapped
   images, rank r takes image r through the DDP model: the mean of the ranks'
   losses and DDP's averaged gradient are compared with one process.
   Both models average their normaliser (P2PNet: the number of positives, CPRNet:
   the number of objects) over the ranks, so 2 processes equal the 1-process batch
   of 2.
3. evaluation: every forest_test image is predicted by exactly one rank, the main
   process gathers each once, and the point AP equals 1-process --eval-only on
   the same checkpoint.
4. tools/refine_export.py with --num-gpus 0 --num-workers 2 writes the same json
   as in one process.
"""
import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpr_d2.engine.launch import check_launch, launch, launch_from_args
from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
CPR = "configs/forest/cpr_R18_s8_r2.yaml"
P2P = "configs/forest/p2p_R18_s8.yaml"
FAST = ["SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "100"]
JOBS = {"cpr": (CPR, "()"), "p2p": (P2P, '("forest_test",)')}
GATHER_IDS = range(7)


# ---- run in every process (1 or 2) ----------------------------------------------------

def state_hash(state_dict):
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fast_cfg(config):
    """The config, without default_setup (no logging, no reseeding)."""
    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.data.classes import resolve_num_classes

    cfg = get_cpr_d2_cfg()
    cfg.merge_from_file(str(ROOT / config))
    cfg.merge_from_list(FAST)
    resolve_num_classes(cfg, training=True)  # the forest configs take it from the data
    cfg.freeze()
    return cfg


def fixed_batch(cfg):
    """2 training images with objects, mapped for training with a fixed seed: the same
    crops in every process."""
    from detectron2.data import DatasetCatalog

    from cpr_d2.data import PointDatasetMapper

    mapper = PointDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    records = [r for r in DatasetCatalog.get(cfg.DATASETS.TRAIN[0]) if len(r["annotations"]) > 20]
    batch = [mapper(copy.deepcopy(r)) for r in records[:2]]
    assert all(len(x["instances"]) > 0 for x in batch), "a crop of the fixed batch has no object"
    return batch


def loss_and_gradient(cfg, inputs):
    """Total loss (mean over the ranks) and a gradient fingerprint (per parameter, the
    projections on 2 fixed random vectors: linear, so fingerprints average as gradients
    do) of one step on `inputs`, through the model that DefaultTrainer builds (wrapped
    in DDP with more than 1 process)."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from cpr_d2.engine import Trainer
    from cpr_d2.engine.launch import create_ddp_model

    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    net = create_ddp_model(model, broadcast_buffers=False)
    total = sum(net(inputs).values())
    total.backward()
    loss = total.detach().clone()
    if comm.get_world_size() > 1:
        dist.all_reduce(loss)
        loss /= comm.get_world_size()
    fingerprint = []
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        directions = torch.randn(2, grad.numel(), generator=generator)
        fingerprint += (directions @ grad.flatten()).tolist()
    return {"loss": float(loss), "gradient": fingerprint}


def _train(config, output_dir, test_sets):
    """tools/train_net.py's main, with a Trainer that keeps itself and its evaluator."""
    from torch.nn.parallel import DistributedDataParallel

    import cpr_d2.engine

    train_net = load_tool("train_net")
    kept = {}

    class KeepingTrainer(cpr_d2.engine.Trainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            kept["trainer"] = self

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            kept["evaluator"] = super().build_evaluator(cfg, dataset_name, output_folder)
            return kept["evaluator"]

    # train_net.main imports its Trainer from cpr_d2.engine when it runs.
    cpr_d2.engine.Trainer, original = KeepingTrainer, cpr_d2.engine.Trainer
    args = train_net.argument_parser().parse_args(
        ["--config-file", config, "OUTPUT_DIR", str(output_dir), *FAST,
         "DATASETS.TEST", test_sets])
    try:
        results = train_net.main(args)
    finally:
        cpr_d2.engine.Trainer = original
    model = kept["trainer"].model
    if isinstance(model, DistributedDataParallel):
        model = model.module
    row = {"weights": state_hash(model.state_dict()), "results": results,
           "ddp": isinstance(kept["trainer"].model, DistributedDataParallel)}
    if "evaluator" in kept:
        row["eval_image_ids"] = [p["image_id"] for p in kept["evaluator"]._predictions]
    return row


def _rank_main(out):
    import torch.distributed as dist
    from detectron2.utils import comm

    from cpr_d2.evaluation.evaluator import gather_per_image

    out = Path(out)
    rank = comm.get_rank()
    info = {"rank": rank, "world_size": comm.get_world_size(),
            "local_rank": comm.get_local_rank(), "local_size": comm.get_local_size(),
            "backend": dist.get_backend(), "threads": torch.get_num_threads()}
    for name, (config, test_sets) in JOBS.items():
        info[name] = _train(config, out / name, test_sets)
        cfg = fast_cfg(config)
        info[name]["fixed"] = loss_and_gradient(cfg, fixed_batch(cfg)[rank::2])
    # Rank r holds the rows of images r, r + 2, ...; rank 1 also repeats image 0, as a
    # sampler that pads the last batch would.
    rows = [{"image_id": i, "rank": rank} for i in GATHER_IDS[rank::2]]
    rows += [{"image_id": 0, "rank": rank}] if rank == 1 else []
    merged = gather_per_image(rows, distributed=True)
    info["gathered"] = None if merged is None else [[k, v["rank"]] for k, v in merged.items()]
    (out / f"rank{rank}.json").write_text(json.dumps(info))


# ---- the tests -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    launch(_rank_main, 0, num_workers=2, dist_url="auto", backend="gloo", args=(str(out),))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_workers_join_one_gloo_group_with_a_local_group(two_processes):
    _, ranks = two_processes
    for r, info in enumerate(ranks):
        assert (info["rank"], info["world_size"], info["local_rank"], info["local_size"]) == (
            r, 2, r, 2)
        assert info["backend"] == "gloo" and info["cpr"]["ddp"] and info["p2p"]["ddp"]


@pytest.mark.parametrize("name", JOBS)
def test_weights_are_identical_on_both_ranks_after_training(two_processes, name):
    out, ranks = two_processes
    saved = torch.load(out / name / "model_final.pth", map_location="cpu", weights_only=False)
    assert ranks[0][name]["weights"] == ranks[1][name]["weights"] == state_hash(saved["model"])


@pytest.fixture(scope="module")
def one_process_losses():
    """{model: (batch of 2, mean of each image alone)} in this (single) process."""
    found = {}
    for name, (config, _) in JOBS.items():
        cfg = fast_cfg(config)
        batch = fixed_batch(cfg)
        alone = [loss_and_gradient(cfg, [x]) for x in batch]
        found[name] = (loss_and_gradient(cfg, batch),
                       {k: np.mean([a[k] for a in alone], axis=0).tolist() for k in alone[0]})
    return found


def _assert_same_step(two, one):
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    a, b = np.asarray(two["gradient"]), np.asarray(one["gradient"])
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)


@pytest.mark.parametrize("name", JOBS)
def test_loss_and_gradient_equal_one_process_batch(two_processes, one_process_losses, name):
    _, ranks = two_processes
    batch, alone = one_process_losses[name]
    for info in ranks:  # the loss is reduced over the ranks; DDP averages the gradient
        _assert_same_step(info[name]["fixed"], batch)
    if name == "cpr":
        # The two images hold different numbers of objects: the batch loss is not the mean
        # of the per-image losses, so the comparison above can tell them apart.
        assert batch["loss"] != pytest.approx(alone["loss"], rel=1e-4)


def _losses(metrics_json):
    rows = [json.loads(line) for line in metrics_json.read_text().splitlines()]
    return {r["iteration"]: r["total_loss"] for r in rows if "total_loss" in r}


@pytest.mark.parametrize("name", JOBS)
def test_training_losses_equal_one_process_with_the_same_total_batch(two_processes, name,
                                                                     tmp_path):
    out, _ = two_processes
    config, test_sets = JOBS[name]
    _train(config, tmp_path, "()")
    two, one = _losses(out / name / "metrics.json"), _losses(tmp_path / "metrics.json")
    # detectron2 writes metrics every 20 iterations and at the end: here iteration 2, the
    # median of the 3 steps' losses.
    assert sorted(two) == sorted(one) == [2]
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-4), f"iteration {it}"


def test_distributed_evaluation_sees_each_image_once_and_matches_one_process(two_processes):
    from detectron2.data import DatasetCatalog

    out, ranks = two_processes
    shares = [info["p2p"]["eval_image_ids"] for info in ranks]
    all_ids = [r["image_id"] for r in DatasetCatalog.get("forest_test")]
    assert all(shares) and sorted(shares[0] + shares[1]) == sorted(all_ids)  # disjoint, complete
    two = ranks[0]["p2p"]["results"]["point_ap"]
    assert ranks[1]["p2p"]["results"] == {}  # only the main process evaluates

    train_net = load_tool("train_net")
    one = train_net.main(train_net.argument_parser().parse_args(
        ["--config-file", P2P, "--eval-only", "MODEL.WEIGHTS", str(out / "p2p" / "model_final.pth"),
         "OUTPUT_DIR", str(out / "p2p_eval"), "DATALOADER.NUM_WORKERS", "0"]))["point_ap"]
    assert two.keys() == one.keys()
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_gather_per_image_keeps_each_image_once_on_the_main_process(two_processes):
    _, ranks = two_processes
    assert ranks[1]["gathered"] is None
    gathered = dict(ranks[0]["gathered"])
    assert sorted(gathered) == list(GATHER_IDS) and len(ranks[0]["gathered"]) == len(GATHER_IDS)
    assert all(rank == image % 2 for image, rank in gathered.items())  # the first row wins


def test_refine_export_writes_the_same_json_with_two_processes(two_processes, tmp_path):
    from cpr_d2.data import dataset_files

    out, _ = two_processes
    json_file, image_root = dataset_files("forest")
    source = json.loads(Path(json_file).read_text())
    images = source["images"][:4]
    keep = {im["id"] for im in images}
    source["images"] = images
    source["annotations"] = [a for a in source["annotations"] if a["image_id"] in keep]
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(source))
    common = ["--config-file", CPR, "--json", str(subset), "--image-root", image_root]
    opts = ["MODEL.WEIGHTS", str(out / "cpr" / "model_final.pth"), "DATALOADER.NUM_WORKERS", "0"]

    refine_export = load_tool("refine_export")
    one = tmp_path / "one.json"
    threads = torch.get_num_threads()
    # As many threads as each of the 2 processes has (launch shares the cores): the
    # float results of a convolution may differ in the last bit with the thread count.
    torch.set_num_threads(two_processes[1][0]["threads"])
    try:
        refine_export.main(refine_export.parse_args(
            [*common, "--output", str(one), *opts, "OUTPUT_DIR", str(tmp_path / "one")]))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two.json"
    subprocess.run(
        [sys.executable, "tools/refine_export.py", *common, "--output", str(two),
         "--num-gpus", "0", "--num-workers", "2", "--dist-url", "auto",
         *opts, "OUTPUT_DIR", str(tmp_path / "two")],
        cwd=ROOT, check=True, env=os.environ.copy())
    assert json.loads(two.read_text()) == json.loads(one.read_text())
    assert two.read_bytes() == one.read_bytes()
    assert sum("refine_score" in a for a in json.loads(two.read_text())["annotations"]) > 0


# ---- launch's choices and messages (no process is started) -----------------------------

def _where(*args):
    return ("ran here", args)


def test_one_process_jobs_run_in_this_process():
    assert launch(_where, 0, args=(1,)) == ("ran here", (1,))
    assert launch(_where, 0, num_workers=1, backend="gloo", args=(2,)) == ("ran here", (2,))
    assert launch(_where, 1, args=(3,)) == ("ran here", (3,))  # detectron2's default --num-gpus 1


def test_check_launch_picks_the_path():
    assert check_launch(0, num_workers=2) == ("gloo", 2)
    assert check_launch(0, num_workers=2, backend="gloo", dist_url="auto") == ("gloo", 2)
    assert check_launch(0, num_machines=2, machine_rank=1,
                        dist_url="tcp://10.0.0.1:23456") == ("gloo", 1)
    assert check_launch(1) == check_launch(0) == ("here", 1)


@pytest.mark.parametrize("call,message", [
    (dict(num_gpus_per_machine=1, num_workers=2), r"--num-workers 2 .* needs --num-gpus 0"),
    (dict(num_gpus_per_machine=1, backend="gloo"), r"--backend gloo .* pass --num-gpus 0"),
    (dict(num_gpus_per_machine=0, backend="nccl"), r"--backend nccl"),
    (dict(num_gpus_per_machine=0, backend="mpi"), r"--backend mpi: choose one of auto, nccl, gloo"),
    (dict(num_gpus_per_machine=0, num_workers=-1), r"--num-workers -1: must be an integer >= 0"),
    (dict(num_gpus_per_machine=0, num_workers=2, machine_rank=1), r"--machine-rank 1"),
    (dict(num_gpus_per_machine=0, num_workers=1, num_machines=2, dist_url="auto"),
     r"--dist-url auto only works on one machine"),
])
def test_bad_combinations_name_the_flag(call, message):
    with pytest.raises(ValueError, match=message):
        launch(_where, **call)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages without CUDA")
def test_gpu_jobs_without_cuda_point_to_the_cpu_path():
    with pytest.raises(ValueError, match=r"--num-gpus 2 asks for CUDA GPUs .* --num-gpus 0 "
                                         r"--num-workers N"):
        launch(_where, 2)
    with pytest.raises(ValueError, match=r"--backend nccl needs CUDA GPUs"):
        launch(_where, 1, backend="nccl")


def test_tools_exit_with_the_message_of_a_bad_combination():
    args = load_tool("train_net").argument_parser().parse_args(
        ["--num-gpus", "0", "--num-workers", "2", "--backend", "nccl"])
    with pytest.raises(SystemExit, match=r"error: --backend nccl runs one process per CUDA GPU"):
        launch_from_args(_where, args)


def test_tools_take_the_launch_flags():
    args = load_tool("train_net").argument_parser().parse_args(
        ["--num-gpus", "0", "--num-workers", "2", "--backend", "gloo", "--dist-url", "auto"])
    assert (args.num_gpus, args.num_workers, args.backend, args.dist_url) == (0, 2, "gloo", "auto")
    args = load_tool("refine_export").parse_args(
        ["--dataset", "forest", "--output", "x.json", "--num-gpus", "0", "--num-workers", "2"])
    assert (args.num_workers, args.backend, args.num_machines) == (2, "auto", 1)


def test_gpu_jobs_go_to_detectron2_launch_with_every_flag(monkeypatch):
    """--num-gpus N >= 1 (NCCL) is detectron2's launch, given the machines, the rank,
    the URL and the timeout as they were passed (CUDA faked: no process is started)."""
    import cpr_d2.engine.launch as cpr_launch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(cpr_launch.d2_launch_module, "launch",
                        lambda *a, **kw: calls.append((a, kw)))
    parser = load_tool("train_net").argument_parser()
    args = parser.parse_args(["--num-gpus", "8", "--num-machines", "2", "--machine-rank", "1",
                              "--dist-url", "tcp://10.0.0.1:23456"])
    assert launch_from_args(_where, args) is None
    assert calls == [((_where, 8), dict(num_machines=2, machine_rank=1,
                                        dist_url="tcp://10.0.0.1:23456", args=(args,),
                                        timeout=cpr_launch.DEFAULT_TIMEOUT))]
    # One machine, 2 GPUs, --dist-url auto: a free port on this machine.
    args = parser.parse_args(["--num-gpus", "2", "--dist-url", "auto"])
    launch_from_args(_where, args)
    (func, gpus), kwargs = calls[-1]
    assert (func, gpus, kwargs["num_machines"], kwargs["machine_rank"]) == (_where, 2, 1, 0)
    assert kwargs["dist_url"].startswith("tcp://127.0.0.1:")
    # More GPUs than the machine has: the message, before anything starts.
    with pytest.raises(SystemExit, match=r"--num-gpus 9 is more than the 8 CUDA GPU"):
        launch_from_args(_where, parser.parse_args(["--num-gpus", "9"]))
    assert len(calls) == 2


def test_a_finished_worker_runs_the_exit_handlers_and_exits_0(tmp_path):
    """end_worker_process: the worker's Python exit handlers run and its output is
    flushed, the exit status is 0, and nothing after the call runs."""
    marker, after = tmp_path / "handler_ran", tmp_path / "after"
    code = (
        "import atexit, sys\n"
        "from cpr_d2.engine.launch import end_worker_process\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "sys.stdout.write('unflushed line')\n"
        "end_worker_process()\n"
        f"open({str(after)!r}, 'w').write('reached')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "unflushed line"
    assert marker.read_text() == "ran"
    assert not after.exists()
