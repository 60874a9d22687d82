"""How a running job ends when it cannot go on: one line on stderr and an exit code, never a traceback.

- :class:`RunStopped` (raised by a backend, e.g. on non-finite gradients) and runtime failures of the
  machine (a full disk, an unwritable file, out of memory): one line, exit code :data:`EXIT_RUNTIME`.
  Whatever the run wrote before (checkpoints, ``metrics.jsonl`` lines) is intact: checkpoints are
  written atomically, and metric lines are appended.
- A run-folder file refused by :mod:`launchers.runs.safe_read` (damaged, a FIFO, too large): one line,
  exit code 2, as for a configuration problem.

Also :func:`claim_and_record`: lock and decide before Hydra's staged record enters the run folder.
See ``docs/run-safety-guarantees.md``.
"""

from __future__ import annotations

import errno
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from launchers.runs.safe_read import UnsafeInput

EXIT_RUNTIME = 1
EXIT_INPUT = 2


class RunStopped(RuntimeError):
    """A run that must stop before it does harm; the message is one line saying why and what to do."""


def _oom(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))


def describe(err: BaseException, run_dir: str | Path) -> tuple[str, int] | None:
    """(one line, exit code) for a failure :func:`one_line` ends a run on; None for any other exception."""
    if isinstance(err, RunStopped):
        return str(err), EXIT_RUNTIME
    if isinstance(err, UnsafeInput):
        return f"run folder {run_dir}: {err}; restore or remove that file", EXIT_INPUT
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        what = err.strerror or errno.errorcode.get(err.errno or 0, type(err).__name__)
        hint = "free some space, then" if err.errno == errno.ENOSPC else "fix that, then"
        return (f"run stopped: {where}{what}. The checkpoints and metrics written before are intact; "
                f"{hint} continue with resume=true"), EXIT_RUNTIME
    if _oom(err):
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return (f"run stopped: out of memory ({first}); lower rollout.prompts_per_rollout, "
                "rollout.n_samples_per_prompt, rollout.max_response_len or trainer.micro_batch_size"), EXIT_RUNTIME
    return None


@contextmanager
def one_line(run_dir: str | Path) -> Iterator[None]:
    """End the job with :func:`describe`'s line and exit code for the failures it knows; others pass through."""
    try:
        yield
    except Exception as err:
        known = describe(err, run_dir)
        if known is None:
            raise
        print(known[0], file=sys.stderr)
        raise SystemExit(known[1]) from None


def move_record(staged: Path, run_dir: Path) -> None:
    """Copy Hydra's record files from ``staged`` into ``run_dir/.hydra`` (each atomically), then drop ``staged``."""
    from launchers.runs.run_io import atomic_write

    target = run_dir / ".hydra"
    target.mkdir(exist_ok=True)
    _move_log_files(staged, run_dir)
    for source in sorted(staged.glob("*.yaml")):
        with atomic_write(target / source.name) as f:
            f.write(source.read_text())
        shutil.copymode(source, target / source.name)  # mkstemp's 0600 would hide the record from the group
    shutil.rmtree(staged, ignore_errors=True)


def _move_log_files(staged: Path, run_dir: Path) -> None:
    """Point each log file handler writing into ``staged`` at the same name in ``run_dir``, appending what it wrote."""
    import logging

    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) or not Path(handler.baseFilename).is_relative_to(staged):
            continue
        handler.acquire()
        try:
            handler.flush()
            if handler.stream is not None:
                handler.stream.close()
            source, target = Path(handler.baseFilename), run_dir / Path(handler.baseFilename).name
            with target.open("a") as f:
                f.write(source.read_text() if source.exists() else "")
            handler.baseFilename = str(target)
            handler.stream = handler._open()
        finally:
            handler.release()


@contextmanager
def claim_and_record(config, run_dir: str | Path, staged: Path | None) -> Iterator[None]:  # noqa: ANN001
    """Without a staged record (not the main process, or Hydra writes ``.hydra/`` itself): nothing to do here,
    the backend's :func:`launchers.runs.run_guard.open_run` locks and decides. With one: lock and decide
    first (:func:`launchers.runs.run_guard.claimed_run`; a refusal exits 2 and the staged record is
    dropped), then move the record in, and hold the lock for the job."""
    if staged is None:
        yield
        return
    from launchers.runs.run_guard import claimed_run

    try:
        with claimed_run(config, run_dir):
            move_record(staged, Path(run_dir))
            yield
    finally:
        shutil.rmtree(staged, ignore_errors=True)
