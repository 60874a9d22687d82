"""Checkpoints that verify and cannot run code: atomic write, a sha256 file beside each, safe loading, fallback.

A checkpoint holds only tensors and plain containers (dicts, lists, tuples, numbers, strings, None)
and is loaded with ``torch.load(weights_only=True)``, whose unpickler refuses any other Python
global: a crafted file cannot run code on resume. After the checkpoint is in place (temporary file,
fsync, rename), ``<name>.sha256`` is written beside it the same way, in ``sha256sum`` format
(``sha256sum -c step_000100.pt.sha256`` checks it by hand). A checkpoint counts only when its
checksum file exists and matches: a crash between the two leaves an unverified checkpoint that
resume skips. Resume takes the newest checkpoint that verifies, loads and restores, and names each
one it skips and why; if none is usable it says so in one line and exits 2.

The helpers take files or folders (a folder's checksum file lists every file in it), so a backend
with its own checkpoint layout verifies the same way: a :class:`CheckpointLayout` says where a
backend's checkpoints lie and how one loads. :data:`TORCH_FILES` is the toy backend's
``checkpoints/step_N.pt``; :data:`TRAINER_FOLDERS` the Hugging Face Trainer's ``checkpoints/checkpoint-N/``
(``backend=trl``), whose checksum the launcher writes after the Trainer saves the folder, and which
the Trainer itself loads (with ``weights_only=True`` too) once resume has picked it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launchers.runs.run_io import CHECKPOINT_DIR, atomic_write, save_atomic
from launchers.runs.safe_read import is_regular_file, read_json, read_text

log = logging.getLogger("launchers.train")

CHECKSUM_SUFFIX = ".sha256"
EXIT_NOTHING_USABLE = 2
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_FOLDER_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"

Agree = Callable[[torch.Tensor], torch.Tensor]
"""Sum a tensor over every process (an all-reduce); None for a single process."""


class UnusableCheckpoint(Exception):
    """A checkpoint resume must skip; the message is one line saying why."""


def checksum_path(path: Path) -> Path:
    """Where the checksum of ``path`` (a file or folder) lives: beside it, ``<name>.sha256``."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _members(path: Path) -> list[tuple[str, Path]]:
    """(name in the checksum file, file) for a file, or for every file under a folder."""
    if path.is_dir():
        return [(f"{path.name}/{p.relative_to(path).as_posix()}", p) for p in sorted(path.rglob("*")) if p.is_file()]
    return [(path.name, path)]


def write_checksum(path: Path) -> Path:
    """Write ``<path>.sha256`` (``sha256sum`` format) atomically, after ``path`` is complete."""
    text = "".join(f"{_sha256(member)}  {name}\n" for name, member in _members(path))
    target = checksum_path(path)
    with atomic_write(target) as f:
        f.write(text)
    return target


def verify_checksum(path: Path) -> str | None:
    """None when ``path`` matches its checksum file, else one line saying what is wrong."""
    target = checksum_path(path)
    if not target.exists():
        return f"no checksum file {target.name} (the run ended before it was written)"
    try:
        expected = dict(reversed(line.split("  ", 1)) for line in read_text(target).splitlines() if line)
    except ValueError:  # UnsafeInput too
        return f"checksum file {target.name} is damaged"
    actual = dict((name, member) for name, member in _members(path))
    if not_regular := [name for name, member in actual.items() if not is_regular_file(member)]:
        return f"{not_regular[0]} is not a regular file"
    if set(expected) != set(actual):
        return f"its files differ from those listed in {target.name}"
    for name, member in actual.items():
        if _sha256(member) != expected[name]:
            return f"sha256 mismatch for {name} (damaged or changed after it was written)"
    return None


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` atomically, then its checksum file; ``state`` must hold tensors and plain containers."""
    checksum_path(path).unlink(missing_ok=True)  # an older file's checksum must never vouch for this one
    save_atomic(state, path)
    write_checksum(path)
    return path


def load_checkpoint(path: Path, map_location: Any = "cpu", *, verify: bool = True) -> dict[str, Any]:
    """Verify ``path`` and load it with ``weights_only=True``.

    Raises:
        UnusableCheckpoint: a one-line reason (no checksum, mismatch, truncated, code inside, not a dict).
    """
    if not is_regular_file(path):
        raise UnusableCheckpoint("not a regular file")
    if verify and (problem := verify_checksum(path)):
        raise UnusableCheckpoint(problem)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnusableCheckpoint(_unpickling_reason(err)) from None
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnusableCheckpoint(f"unreadable ({first.split('. ')[0]})") from None
    if not isinstance(state, dict):
        raise UnusableCheckpoint(f"holds a {type(state).__name__}, not a checkpoint's dict")
    if bad := first_non_finite(state):
        raise UnusableCheckpoint(f"holds non-finite values (NaN or Inf) in {bad}")
    return state


def first_non_finite(state: Any, where: str = "") -> str | None:
    """The key path of the first floating-point tensor or float in ``state`` holding NaN or Inf, else None."""
    if isinstance(state, torch.Tensor):
        return None if not state.is_floating_point() or bool(torch.isfinite(state).all()) else (where or "the state")
    if isinstance(state, float):
        return None if math.isfinite(state) else (where or "the state")
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        if found := first_non_finite(value, f"{where}.{key}" if where else str(key)):
            return found
    return None


def _unpickling_reason(err: Exception) -> str:
    """One line for torch's weights-only refusal. torch 2.13 names a blocked callable as ``unsupported GLOBAL
    posix.system whose module posix is blocked`` (older releases: ``Unsupported global: GLOBAL io.open``);
    other refusals (``Unsupported operand 149``: a plain pickle) follow ``WeightsUnpickler error:``."""
    text = str(err)
    code = re.search(r"(?i)unsupported global:? (?:GLOBAL )?([\w.]+)", text)
    if code:
        return (f"refused: loading it would call {code.group(1).rstrip('.')}, which no checkpoint of this launcher "
                "holds (a file crafted to run code?); torch's weights-only loader blocked it, nothing in it was run")
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = detail.group(1).strip() if detail else "not a torch checkpoint"
    return f"refused by torch's weights-only loader ({reason}): not a checkpoint of this launcher; nothing in it was run"


def checkpoint_files(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``checkpoints/step_N.pt`` in ``run_dir``, newest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every Hugging Face Trainer folder ``checkpoints/checkpoint-N/`` in ``run_dir``, newest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if p.is_dir() and (m := _FOLDER_RE.match(p.name))]
    return sorted(found, reverse=True)


def load_checkpoint_folder(path: Path, map_location: Any = None, *, verify: bool = True) -> Path:
    """Verify a Trainer checkpoint folder and check that its ``trainer_state.json`` is at the folder's step.

    Returns the folder: the Trainer loads it (``trainer.train(resume_from_checkpoint=...)``).

    Raises:
        UnusableCheckpoint: a one-line reason (no checksum, mismatch, no readable trainer state, another step).
    """
    if verify and (problem := verify_checksum(path)):
        raise UnusableCheckpoint(problem)
    try:
        step = read_json(path / TRAINER_STATE)["global_step"]
    except (ValueError, KeyError, TypeError):  # UnsafeInput too
        raise UnusableCheckpoint(f"no readable {TRAINER_STATE} with a global_step") from None
    expected = int(_FOLDER_RE.match(path.name).group(1))
    if step != expected:
        raise UnusableCheckpoint(f"its {TRAINER_STATE} is at step {step}, not {expected}")
    return path


def prune_checksums(run_dir: Path) -> None:
    """Delete the checksum files whose checkpoint is gone (the Trainer rotates its folders itself) and stray
    temporary ones (a process killed mid-write)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    for stale in folder.glob(f"*{CHECKSUM_SUFFIX}"):
        if not stale.with_name(stale.name.removesuffix(CHECKSUM_SUFFIX)).exists():
            stale.unlink(missing_ok=True)
    for tmp in folder.glob(f".*{CHECKSUM_SUFFIX}.*.tmp"):
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a backend's checkpoints lie in a run folder, and how one is verified and loaded."""

    find: Callable[[Path], list[tuple[int, Path]]]
    """run folder -> (step, path) of each checkpoint, newest first."""
    load: Callable[..., Any]
    """``load(path, map_location, verify=...)`` -> what ``restore`` gets; raises UnusableCheckpoint."""


TORCH_FILES = CheckpointLayout(checkpoint_files, load_checkpoint)
"""The toy backend's ``checkpoints/step_N.pt``: restore gets the loaded state dict."""

TRAINER_FOLDERS = CheckpointLayout(checkpoint_folders, load_checkpoint_folder)
"""The Hugging Face Trainer's ``checkpoints/checkpoint-N/`` (backend=trl): restore gets the verified folder."""


def has_checkpoints(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint of any layout."""
    return any(layout.find(run_dir) for layout in (TORCH_FILES, TRAINER_FOLDERS))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (with their checksum files) and stray temporary files."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    for _, stale in checkpoint_files(run_dir)[keep:]:
        stale.unlink(missing_ok=True)
        checksum_path(stale).unlink(missing_ok=True)
    for tmp in folder.glob(".step_*.tmp"):  # left by a process killed mid-write
        tmp.unlink(missing_ok=True)


def resume_newest(
    run_dir: Path,
    restore: Callable[[Any], None],
    map_location: Any = "cpu",
    *,
    is_main: bool = True,
    agree: Agree | None = None,
    layout: CheckpointLayout = TORCH_FILES,
) -> int | None:
    """Restore the newest usable checkpoint of ``run_dir``; returns its step, None when there is none.

    The main process tries the checkpoints of ``layout`` newest first: verify, load, ``restore(state)``; each one
    skipped is named in a warning with its reason. The chosen step is shared with the other processes
    (``agree``), which load the same file. ``restore`` raising KeyError, ValueError, TypeError or
    RuntimeError (a state that does not fit the model) also skips the checkpoint.

    Raises:
        SystemExit: code 2 with one line when checkpoints exist but none is usable.
    """
    files = layout.find(run_dir)
    chosen, lines = -1, []
    if is_main:
        for step, path in files:
            try:
                _restore_from(path, restore, map_location, layout.load, verify=True)
            except UnusableCheckpoint as err:
                log.warning("resume: skipping checkpoint %s: %s", path, err)
                continue
            chosen = step
            break
        if files and chosen < 0:
            lines = [f"resume: none of the {len(files)} checkpoint(s) in {Path(run_dir) / CHECKPOINT_DIR} is usable "
                     "(each is named above); restore one, or start a new run in another folder"]
    if agree is not None:
        shared = torch.tensor([float(chosen) if is_main else 0.0], dtype=torch.float64)
        chosen = int(agree(shared)[0])
    if files and chosen < 0:
        for line in lines:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_NOTHING_USABLE)
    if chosen < 0:
        return None
    if not is_main:
        path = dict((s, p) for s, p in files)[chosen]
        try:
            _restore_from(path, restore, map_location, layout.load, verify=False)
        except UnusableCheckpoint as err:
            print(f"resume: checkpoint {path} (usable on rank 0) failed here: {err}", file=sys.stderr)
            raise SystemExit(EXIT_NOTHING_USABLE) from None
    else:
        log.info("resumed from %s (step %d)", dict(files)[chosen], chosen)
    return chosen


def _restore_from(path: Path, restore: Callable[[Any], None], map_location: Any, load: Callable[..., Any],
                  verify: bool) -> None:
    state = load(path, map_location, verify=verify)
    try:
        restore(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnusableCheckpoint(f"does not fit this run ({type(err).__name__}: {first[:200]})") from None
