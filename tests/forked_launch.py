"""Launcher runs forked from the test process: the same ``launchers.train.main`` entry, without cold interpreters.

A ``python -m launchers.train`` subprocess spends ~2.5 s of CPU importing torch, and each rank of a torchrun
launch ~5 s more importing megatron-core. A forked child inherits the test process's imports (torch,
megatron-core's ``parallel_state``, the launcher), so it starts in milliseconds. A rank gets the environment
torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and goes through
the same command-line validation, Hydra job, gloo process group and megatron-core ``parallel_state`` path.

Each child runs the command line in the repository root, writes its stdout and stderr to ``rank<N>.log`` in
``log_dir`` (the failure message shows them) and leaves with ``os._exit``: nothing of pytest's (its
capture, its atexit hooks, the xdist channel) runs in the child. The children use one torch thread (a fork
after a thread pool started must not use that pool).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def preload(distributed: bool, trl: bool) -> None:
    """Import what every child would import, once, in the test process (megatron-core, ~5 s of CPU, for ranks
    of the toy backend; transformers and TRL for ``backend=trl``)."""
    import logging

    import torch  # noqa: F401

    import launchers.train  # noqa: F401

    if trl:
        import launchers.backends.hf.train  # noqa: F401

        return  # TRL's data parallelism is accelerate's: no megatron-core
    import launchers.backends.toy.trainer  # noqa: F401

    if not distributed:  # a one-process run never imports megatron-core
        return
    logging.getLogger("megatron").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # megatron-core's own, at import
        from megatron.core import parallel_state  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(args: list[str], env: dict[str, str], log: Path) -> None:
    """Body of a forked child: never returns."""
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
        preload(nproc > 1, "backend=trl" in args)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{rank}.log" for rank in range(nproc)]
        port = str(free_port())
        self.pids: list[int] = []
        self.codes: dict[int, int] = {}
        for rank in range(nproc):
            ranks = {} if nproc == 1 else {
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            }
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(args, {**(env or {}), **ranks}, self.logs[rank])
            self.pids.append(pid)
        self.pid = self.pids[0]

    @property
    def returncode(self) -> int | None:
        return self.codes[self.pid] if len(self.codes) == len(self.pids) else None

    def poll(self) -> int | None:
        """Reap the ranks that ended; as torchrun does, one failed rank stops the others."""
        for pid in self.pids:
            if pid not in self.codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.codes[pid] = os.waitstatus_to_exitcode(status)
        if any(code != 0 for code in self.codes.values()):
            self._signal_running(signal.SIGKILL)
        return self.returncode

    def _signal_running(self, signum: int) -> None:
        for pid in self.pids:
            if pid not in self.codes:
                os.kill(pid, signum)

    def send_signal(self, signum: int) -> None:
        """Signal rank 0."""
        if self.pid not in self.codes:
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
        return [(self.codes[pid], log.read_text()) for pid, log in zip(self.pids, self.logs, strict=True)]


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
