"""Sharing the machine's cores between the cpr_d2 jobs running on it.

torch uses every core by default. Two training jobs started on the same 2-core
machine then run four busy OpenMP threads on two cores and each becomes several
times slower than its half of the machine (thread oversubscription). While it
trains or runs inference, a cpr_d2 process therefore announces itself in a
folder shared by this user's jobs (``<tmp>/cpr_d2-jobs-<uid>/<pid>``) and uses
``cores // jobs`` threads (at least one), where ``cores`` are the CPUs this
process may run on and ``jobs`` the cpr_d2 processes announced there and still
alive; never more than the process had when it started the work (a program that
set ``torch.set_num_threads(1)`` keeps one). The count is rechecked every few
seconds, so the first of two jobs gives up half its threads when the second
starts and takes them back when it ends.

The environment variable ``CPR_D2_THREADS`` chooses the policy:
  ``auto`` (default)  the share above;
  ``N`` (an integer)   N threads, whatever else runs (e.g. for bit-identical runs:
                       results of float reductions can depend on the thread count);
  ``unmanaged``        torch's own choice, untouched.
An ``OMP_NUM_THREADS`` set in the environment is the user's choice and is kept
(``auto`` then does nothing).

Only cpr_d2 jobs are counted: another program's threads are not seen.
"""
import atexit
import contextlib
import logging
import os
import tempfile
import time

import torch

__all__ = ["MachineShare", "machine_share", "share_policy", "running_jobs", "job_folder"]

logger = logging.getLogger(__name__)

ENV = "CPR_D2_THREADS"
RECHECK_SECONDS = 2.0


def share_policy(environ=None):
    """"auto", "unmanaged" or an int (threads per job), from CPR_D2_THREADS; an
    OMP_NUM_THREADS set by the user makes "auto" "unmanaged". A bad value raises
    ValueError naming the variable and its values."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "auto").strip().lower() or "auto"
    if value in ("auto", "unmanaged"):
        if value == "auto" and environ.get("OMP_NUM_THREADS"):
            return "unmanaged"
        return value
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{ENV}={environ.get(ENV)!r}: give 'auto' (share the cores with the "
                         "other cpr_d2 jobs), 'unmanaged' (torch's default) or a positive "
                         "number of threads")
    return threads


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def job_folder():
    """The folder where this user's running cpr_d2 jobs announce themselves."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"cpr_d2-jobs-{uid}")


def _start_time(pid):
    """The process's start time (clock ticks since boot, Linux), or None where unknown:
    it tells a live job from a new process that reused a dead job's pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid, started):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return started in ("", None) or now is None or now == started


def running_jobs(folder=None):
    """The pids announced in `folder` whose process is alive; the files of dead ones
    (a job killed before it could remove its own) are removed."""
    folder = folder or job_folder()
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    pids = []
    for name in names:
        if not name.isdigit():
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                started = f.read().strip()
        except OSError:
            continue
        if _alive(int(name), started):
            pids.append(int(name))
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
    return sorted(pids)


class MachineShare:
    """This process's announcement and thread count (one per process: use
    :func:`machine_share`)."""

    def __init__(self, folder=None, cores=None, environ=None):
        self.folder = folder or job_folder()
        self.cores = cores or available_cores()
        self.policy = share_policy(environ)
        self.path = os.path.join(self.folder, str(os.getpid()))
        self.active = 0  # nesting depth of `with share:` blocks
        self.threads = None  # what this object last set
        self._original = None
        self._checked = 0.0

    def _announce(self):
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write(_start_time(os.getpid()) or "")
        os.replace(tmp, self.path)

    def _withdraw(self):
        with contextlib.suppress(OSError):
            os.remove(self.path)

    def __enter__(self):
        self.active += 1
        if self.active == 1 and self.policy != "unmanaged":
            self._original = torch.get_num_threads()
            if self.policy == "auto":
                try:
                    self._announce()
                except OSError as e:  # a read-only tmp: run, unshared
                    logger.warning("cannot announce this job in %s (%s); it uses torch's "
                                   "default threads", self.folder, e)
                    self.policy = "unmanaged"
                    return self
                atexit.register(self._withdraw)
            self.recheck(force=True)
        return self

    def __exit__(self, *exc):
        self.active -= 1
        if self.active == 0 and self.policy != "unmanaged":
            if self.policy == "auto":
                self._withdraw()
                atexit.unregister(self._withdraw)
            if self._original is not None:
                torch.set_num_threads(self._original)
            self.threads = None
        return False

    def wanted(self, jobs=None):
        """The thread count the policy asks for now (`jobs`: the cpr_d2 jobs running, by
        default counted in the folder)."""
        if self.policy == "unmanaged":
            return torch.get_num_threads()
        if self.policy != "auto":
            return self.policy
        if jobs is None:
            jobs = len(running_jobs(self.folder))
        return max(1, min(self._original or self.cores, self.cores // max(1, jobs)))

    def recheck(self, force=False):
        """Set the thread count from the jobs running now (at most every RECHECK_SECONDS
        unless `force`). Cheap: a folder listing."""
        if self.active == 0 or self.policy == "unmanaged":
            return
        now = time.monotonic()
        if not force and now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        jobs = len(running_jobs(self.folder)) if self.policy == "auto" else 0
        threads = self.wanted(jobs)
        if threads != self.threads:
            if self.threads is not None or threads != torch.get_num_threads():
                why = (f": {jobs} cpr_d2 jobs share {self.cores} cores" if jobs > 1 else
                       f": the only cpr_d2 job on {self.cores} cores" if jobs else "")
                logger.info("%d torch threads%s (%s=%s; OMP_NUM_THREADS fixes it)", threads,
                            why, ENV, self.policy)
            torch.set_num_threads(threads)
            self.threads = threads


_SHARE = None


def machine_share():
    """The process's MachineShare: `with machine_share():` around training or inference;
    call `.recheck()` now and then inside (the trainer does, every iteration)."""
    global _SHARE
    if _SHARE is None or _SHARE.path != os.path.join(_SHARE.folder, str(os.getpid())):
        _SHARE = MachineShare()  # first use, or a forked child
    return _SHARE
