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


def preload() -> None:
    """Import what every child would import, once, in the test process (megatron-core: ~5 s of CPU)."""
    import logging

    import torch  # noqa: F401

    import launchers.backends.toy.trainer  # noqa: F401
    import launchers.train  # noqa: F401

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
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
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


def launch(args: list[str], nproc: int, log_dir: Path, timeout: float = 300) -> list[tuple[int, str]]:
    """Fork ``nproc`` ranks of ``python -m launchers.train ARGS`` and wait for them: [(exit code, log)] per rank.

    ``nproc == 1`` is a plain one-process run (no torchrun variables); more ranks get torchrun's
    environment on a free local port. A rank still running after ``timeout`` seconds is killed (-9).
    """
    preload()
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    pids = []
    for rank in range(nproc):
        env = {} if nproc == 1 else {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        }
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(args, env, log_dir / f"rank{rank}.log")
        pids.append(pid)
    deadline = time.monotonic() + timeout
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                if codes[pid] != 0:  # as torchrun does: one failed rank stops the others
                    for other in pids:
                        if other not in codes:
                            os.kill(other, signal.SIGKILL)
        if time.monotonic() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return [(codes[pid], (log_dir / f"rank{rank}.log").read_text()) for rank, pid in enumerate(pids)]


def launch_ok(args: list[str], nproc: int, log_dir: Path, timeout: float = 300) -> None:
    """:func:`launch`, asserting that every rank exits 0 (the message holds the failed ranks' logs)."""
    results = launch(args, nproc, log_dir, timeout)
    failed = [f"rank {r} exit {code}:\n{log[-3000:]}" for r, (code, log) in enumerate(results) if code != 0]
    assert not failed, "\n".join(failed)
