"""Multi-process launch on GPUs (NCCL, detectron2's launch) or on CPUs (gloo).

detectron2 0.6's ``launch()`` spawns one process per GPU and needs CUDA. This
module adds the CPU path: ``num_workers`` processes per machine that join a gloo
process group and then run the same ``main_func`` (so the same Trainer).
torch.distributed does the work; what is added here is the choice of path, the
checks with their messages, and two details detectron2 assumes CUDA for:

* ``comm._LOCAL_PROCESS_GROUP`` (the ranks of this machine) is created exactly as
  detectron2's ``_distributed_worker`` does, so ``comm.get_local_rank()`` works;
* ``DefaultTrainer`` wraps the model with ``create_ddp_model(model,
  broadcast_buffers=False)``, which passes ``device_ids=[local rank]``;
  ``DistributedDataParallel`` refuses device ids for a CPU model. In CPU worker
  processes (only there) detectron2's ``create_ddp_model`` is replaced by
  :func:`create_ddp_model`, which passes ``device_ids=None`` for a CPU model.

``SOLVER.IMS_PER_BATCH`` stays the total batch over all processes (detectron2
divides it by the world size), so a run with N processes sees the same number
of images per step as a run with one.
"""
import atexit
import contextlib
import importlib
import logging
import os
import sys
import tempfile
from datetime import timedelta

import detectron2.engine as d2_engine
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm

# The module: detectron2.engine's attribute `launch` is the function.
d2_launch_module = importlib.import_module("detectron2.engine.launch")

__all__ = ["BACKENDS", "DEFAULT_TIMEOUT", "check_launch",
           "create_ddp_model", "end_worker_process", "launch", "launch_from_args"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
DEFAULT_TIMEOUT = getattr(d2_launch_module, "DEFAULT_TIMEOUT", timedelta(minutes=30))
_D2_CREATE_DDP_MODEL = d2_defaults.create_ddp_model


def launch_from_args(main_func, args):
    """launch(main_func, ...) with the flags of tools/cli_args.py's launch_parser;
    main_func is called as main_func(args). A combination of flags that cannot run
    exits with its message (no traceback) before anything starts."""
    kwargs = dict(num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, backend=getattr(args, "backend", None),
                  num_workers=getattr(args, "num_workers", 0))
    try:
        check_launch(args.num_gpus, **kwargs)
    except ValueError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'launch'}: error: {e}") from None
    return launch(main_func, args.num_gpus, args=(args,), **kwargs)


def check_launch(num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None,
                 backend=None, num_workers=0):
    """How launch() would run: ("here", 1), ("nccl", GPUs per machine) or ("gloo", CPU
    processes per machine). Raises ValueError, naming the flag and the fix, for a
    combination that cannot run."""
    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    for flag, value, least in (("--num-gpus", num_gpus_per_machine, 0),
                               ("--num-workers", num_workers, 0),
                               ("--num-machines", num_machines, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{flag} {value}: must be an integer >= {least}")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"--machine-rank {machine_rank}: must be in [0, {num_machines}) with "
                         f"--num-machines {num_machines}")
    if num_gpus_per_machine >= 1:
        _check_gpu_job(num_gpus_per_machine, num_machines, backend, num_workers)
        mode, per_machine = "nccl", num_gpus_per_machine
    elif backend == "nccl":
        raise ValueError("--backend nccl runs one process per CUDA GPU, but --num-gpus is 0; "
                         "set --num-gpus to the GPUs per machine, or use --backend gloo (or auto) "
                         "with --num-workers N for CPU processes")
    else:
        mode, per_machine = "gloo", max(num_workers, 1)
    if per_machine * num_machines == 1:
        # One process in the whole job runs here, CUDA or not (MODEL.DEVICE decides), as
        # detectron2's launch does.
        return "here", 1
    if num_machines > 1 and _is_auto(dist_url):
        raise ValueError(f"--dist-url {dist_url or 'auto'} only works on one machine; with "
                         f"--num-machines {num_machines} pass the address of machine 0 that "
                         "every machine can reach, e.g. --dist-url tcp://10.0.0.1:23456")
    return mode, per_machine


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None,
           args=(), backend=None, num_workers=0, timeout=DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in every process of a (possibly) distributed job.

    * ``num_gpus_per_machine >= 1`` (backend auto or nccl): detectron2's launch, one
      process per GPU with NCCL.
    * ``num_gpus_per_machine == 0`` (backend auto or gloo): ``num_workers`` CPU
      processes per machine with gloo.
    * a job of one process in all (e.g. ``--num-gpus 1``, or ``--num-gpus 0`` with
      ``num_workers`` 0 or 1, on one machine): ``main_func`` runs in this process.

    ``dist_url``: the init_method of torch.distributed, e.g. ``tcp://10.0.0.1:23456``;
    "auto" (or None) on one machine: CPU processes meet in a file of a fresh temporary
    folder (no port to collide with another job's), GPU processes on a free port of
    localhost (detectron2's way). Must be called on every machine of the job. Returns
    main_func's result when it ran in this process, else None. Raises ValueError (see
    check_launch) before starting anything.
    """
    mode, per_machine = check_launch(num_gpus_per_machine, num_machines, machine_rank,
                                     dist_url, backend, num_workers)
    if mode == "here":
        return main_func(*args)
    if mode == "nccl":
        d2_launch_module.launch(main_func, per_machine, num_machines=num_machines,
                                machine_rank=machine_rank,
                                dist_url=_dist_url(dist_url, num_machines), args=args,
                                timeout=timeout)
        return None
    with contextlib.ExitStack() as stack:
        if _is_auto(dist_url):
            # One machine: meet in a file of a fresh folder rather than on a "free" port,
            # which a job started at the same moment could take too (EADDRINUSE).
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="cpr_d2_dist_"))
            dist_url = "file://" + os.path.join(folder, "rendezvous")
        else:
            dist_url = _dist_url(dist_url, num_machines)
        mp.start_processes(
            _cpu_worker,
            nprocs=per_machine,
            args=(main_func, num_machines * per_machine, per_machine, machine_rank, dist_url,
                  args, timeout),
            daemon=False,
            start_method="spawn",
        )
    return None


def _check_gpu_job(num_gpus, num_machines, backend, num_workers):
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "nccl" and available == 0:
        raise ValueError("--backend nccl needs CUDA GPUs, but torch sees none; for CPU "
                         "processes use --num-gpus 0 --num-workers N (--backend gloo or auto)")
    if backend == "gloo":
        raise ValueError(f"--backend gloo runs CPU processes, but --num-gpus is {num_gpus} "
                         f"(its default is 1); pass --num-gpus 0 --num-workers N, or use "
                         "--backend nccl (or auto) for GPUs")
    if num_workers > 1:
        raise ValueError(f"--num-workers {num_workers} sets CPU processes and needs --num-gpus 0 "
                         f"(got --num-gpus {num_gpus}, whose default is 1); on GPUs, --num-gpus "
                         "alone sets the processes per machine")
    if num_gpus * num_machines == 1:
        return
    if available == 0:
        raise ValueError(f"--num-gpus {num_gpus} asks for CUDA GPUs (NCCL), but torch sees none; "
                         "for CPU processes use --num-gpus 0 --num-workers N (gloo)")
    if num_gpus > available:
        raise ValueError(f"--num-gpus {num_gpus} is more than the {available} CUDA GPU(s) torch "
                         f"sees on this machine; use --num-gpus {available} or fewer")


def _is_auto(dist_url):
    """True for a --dist-url that leaves the rendezvous to launch (one machine only)."""
    return dist_url in (None, "", "auto")


def _dist_url(dist_url, num_machines):
    if _is_auto(dist_url):
        return f"tcp://127.0.0.1:{d2_launch_module._find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// is not a reliable init_method in multi-machine jobs. Prefer tcp://")
    return dist_url


def create_ddp_model(model, *, fp16_compression=False, **kwargs):
    """detectron2's create_ddp_model, with ``device_ids=None`` (what
    DistributedDataParallel needs) for a model whose parameters are on the CPU."""
    if "device_ids" not in kwargs and comm.get_world_size() > 1 and all(
            p.device.type == "cpu" for p in model.parameters()):
        kwargs["device_ids"] = None
    return _D2_CREATE_DDP_MODEL(model, fp16_compression=fp16_compression, **kwargs)


def _cpu_worker(local_rank, main_func, world_size, workers_per_machine, machine_rank, dist_url,
                args, timeout):
    global_rank = machine_rank * workers_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    try:
        # The local process group (the ranks of this machine), as detectron2's
        # _distributed_worker builds it: every rank creates every machine's group.
        assert comm._LOCAL_PROCESS_GROUP is None
        num_machines = world_size // workers_per_machine
        for i in range(num_machines):
            ranks_on_i = list(range(i * workers_per_machine, (i + 1) * workers_per_machine))
            group = dist.new_group(ranks_on_i)
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
        # N processes share the machine's cores (unless OMP_NUM_THREADS says otherwise).
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, _num_cpus() // workers_per_machine))
        d2_defaults.create_ddp_model = create_ddp_model  # what DefaultTrainer calls
        d2_engine.create_ddp_model = create_ddp_model
        comm.synchronize()
        main_func(*args)
    finally:
        dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None
    end_worker_process()


def end_worker_process():
    """End a spawned CPU worker whose work is done, without the interpreter's teardown.

    A gloo worker that has loaded the compiled op sometimes aborts in its interpreter
    teardown (SIGABRT, "terminate called without an active exception", after
    destroy_process_group and after its work: 3 of 16 two-worker runs on a 2-core CPU),
    and the launching process then reports a failed job although every rank finished.
    Python's exit handlers (logging, the thread-share registry) still run here; only
    the C++ static teardown is skipped."""
    atexit._run_exitfuncs()  # what a normal exit runs first (private, but in every Python 3)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(0)


def _num_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
