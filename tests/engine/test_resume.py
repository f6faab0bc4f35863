"""Checkpoints and resume: a run killed (SIGKILL) mid-training and restarted with
--resume ends with the weights of an uninterrupted run; checkpoints are written
atomically."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/forest/cpr_R18_s8_r2.yaml"
# A small CPRNet, 8 steps, a checkpoint every 2 (after iterations 1, 3, 5, 7), the LR
# step inside the killed part, one data-loader worker (as the forest configs), no
# final evaluation.
TINY = ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "(5,)", "DATALOADER.NUM_WORKERS", "1", "MODEL.CPR.CONV_CHANNELS", "64",
        "MODEL.CPR.NUM_CONVS", "1", "SEED", "0", "DATASETS.TEST", "()"]
TIMEOUT = 600


def _start(out, resume=False, launch=(), overrides=()):
    command = [sys.executable, "tools/train_net.py", *launch, "--config-file", CONFIG]
    command += ["--resume"] if resume else []
    command += TINY + list(overrides) + ["OUTPUT_DIR", str(out)]
    # A session of its own, so that the kill reaches the data-loader worker too. Its
    # temporary files (the launcher's rendezvous folder, which a SIGKILL leaves
    # behind) go under the test's own folder.
    tmp = Path(out).parent / "tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp)})


def _finish(process):
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output[-4000:]
    return output


def _kill_after(process, out, checkpoint):
    """SIGKILL the run (and its worker) once `checkpoint` is tagged as the last one."""
    tag = out / "last_checkpoint"
    deadline = time.monotonic() + TIMEOUT
    while not (tag.is_file() and tag.read_text().strip() == checkpoint):
        assert process.poll() is None, "the run ended before the kill:\n" + process.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_identical(a, b, where="checkpoint"):
    """Equal nested dicts/lists, tensors bitwise."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "-"
            pytest.fail(f"{where} differs (largest difference {diff})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{k}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _last_metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()
             if line.strip()]
    return lines[-1]


def _straight_and_killed(tmp_path, launch=(), overrides=(), before_resume=None):
    """An uninterrupted run and, at the same time, one killed once model_0000003.pth is
    tagged and resumed (after calling before_resume(its folder)). Returns both folders
    and the resumed run's output."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    processes = [_start(straight, launch=launch, overrides=overrides),
                 _start(killed, launch=launch, overrides=overrides)]
    try:
        _kill_after(processes[1], killed, "model_0000003.pth")
        assert not (killed / "model_final.pth").exists()
        if before_resume is not None:
            before_resume(killed)
        processes.append(_start(killed, resume=True, launch=launch, overrides=overrides))
        _finish(processes[0])
        log = _finish(processes[2])
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    return straight, killed, log


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path):
    straight, killed, log = _straight_and_killed(tmp_path)
    # It went on from the checkpoint: iteration, data stream position, LR schedule.
    assert "Starting training from iteration 4" in log
    assert "Loading trainer from" in log
    final, reference = _load(killed / "model_final.pth"), _load(straight / "model_final.pth")
    assert final["iteration"] == reference["iteration"] == 7
    # Weights, optimiser state (Adam's moments), LR scheduler state: bitwise equal.
    _assert_identical(final["model"], reference["model"], "model")
    _assert_identical(final["trainer"], reference["trainer"], "trainer")
    assert final["trainer"]["_trainer"]["optimizer"]["state"]  # the optimiser state is saved
    # The resumed run logged the LR of the schedule after its step at iteration 5.
    assert _last_metrics(killed)["iteration"] == _last_metrics(straight)["iteration"] == 7
    assert _last_metrics(killed)["lr"] == _last_metrics(straight)["lr"]
    for k in (1, 3, 5, 7):
        _assert_identical(_load(killed / f"model_{k:07d}.pth")["model"],
                          _load(straight / f"model_{k:07d}.pth")["model"], f"model_{k:07d}")


def test_two_process_run_killed_and_resumed_ends_with_the_uninterrupted_weights(tmp_path):
    """The same with 2 CPU processes (gloo): the kill takes the launcher and both ranks;
    the resumed job also clears a temporary a kill during a save would leave."""
    stale_name, other_name = ".model_0000005.x1y2z3w4.tmp.pth", ".model_notes.tmp"

    def leave_files(folder):
        (folder / stale_name).write_bytes(b"half a checkpoint")
        (folder / other_name).write_text("kept")  # not a name the checkpointer makes

    straight, killed, log = _straight_and_killed(
        tmp_path, launch=("--num-gpus", "0", "--num-workers", "2"),
        overrides=("DATALOADER.NUM_WORKERS", "0"),  # 2 launchers, 4 ranks, no loader workers
        before_resume=leave_files)
    stale, other = killed / stale_name, killed / other_name
    assert "Starting training from iteration 4" in log
    assert not stale.exists() and f"Removed {stale}" in log
    assert other.read_text() == "kept"
    final, reference = _load(killed / "model_final.pth"), _load(straight / "model_final.pth")
    assert final["iteration"] == reference["iteration"] == 7
    _assert_identical(final["model"], reference["model"], "model")
    _assert_identical(final["trainer"], reference["trainer"], "trainer")
    for k in (5, 7):
        _assert_identical(_load(killed / f"model_{k:07d}.pth")["model"],
                          _load(straight / f"model_{k:07d}.pth")["model"], f"model_{k:07d}")


_SAVE_AND_HANG = """
import sys, time, torch
from cpr_d2.engine.checkpoint import AtomicCheckpointer

model = torch.nn.Linear(3, 2)
checkpointer = AtomicCheckpointer(model, sys.argv[1], save_to_disk=True)
checkpointer.save("model_0000001")
real_save = torch.save

def save_and_hang(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    with open(f, "r+b") as half:
        half.truncate(10)
    print("writing", flush=True)
    time.sleep(600)

torch.save = save_and_hang
with torch.no_grad():
    model.weight.fill_(7.0)
checkpointer.save("model_0000002")
"""


def test_kill_during_a_save_keeps_the_last_checkpoint_and_the_next_run_clears_the_rest(tmp_path):
    from cpr_d2.engine.checkpoint import AtomicCheckpointer

    process = subprocess.Popen([sys.executable, "-c", _SAVE_AND_HANG, str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # blocks until the save hangs, or the end
    finally:
        process.kill()  # SIGKILL, in the middle of the save
        _out, err = process.communicate(timeout=60)
    assert line.strip() == "writing", err[-4000:]
    assert process.returncode == -signal.SIGKILL
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and names[1:] == ["last_checkpoint", "model_0000001.pth"], names
    assert names[0].startswith(".model_0000002.") and names[0].endswith(".tmp.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    fresh = torch.nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(fresh, str(tmp_path), save_to_disk=True)
    checkpointer.load(str(tmp_path / "model_0000001.pth"))
    assert not torch.equal(fresh.weight, torch.full((2, 3), 7.0))
    assert checkpointer.remove_stale_temporaries() == [str(tmp_path / names[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == names[1:]
    # Without permission to save (another rank), nothing is touched.
    (tmp_path / names[0]).write_bytes(b"x")
    assert AtomicCheckpointer(fresh, str(tmp_path), save_to_disk=False
                              ).remove_stale_temporaries() == []
    assert (tmp_path / names[0]).exists()


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)


def test_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    from cpr_d2.engine.checkpoint import AtomicCheckpointer

    model = _Model()
    checkpointer = AtomicCheckpointer(model, str(tmp_path), save_to_disk=True)
    checkpointer.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"

    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as half:  # half written, then the kill
            half.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt

    with torch.no_grad():
        model.linear.weight.fill_(7.0)
    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final")
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000009")
    monkeypatch.undo()

    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    fresh = _Model()
    AtomicCheckpointer(fresh).load(str(tmp_path / "model_final.pth"))
    assert not torch.equal(fresh.linear.weight, model.linear.weight)


def test_checkpointer_refuses_non_finite_weights(tmp_path):
    from cpr_d2.engine.checkpoint import AtomicCheckpointer

    model = _Model()
    checkpointer = AtomicCheckpointer(model, str(tmp_path), save_to_disk=True)
    checkpointer.save("model_0000001")
    with torch.no_grad():
        model.linear.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"linear\.bias.*model_0000001\.pth"):
        checkpointer.save("model_final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]


def test_ema_run_killed_and_resumed_ends_with_the_uninterrupted_average(tmp_path):
    ema = ["SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.9"]
    straight, killed, log = _straight_and_killed(tmp_path, overrides=ema)
    assert "Starting training from iteration 4" in log
    final, reference = _load(killed / "model_final.pth"), _load(straight / "model_final.pth")
    assert "EMAHook" in final["trainer"]["hooks"]  # the average is in the checkpoint
    _assert_identical(final["model"], reference["model"], "model")
    _assert_identical(_load(killed / "model_0000005.pth")["trainer"]["hooks"]["EMAHook"],
                      _load(straight / "model_0000005.pth")["trainer"]["hooks"]["EMAHook"], "EMA")


def _periodic(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model_"))


def test_checkpoint_max_keep_keeps_the_newest_periodic_checkpoints_across_a_resume(tmp_path):
    """SOLVER.CHECKPOINT_MAX_KEEP 2: the uninterrupted run keeps model_0000005/7; the run
    killed after model_0000003 (1 and 3 on disk) counts them after its resume, so it
    ends with the same files, and the same weights."""
    straight, killed, log = _straight_and_killed(
        tmp_path, overrides=("SOLVER.CHECKPOINT_MAX_KEEP", "2"))
    assert "Starting training from iteration 4" in log
    expected = ["model_0000005.pth", "model_0000007.pth", "model_final.pth"]
    assert _periodic(straight) == expected
    assert _periodic(killed) == expected
    _assert_identical(_load(killed / "model_final.pth")["model"],
                      _load(straight / "model_final.pth")["model"], "model")


def test_keep_newest_periodic_deletes_only_older_checkpoints_of_the_run(tmp_path):
    from cpr_d2.engine.checkpoint import keep_newest_periodic

    for name in ("model_0000001.pth", "model_0000003.pth", "model_0000005.pth",
                 "model_0000009.pth", "model_final.pth", "model_notes.pth"):
        (tmp_path / name).write_bytes(b"x")
    resumed = str(tmp_path / "model_0000005.pth")
    kept = keep_newest_periodic(str(tmp_path), resumed, 2)
    assert kept == [str(tmp_path / "model_0000003.pth"), resumed]
    # Older ones beyond the count go; a newer one (another run's), the final model and
    # files of other names stay.
    assert _periodic(tmp_path) == ["model_0000003.pth", "model_0000005.pth",
                                   "model_0000009.pth", "model_final.pth", "model_notes.pth"]
    # Resumed from the final model: every periodic checkpoint counts as older.
    kept = keep_newest_periodic(str(tmp_path), str(tmp_path / "model_final.pth"), 1)
    assert kept == [str(tmp_path / "model_0000009.pth")]
    assert _periodic(tmp_path) == ["model_0000009.pth", "model_final.pth", "model_notes.pth"]


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_checkpoint_max_keep_rejects_what_is_no_count(value):
    from cpr_d2.config import get_cpr_d2_cfg
    from cpr_d2.engine.trainer import checkpoint_max_keep

    cfg = get_cpr_d2_cfg()
    cfg.SOLVER.CHECKPOINT_MAX_KEEP = value
    with pytest.raises(ValueError, match="SOLVER.CHECKPOINT_MAX_KEEP"):
        checkpoint_max_keep(cfg)
    cfg.SOLVER.CHECKPOINT_MAX_KEEP = 0
    assert checkpoint_max_keep(cfg) is None
    cfg.SOLVER.CHECKPOINT_MAX_KEEP = 3
    assert checkpoint_max_keep(cfg) == 3
