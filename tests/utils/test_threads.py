"""The share of the cores between cpr_d2 jobs (cpr_d2.utils.threads)."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from cpr_d2.utils import threads
from cpr_d2.utils.threads import MachineShare, running_jobs, share_policy


@pytest.mark.parametrize("environ, expected", [
    ({}, "auto"),
    ({"CPR_D2_THREADS": "auto"}, "auto"),
    ({"CPR_D2_THREADS": " Unmanaged "}, "unmanaged"),
    ({"CPR_D2_THREADS": "3"}, 3),
    ({"OMP_NUM_THREADS": "1"}, "unmanaged"),  # the user's own choice is kept
    ({"OMP_NUM_THREADS": "1", "CPR_D2_THREADS": "2"}, 2),
])
def test_policy(environ, expected):
    assert share_policy(environ) == expected


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5"])
def test_bad_policy_names_the_variable_and_its_values(value):
    with pytest.raises(ValueError, match=r"CPR_D2_THREADS=.*'auto'.*'unmanaged'.*positive"):
        share_policy({"CPR_D2_THREADS": value})


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _announce(folder, pid, started=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, str(pid)), "w") as f:
        f.write(threads._start_time(pid) if started is None else started)


def test_running_jobs_forgets_dead_and_reused_pids(tmp_path):
    folder = str(tmp_path / "jobs")
    alive, dead = _sleeper(), subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        _announce(folder, alive.pid)
        _announce(folder, dead.pid, started="1")
        # A live process whose start time is not the announced one: its pid was reused.
        reused = _sleeper()
        _announce(folder, reused.pid, started="1")
        (tmp_path / "jobs" / "notes.txt").write_text("not a job")
        found = running_jobs(folder)
        assert found == [alive.pid] or (threads._start_time(reused.pid) is None
                                        and found == sorted([alive.pid, reused.pid]))
        assert not (tmp_path / "jobs" / str(dead.pid)).exists()
    finally:
        for p in (alive, reused):
            p.kill()
            p.wait()


def test_share_follows_the_jobs_and_restores_threads(tmp_path, caplog):
    folder = str(tmp_path / "jobs")
    before = torch.get_num_threads()
    share = MachineShare(folder=folder, cores=4, environ={})
    other = _sleeper()
    torch.set_num_threads(4)  # torch's default on a 4-core machine
    try:
        with caplog.at_level(logging.INFO, logger="cpr_d2.utils.threads"):
            with share:
                assert os.path.exists(share.path)
                assert torch.get_num_threads() == 4 and share.threads == 4  # alone
                _announce(folder, other.pid)  # a second job starts
                share.recheck()  # within RECHECK_SECONDS of the last check: unchanged
                assert torch.get_num_threads() == 4
                share.recheck(force=True)
                assert torch.get_num_threads() == 2
                with share:  # nested (inference inside training): one announcement
                    pass
                assert os.path.exists(share.path)
                other.kill()
                other.wait()
                share.recheck(force=True)  # the other job ended: all cores again
                assert torch.get_num_threads() == 4
        assert not os.path.exists(share.path)
        assert torch.get_num_threads() == 4  # as it was before the work
        assert "2 torch threads: 2 cpr_d2 jobs share 4 cores" in caplog.text
        assert "4 torch threads: the only cpr_d2 job on 4 cores" in caplog.text
    finally:
        other.kill()
        other.wait()
        torch.set_num_threads(before)


def test_more_jobs_than_cores_get_one_thread_each(tmp_path):
    folder = str(tmp_path / "jobs")
    before = torch.get_num_threads()
    others = [_sleeper() for _ in range(3)]
    try:
        for p in others:
            _announce(folder, p.pid)
        with MachineShare(folder=folder, cores=2, environ={}):
            assert torch.get_num_threads() == 1
    finally:
        for p in others:
            p.kill()
            p.wait()
        torch.set_num_threads(before)


def test_share_never_raises_the_threads_a_program_set(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with MachineShare(folder=str(tmp_path / "jobs"), cores=4, environ={}) as share:
            share.recheck(force=True)
            assert torch.get_num_threads() == 1  # alone on 4 cores, but it asked for 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fixed_and_unmanaged_policies_announce_nothing(tmp_path):
    folder = str(tmp_path / "jobs")
    before = torch.get_num_threads()
    try:
        with MachineShare(folder=folder, cores=4, environ={"CPR_D2_THREADS": "3"}) as share:
            assert torch.get_num_threads() == 3
            share.recheck(force=True)
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == before
        torch.set_num_threads(1)
        with MachineShare(folder=folder, cores=4, environ={"OMP_NUM_THREADS": "1"}):
            assert torch.get_num_threads() == 1  # left as the user set it
        assert not os.path.exists(folder)
    finally:
        torch.set_num_threads(before)


def test_unwritable_folder_runs_unshared(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    share = MachineShare(folder=str(blocker / "jobs"), cores=2, environ={})
    with caplog.at_level(logging.WARNING, logger="cpr_d2.utils.threads"), share:
        assert share.policy == "unmanaged"
    assert "cannot announce this job" in caplog.text


def test_the_trainer_hook_shares_while_training(tmp_path, monkeypatch):
    from cpr_d2.engine.trainer import MachineShareHook

    folder = str(tmp_path / "jobs")
    share = MachineShare(folder=folder, cores=2, environ={})
    monkeypatch.setattr(threads, "_SHARE", share)
    monkeypatch.setattr(share, "path", os.path.join(folder, str(os.getpid())))
    before = torch.get_num_threads()
    other = _sleeper()
    try:
        torch.set_num_threads(2)
        _announce(folder, other.pid)
        hook = MachineShareHook()
        hook.before_train()
        assert running_jobs(folder) == sorted([os.getpid(), other.pid])
        assert torch.get_num_threads() == 1
        hook.before_step()
        hook.after_train()
        assert running_jobs(folder) == [other.pid] and torch.get_num_threads() == 2
    finally:
        other.kill()
        other.wait()
        torch.set_num_threads(before)
