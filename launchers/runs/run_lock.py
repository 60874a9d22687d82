"""One live run per folder: ``run.lock`` names the process that owns the run folder.

The lock is a small JSON file created with ``O_EXCL`` (host, pid, the process's start time, the
scheduler job id) and removed when the run ends, however it ends short of SIGKILL. A lock left by a
process that is gone is taken over with a warning: same host and the pid no longer runs (or runs a
different process: the start time differs), or an earlier attempt of the same scheduler job (a SLURM
or submitit requeue, possibly on another node). Anything else is a live run: the launch is refused.
Under torchrun only rank 0 holds the lock: all ranks of one launch share the folder by design.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from launchers.runs.safe_read import read_json

log = logging.getLogger("launchers.train")

LOCK_NAME = "run.lock"
LOCK_CAP = 64 << 10


class RunFolderBusy(Exception):
    """The run folder belongs to a live run; the message is one line naming its owner."""


@dataclass(frozen=True)
class Owner:
    """The process holding a run folder."""

    host: str
    pid: int
    started: str
    process_start: int | None = None
    job_id: str | None = None

    def describe(self) -> str:
        """``pid 123 on host h (started 2026-11-27 10:00:00, job 42)``."""
        job = f", job {self.job_id}" if self.job_id else ""
        return f"pid {self.pid} on host {self.host} (started {self.started}{job})"


def scheduler_job_id() -> str | None:
    """The id of the SLURM (or submitit local) job this process belongs to; it survives a requeue."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"submitit-local:{env['SUBMITIT_LOCAL_JOB_ID']}"
    return None


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat); None without /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def this_process() -> Owner:
    """The lock record of the running process."""
    pid = os.getpid()
    return Owner(socket.gethostname(), pid, f"{datetime.now():%Y-%m-%d %H:%M:%S}", process_start(pid), scheduler_job_id())


def read_owner(path: Path) -> Owner | None:
    """The owner named in a lock file; None when it is missing, empty or damaged."""
    try:
        data = read_json(path, cap=LOCK_CAP)
        return Owner(**{k: data.get(k) for k in Owner.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):  # UnsafeInput is a ValueError
        return None


def stale_reason(held: Owner | None, me: Owner) -> str | None:
    """Why the lock of ``held`` may be taken over by ``me``; None when its owner may be alive."""
    if held is None:
        return "the lock file is empty or damaged"
    if held.host == me.host:
        if held.pid == me.pid and held.process_start == me.process_start:
            return "it is this process's own lock, left by an earlier run in it"
        try:
            os.kill(held.pid, 0)
        except ProcessLookupError:
            return "its process is gone"
        except PermissionError:
            pass  # alive, owned by another user
        if held.process_start is not None and process_start(held.pid) not in (None, held.process_start):
            return "its pid now belongs to another process"
        return None
    if held.job_id and held.job_id == me.job_id:
        return f"it was an earlier attempt of this job ({me.job_id}, requeued)"
    return None


def busy_message(path: Path, held: Owner, me: Owner) -> str:
    """One line: who owns the run folder and what to do."""
    elsewhere = "" if held.host == me.host else f"; if that run is gone, delete {path}"
    return (f"run folder {path.parent} is in use by a live run: {held.describe()}. Wait for it to end or choose "
            f"another hydra.run.dir{elsewhere}")


class RunLock:
    """The lock of one run folder, held by the process that writes it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.owner: Owner | None = None

    def acquire(self) -> None:
        """Take the lock, or take over a dead owner's lock (with a warning).

        Raises:
            RunFolderBusy: a live run owns the folder (one line naming it and what to do).
        """
        me = this_process()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(me), f)
                f.flush()
                os.fsync(f.fileno())
            self.owner = me
            return
        raise RunFolderBusy(f"run folder {self.path.parent}: another launch keeps taking {self.path.name}; retry")

    def _take_over_if_stale(self, me: Owner) -> None:
        held = read_owner(self.path)
        reason = stale_reason(held, me)
        if reason is None:
            raise RunFolderBusy(busy_message(self.path, held, me))
        # Move the stale lock aside: a rename succeeds for one contender only.
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{me.pid}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another launch took it first; try again
        if read_owner(aside) != held:  # replaced meanwhile by a live launch: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = held.describe() if held else "unknown owner"
        log.warning("taking over the lock of run folder %s from %s: %s", self.path.parent, who, reason)

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if self.owner is not None and read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self.owner = None
