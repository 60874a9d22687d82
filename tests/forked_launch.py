"""Launcher runs forked from a warm fork server: the same ``launchers.train.main`` entry, without cold interpreters.

A ``python -m launchers.train`` subprocess spends ~2.5 s of CPU importing torch, and each rank of a torchrun
launch ~5 s more importing megatron-core. Here each run is forked by multiprocessing's fork server, started
once per test process with those modules imported (torch, megatron-core's ``parallel_state``, the launcher
and its TRL backend), so a run starts in milliseconds. The fork server is a fresh interpreter: a child
inherits neither the test process's threads nor its state (a gloo process group left by an in-process test
would hang a forked child in its destructor, which joins threads the child does not have). A rank gets the environment
torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and goes through
the same command-line validation, Hydra job, gloo process group and megatron-core ``parallel_state`` path.

Each child runs the command line in the repository root, writes its stdout and stderr to ``rank<N>.log`` in
``log_dir`` (the failure message shows them) and leaves with ``os._exit``. The children use one torch
thread, as the test workers do.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


PRELOAD = ["torch", "megatron.core.parallel_state", "launchers.train", "launchers.backends.toy.trainer",
           "launchers.backends.hf.train", "tests.forked_launch"]


def _context():
    """multiprocessing's fork server, importing :data:`PRELOAD` once when it starts."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    atexit.register(_stop_fork_server)
    return ctx


def _stop_fork_server() -> None:
    """Stop and reap the fork server at exit, so its runs' CPU time counts in the test process's children."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # CPython's own teardown (3.8+), not public API
    if stop is not None:
        stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(args: list[str], env: dict[str, str], log: Path) -> None:
    """Body of a forked child: never returns."""
    import logging

    logging.getLogger("megatron").setLevel(logging.WARNING)
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        # a fresh interpreter's handlers (pytest and xdist may have set their own)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(ROOT)
        os.environ.update(env)
        import torch

        torch.set_num_threads(1)
        from launchers.train import main

        sys.argv = ["launchers.train", *args]
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports every failure through its exit code and log
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class ForkedRun:
    """The ranks of one forked launch, with the part of :class:`subprocess.Popen` the tests use.

    ``pid`` is rank 0's; ``returncode`` is rank 0's exit code (``-N`` for a signal) once every rank has
    ended; ``communicate`` returns rank 0's log (stdout and stderr together) and ``None``.
    """

    def __init__(self, args: list[str], nproc: int, log_dir: Path, env: dict[str, str] | None = None) -> None:
        ctx = _context()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{rank}.log" for rank in range(nproc)]
        port = str(free_port())
        self.procs = []
        for rank in range(nproc):
            ranks = {} if nproc == 1 else {
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            }
            proc = ctx.Process(target=_child, args=(args, {**(env or {}), **ranks}, self.logs[rank]), daemon=True)
            proc.start()
            self.procs.append(proc)
        self.pid = self.procs[0].pid
        self.pids = [proc.pid for proc in self.procs]

    @property
    def returncode(self) -> int | None:
        codes = [proc.exitcode for proc in self.procs]
        return None if None in codes else codes[0]

    def poll(self) -> int | None:
        """The ranks' state; as torchrun does, one failed rank stops the others."""
        if any(proc.exitcode not in (None, 0) for proc in self.procs):
            self.kill()
        return self.returncode

    def _signal_running(self, signum: int) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                os.kill(proc.pid, signum)

    def send_signal(self, signum: int) -> None:
        """Signal rank 0."""
        if self.procs[0].exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self._signal_running(signal.SIGKILL)

    def wait(self, timeout: float = 300) -> int:
        """Wait for every rank; kill them all (-9) past ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
            time.sleep(0.01)
        return self.returncode

    def communicate(self, timeout: float = 300) -> tuple[str, None]:
        self.wait(timeout)
        return self.logs[0].read_text(), None

    def results(self) -> list[tuple[int, str]]:
        """[(exit code, log)] of every rank, once ended."""
        return [(proc.exitcode, log.read_text()) for proc, log in zip(self.procs, self.logs, strict=True)]


def launch(args: list[str], nproc: int, log_dir: Path, timeout: float = 300) -> list[tuple[int, str]]:
    """Fork ``nproc`` ranks of ``python -m launchers.train ARGS`` and wait for them: [(exit code, log)] per rank.

    ``nproc == 1`` is a plain one-process run (no torchrun variables); more ranks get torchrun's
    environment on a free local port. Ranks still running after ``timeout`` seconds are killed (-9).
    """
    run = ForkedRun(args, nproc, log_dir)
    run.wait(timeout)
    return run.results()


def launch_ok(args: list[str], nproc: int, log_dir: Path, timeout: float = 300) -> None:
    """:func:`launch`, asserting that every rank exits 0 (the message holds the failed ranks' logs)."""
    results = launch(args, nproc, log_dir, timeout)
    failed = [f"rank {r} exit {code}:\n{log[-3000:]}" for r, (code, log) in enumerate(results) if code != 0]
    assert not failed, "\n".join(failed)
