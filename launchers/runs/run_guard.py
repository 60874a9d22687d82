"""What a launch may do to a run folder: the lock, the recipe guard on resume, and requeued jobs.

``run_config.json`` in the run folder holds the run's own validated configuration (Hydra's
``.hydra/config.yaml`` is rewritten by every launch). A resume compares the newly composed
configuration with it, field by field over the whole tree: a change to any field that is not in
:data:`launchers.runs.recipe.RUN_INVARIANT` alters the run's mathematics and is refused (exit 2, one line per field,
``loss.aggregation: sample_mean -> token_mean``) unless ``allow_recipe_change=true``; changes to
run-invariant fields are accepted and logged, and every accepted change is appended to the
file's ``history``. Fields added to the configuration later (a new loss term, a backend section) are
guarded without any change here.

A launch without ``resume=true`` into a folder that already holds a run is refused too (it would
overwrite the run's metrics), except for a requeued scheduler job (SLURM or submitit): the same job
id that started the run resumes it by itself. A resume into a folder whose ``metrics.jsonl`` holds steps
but that has no checkpoint (``checkpoints/`` deleted, or replaced by a file) is refused as well: it
would start again from step 0 over the run's metrics.

:func:`claimed_run` takes the lock and decides before anything is written into the run folder (the
launcher calls it before Hydra's record is moved in); :func:`open_run` then reuses that decision.
See ``docs/run-safety.md`` and ``docs/run-safety-guarantees.md``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from launchers.config.run_config import RunConfig
from launchers.runs.checkpoints import has_checkpoints
from launchers.runs.recipe import changes, config_tree, run_invariant
from launchers.runs.run_io import CHECKPOINT_DIR, atomic_write
from launchers.runs.run_lock import (
    LOCK_NAME,
    RunFolderBusy,
    RunLock,
    busy_message,
    read_owner,
    scheduler_job_id,
    stale_reason,
    this_process,
)
from launchers.runs.safe_read import UnsafeInput, read_json

log = logging.getLogger("launchers.train")

RUN_CONFIG = "run_config.json"
EXIT_REFUSED = 2

class Refused(Exception):
    """A launch that must not touch the run folder; ``lines`` are printed, then exit 2."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _holds_run(run_dir: Path) -> str | None:
    """What shows that ``run_dir`` already holds a run, or None."""
    if (run_dir / RUN_CONFIG).exists():
        return RUN_CONFIG
    if has_checkpoints(run_dir):
        return "checkpoints"
    if _has_metrics(run_dir):
        return "metrics.jsonl"
    return None


def _has_metrics(run_dir: Path) -> bool:
    """Whether ``metrics.jsonl`` holds anything (a folder or other non-file there counts as holding)."""
    metrics = run_dir / "metrics.jsonl"
    try:
        return metrics.is_symlink() or (metrics.exists() and (not metrics.is_file() or metrics.stat().st_size > 0))
    except OSError:
        return True


def _no_checkpoint_refusal(run_dir: Path) -> Refused:
    folder = run_dir / CHECKPOINT_DIR
    what = "is missing" if not folder.exists() and not folder.is_symlink() else \
        "is not a folder" if not folder.is_dir() else "holds no checkpoint"
    return Refused([f"resume: {run_dir} holds a run (metrics.jsonl has steps) but {folder} {what}, so resuming "
                    "would start again from step 0 over its metrics; restore its checkpoints, or start the run "
                    "again in another folder (hydra.run.dir=...)"])


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The content of ``run_config.json``; None when absent. Raises Refused when damaged.

    A ``history`` that is not a list of records is dropped (with a warning): it is a log, not the recipe.
    """
    path = run_dir / RUN_CONFIG
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            history = data.get("history", [])
            if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
                log.warning("%s: its history is damaged (not a list of records); it starts again", path)
                data["history"] = []
            return data
    except UnsafeInput:
        pass
    raise Refused([f"resume: {path} is damaged, so the recipe of the run cannot be checked; restore it, or "
                   "resume with allow_recipe_change=true to replace it with this launch's configuration"])


@dataclass
class Verdict:
    """What a launch does in its run folder."""

    resume: bool
    content: dict[str, Any]
    """``run_config.json`` to write once the run starts."""
    notes: list[tuple[int, str]]
    """(logging level, message) to log."""


def decide(config: RunConfig, run_dir: Path) -> Verdict:
    """Check this launch against the run folder (reads only).

    Raises:
        Refused: a fresh launch into a folder holding a run, or a resume that changes the recipe.
    """
    job = scheduler_job_id()
    new = config_tree(config)
    now = f"{datetime.now():%Y-%m-%d %H:%M:%S}"
    try:
        stored = read_run_config(run_dir)
    except Refused:
        if config.resume and not config.allow_recipe_change:
            raise
        stored = None  # a fresh launch is refused below: the folder holds a run
    resume, notes = config.resume, []
    if not resume and stored is not None and job and stored.get("job_id") == job:
        notes.append((logging.WARNING, f"this is a requeued attempt of job {job}, which started the run in {run_dir}: "
                                       "resuming it"))
        resume = True
    if not resume:
        evidence = _holds_run(run_dir)
        if evidence:
            raise Refused([f"run folder {run_dir} already holds a run ({evidence}); continue it with resume=true, or "
                           "start this run in another folder (hydra.run.dir=...)"])
        return Verdict(False, {"config": new, "job_id": job, "history": [{"time": now, "event": "start"}]}, notes)
    if _has_metrics(run_dir) and not has_checkpoints(run_dir):
        raise _no_checkpoint_refusal(run_dir)
    if stored is None:
        if _holds_run(run_dir):
            notes.append((logging.WARNING, f"resume: {run_dir} has no {RUN_CONFIG} (written by an older launcher): "
                                           "the recipe cannot be checked"))
        return Verdict(True, {"config": new, "job_id": job, "history": [{"time": now, "event": "start"}]}, notes)
    found = changes(stored["config"], new)
    refused = [c for c in found if not run_invariant(c.field)]
    if refused and not config.allow_recipe_change:
        raise Refused([
            f"resume: refusing to continue {run_dir} with a different recipe ({len(refused)} field(s) that alter "
            "the run's mathematics):",
            *(f"  {c}" for c in refused),
            "Resume with the run's own settings, start a new run in another folder, or add allow_recipe_change=true "
            "to continue with these changes anyway (they are logged).",
        ])
    found = [c for c in found if c.field != "resume"]  # the switch of this very launch
    for c in found:
        if run_invariant(c.field):
            notes.append((logging.INFO, f"resume: accepted run-invariant change {c}"))
        else:
            notes.append((logging.WARNING, f"resume: recipe change forced by allow_recipe_change=true: {c}"))
    event = {"time": now, "event": "resume", "accepted": [str(c) for c in found if run_invariant(c.field)],
             "forced": [str(c) for c in refused]}
    content = {"config": new, "job_id": stored.get("job_id"), "history": [*stored.get("history", []), event]}
    return Verdict(True, content, notes)


def write_run_config(run_dir: Path, content: dict[str, Any]) -> None:
    """Write ``run_config.json`` atomically."""
    with atomic_write(run_dir / RUN_CONFIG) as f:
        json.dump(content, f, indent=1)
        f.write("\n")


@dataclass
class OpenRun:
    """A run folder this launch may write: the configuration to run (``resume`` decided) and a record hook."""

    config: RunConfig
    run_dir: Path
    is_main: bool
    _content: dict[str, Any]

    def record(self, step: int) -> None:
        """Write ``run_config.json`` once the run starts or resumes at ``step`` (main process only)."""
        if self.is_main:
            self._content["history"][-1]["step"] = step
            write_run_config(self.run_dir, self._content)


_CLAIMED: dict[Path, tuple[RunLock, Verdict]] = {}
"""Run folders this process has locked and decided on before its backend starts (see :func:`claimed_run`)."""


@contextmanager
def claimed_run(config: RunConfig, run_dir: str | Path) -> Iterator[Verdict]:
    """Lock ``run_dir`` and decide this launch against it, before anything is written into it.

    The launcher's main process calls it before it moves Hydra's record (``.hydra/``) into the run
    folder; :func:`open_run` for the same folder in this process then reuses the lock and the verdict.
    Only the folder itself is created (so that the lock can be), and only when it does not exist.

    Raises:
        SystemExit: code 2 after one or more lines on stderr when the folder is busy or the launch refused
            (nothing in the folder was changed).
    """
    run_dir = Path(run_dir)
    lock = RunLock(run_dir)
    if problem := folder_problem(run_dir):
        print(problem, file=sys.stderr)
        raise SystemExit(EXIT_REFUSED)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        verdict = decide(config, run_dir)
    except (RunFolderBusy, Refused) as err:
        lock.release()
        for line in err.lines if isinstance(err, Refused) else [str(err)]:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
    except BaseException:
        lock.release()
        raise
    key = run_dir.resolve()
    _CLAIMED[key] = (lock, verdict)
    try:
        yield verdict
    finally:
        _CLAIMED.pop(key, None)
        lock.release()


@contextmanager
def open_run(
    config: RunConfig,
    run_dir: str | Path,
    *,
    is_main: bool = True,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[OpenRun]:
    """Lock the run folder and check this launch against it; yields the configuration to run.

    Call it once per process of a launch, before any model work; ``is_main`` marks the process that
    holds the lock and decides, ``agree`` sums a tensor over every process (None for one process),
    so every process gets the same verdict. Call :meth:`OpenRun.record` with the step the run starts
    from once a checkpoint is restored.

    Raises:
        SystemExit: code 2 after one or more lines on stderr when the folder is busy or the launch refused.
    """
    run_dir = Path(run_dir)
    claimed = _CLAIMED.get(run_dir.resolve()) if is_main else None
    lock = RunLock(run_dir) if is_main and claimed is None else None
    lines: list[str] = []
    resume, content = config.resume, {}
    if claimed is not None:  # locked and decided by claimed_run, which also releases the lock
        resume, content = claimed[1].resume, claimed[1].content
        for level, note in claimed[1].notes:
            log.log(level, note)
    if lock is not None:
        try:
            lock.acquire()
            verdict = decide(config, run_dir)
        except (RunFolderBusy, Refused) as err:
            lines = err.lines if isinstance(err, Refused) else [str(err)]
            lock.release()
        else:
            resume, content = verdict.resume, verdict.content
            for level, note in verdict.notes:
                log.log(level, note)
    if agree is not None:
        shared = torch.tensor([float(bool(lines)), float(resume)] if is_main else [0.0, 0.0], dtype=torch.float64)
        refused, resume = (bool(v) for v in agree(shared).tolist())
    else:
        refused = bool(lines)
    if refused:
        for line in lines:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_REFUSED)
    try:
        yield OpenRun(config.model_copy(update={"resume": resume}), run_dir, is_main, content)
    finally:
        if lock is not None:
            lock.release()


def folder_problem(run_dir: str | Path) -> str | None:
    """One line when ``run_dir`` cannot be a run folder (a file, under a file, not writable), else None. Reads only."""
    run_dir = Path(run_dir)
    for folder in (run_dir, *run_dir.absolute().parents):
        try:
            exists = folder.exists()
        except OSError as err:
            return f"hydra.run.dir: {run_dir} cannot be used as a run folder ({err.strerror}); choose another hydra.run.dir"
        if not exists:
            continue
        if not folder.is_dir():
            where = "is a file" if folder == run_dir else f"lies under {folder}, which is a file"
            return f"hydra.run.dir: {run_dir} {where}, not a folder; choose another hydra.run.dir"
        if not os.access(folder, os.W_OK | os.X_OK):
            where = "is" if folder == run_dir else f"would be created in {folder}, which is"
            return f"hydra.run.dir: {run_dir} {where} not writable by this user; choose another hydra.run.dir"
        return None
    return None


def precheck(config: RunConfig, run_dir: str | Path) -> None:
    """Refuse a launch before Hydra writes into the run folder (its ``.hydra/`` and log): reads only.

    :func:`open_run` decides again, under the lock; this early check keeps a refused launch from
    touching a live or finished run's folder at all.

    Raises:
        SystemExit: code 2 after one or more lines on stderr.
    """
    run_dir = Path(run_dir)
    if problem := folder_problem(run_dir):
        print(problem, file=sys.stderr)
        raise SystemExit(EXIT_REFUSED)
    if not run_dir.is_dir():
        return
    try:
        held = read_owner(run_dir / LOCK_NAME) if (run_dir / LOCK_NAME).exists() else None
        if held is not None and stale_reason(held, this_process()) is None:
            raise RunFolderBusy(busy_message(run_dir / LOCK_NAME, held, this_process()))
        decide(config, run_dir)
    except (RunFolderBusy, Refused) as err:
        for line in err.lines if isinstance(err, Refused) else [str(err)]:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
