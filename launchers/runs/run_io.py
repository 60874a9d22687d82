"""What a run writes: metrics.jsonl, TensorBoard events, atomic checkpoints, and the progress display."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from launchers.runs.safe_read import parse_json, read_jsonl_lines

log = logging.getLogger("launchers.train")

CHECKPOINT_DIR = "checkpoints"


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file in the same folder: on success fsync, then rename over ``path``.

    A crash or Ctrl-C mid-write leaves the previous file intact (the rename is atomic on POSIX) and
    removes the temporary file.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` with :func:`atomic_write`, creating its folder.

    A crash or Ctrl-C mid-write leaves the previous checkpoint intact: the rename is atomic on POSIX.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint after optimizer step ``step`` lives."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}.pt"


def rng_state() -> dict[str, Any]:
    """Every global RNG state a run draws from (Python, torch CPU, CUDA when present)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def metrics_up_to(path: Path, step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` for steps up to ``step``, in order.

    A line that does not parse as a step record is dropped with a warning: a torn last line is what
    a crash in the middle of a write leaves. A gap before ``step`` (damage, not a crash: each record
    is written before its step's checkpoint) is reported too.
    """
    lines = read_jsonl_lines(path)  # raises UnsafeInput (one line) for a folder, FIFO or oversized file
    kept, last = [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line)  # finite numbers only: {"step": Infinity} is a damaged line
            record_step = record["step"]
            if not isinstance(record_step, int) or isinstance(record_step, bool):
                raise TypeError("step is not an integer")
        except (ValueError, KeyError, TypeError):
            where = "torn last line (the run stopped mid-write)" if number == len(lines) else f"damaged line {number}"
            log.warning("%s: dropping its %s: %.60s", path, where, line)
            continue
        if record_step <= step:
            kept.append(line)
            last = record_step
    if last < step:
        log.warning("%s: holds steps up to %d only; steps %d-%d of the resumed run are missing from it",
                    path, last, last + 1, step)
    return kept


class MetricsWriter:
    """Appends one JSON object per optimizer step to ``metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, run_dir: Path, resume_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_after_step is not None and self.path.exists():
            # Drop steps logged after the checkpoint: the resumed run writes them again, identically.
            kept = metrics_up_to(self.path, resume_after_step)
            with atomic_write(self.path) as f:  # a full disk leaves the old file whole
                f.write("".join(line + "\n" for line in kept))
        elif resume_after_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_after_step)
        except ImportError:  # tensorboard is a dependency; a stripped install still gets metrics.jsonl
            log.warning("tensorboard is not installed: no event files are written")

    def write(self, record: dict[str, Any]) -> None:
        """Log one step's record."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush and close both outputs."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def format_duration(seconds: float) -> str:
    """``42s``, ``3:07`` or ``1:02:09``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs}s"


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (``progress=auto``).

    Shows what tells a run is learning: reward, response length, entropy (and ``ppo_kl``, the KL to the
    rollout policy, when a rollout feeds several optimizer steps; on-policy it is 0 by construction),
    the gradient norm before clipping, steps/s and the time left. Not pg_loss: on-policy GRPO's is zero
    in expectation at every step (it stays in metrics.jsonl).
    """

    def __init__(self, total: int, initial: int, mode: str, enabled: bool = True, show_kl: bool = False):
        self.enabled, self.total, self.show_kl = enabled, total, show_kl
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self._bar = None
        if enabled and use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._every = max(total // 20, 1)
        self._first: tuple[int, float] | None = None  # (step, time) of the first update: rates start there

    def fields(self, record: dict[str, Any]) -> dict[str, str]:
        """The step's figures as short ``name: text`` pairs."""
        short = {"reward": f"{record['reward_mean']:.3f}", "len": f"{record['response_length_mean']:.1f}"}
        if self.show_kl and "ppo_kl" in record:
            short["kl"] = f"{record['ppo_kl']:.2e}"
        if "entropy" in record:
            short["ent"] = f"{record['entropy']:.3f}"
        if "grad_norm" in record:
            short["gn"] = f"{record['grad_norm']:.3g}"
        return short

    def rate_and_eta(self, step: int) -> tuple[float, float]:
        """Steps per second since the first step this process took (the first step's one-off start-up
        costs left out), and the seconds left at that rate; NaN at the first step."""
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
        done, elapsed = step - self._first[0], now - self._first[1]
        rate = done / elapsed if done > 0 and elapsed > 0 else float("nan")
        return rate, (self.total - step) / rate if rate > 0 else float("nan")

    def update(self, record: dict[str, Any]) -> None:
        """Show the step's figures (the bar shows its own rate and time left)."""
        if not self.enabled:
            return
        short = self.fields(record)
        rate, eta = self.rate_and_eta(record["step"])
        if self._bar is not None:
            self._bar.set_postfix(short, refresh=False)
            self._bar.update(1)
        elif record["step"] % self._every == 0 or record["step"] == 1 or record["step"] == self.total:
            parts = [f"step {record['step']}/{self.total}", *(f"{k}={v}" for k, v in short.items())]
            if not math.isnan(rate):
                parts += [f"{rate:.2f} step/s", f"ETA {format_duration(eta)}"]
            log.info("%s", "  ".join(parts))

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
