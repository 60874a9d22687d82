"""The lines a run ends with: what happened, where it went, and the commands to look at it, report it and resume it.

Backend-independent: everything comes from the run folder (``metrics.jsonl``, ``.hydra/overrides.yaml``)
and a few facts the loop knows (outcome, wall time, first and last step). Any training loop that
writes a run folder calls :func:`log_run_summary` on rank 0 when it finishes, stops on request
(Ctrl-C, preemption) or is aborted.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from launchers.runs.run_io import format_duration
from launchers.runs.run_records import METRICS_FILE, read_metrics
from launchers.runs.safe_read import UnsafeInput, read_yaml

log = logging.getLogger("launchers.train")

Outcome = Literal["finished", "stopped", "aborted"]
TRAIN = "python -m launchers.train"
# Overrides the resume command sets itself.
_RESUME_SETS = ("resume", "hydra.run.dir")


def launcher_command(world_size: int = 1, local_world_size: int | None = None) -> str:
    """How the run was started: ``python -m launchers.train``, or torchrun / accelerate launch with the same process count.

    ``accelerate launch --multi_gpu`` (backend=trl) starts its processes through torchrun and marks
    them with ``ACCELERATE_*`` variables (``ACCELERATE_MIXED_PRECISION`` in every mode); its command is given then.
    """
    if world_size <= 1:
        return TRAIN
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    nodes = world_size // max(local, 1)
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        spread = f"--num_machines {nodes} <your machine-rank and main-process flags> " if nodes > 1 else ""
        return f"accelerate launch --multi_gpu {spread}--num_processes {world_size} -m launchers.train"
    if nodes > 1:
        return f"torchrun --nnodes {nodes} --nproc-per-node {local} <your rendezvous flags> -m launchers.train"
    return f"torchrun --nproc-per-node {world_size} -m launchers.train"


def hydra_path_override(key: str, path: str) -> str:
    """``key=path`` as Hydra's override parser reads it back as ``path`` (quoted when it holds ``=`` ``,`` ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for candidate in (f"{key}={path}", "{}='{}'".format(key, path.replace("\\", "\\\\").replace("'", "\\'"))):
        try:
            if parser.parse_override(candidate).value() == path:
                return candidate
        except Exception:  # noqa: BLE001 - Hydra raises its own exception types for unparsable values
            continue
    return f"{key}='{path}'"


def launch_dir() -> Path:
    """The folder the run was launched from: Hydra's original working directory (``hydra.job.chdir=true``
    moves the process into the run folder), else the working directory."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.cwd)
    except (ImportError, ValueError, AttributeError):  # not inside a Hydra job
        return Path.cwd()


def _shown(path: Path) -> str:
    """A path relative to the launch folder when it lies strictly below it, else absolute.

    Never ``.``: a command run from the launch folder must name the run folder itself.
    """
    path = Path(path).absolute()
    try:
        relative = path.relative_to(launch_dir())
    except ValueError:
        return str(path)
    return str(relative) if relative.parts else str(path)


def shell_quote(arg: str) -> str:
    """``arg`` for a POSIX shell; double quotes around a Hydra-quoted value, where they read better than shlex's."""
    quoted = shlex.quote(arg)
    if quoted != arg and "'" in arg and not any(c in arg for c in '$`"\\!'):
        return f'"{arg}"'
    return quoted


def _job_overrides(run_dir: Path) -> list[str]:
    try:
        overrides = read_yaml(run_dir / ".hydra" / "overrides.yaml")
    except UnsafeInput:
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def resume_command(run_dir: Path, launcher: str = TRAIN, extra: Sequence[str] = ()) -> str:
    """The command that continues the run in ``run_dir``: its own overrides, ``resume=true``, ``extra``, the folder."""
    replaced = {*_RESUME_SETS, *(e.split("=", 1)[0] for e in extra)}
    kept = [o for o in _job_overrides(run_dir) if o.split("=", 1)[0].lstrip("+~") not in replaced]
    args = [*kept, "resume=true", *extra, hydra_path_override("hydra.run.dir", _shown(run_dir))]
    return " ".join([launcher, *(shell_quote(a) for a in args)])


def _report_target(run_dir: Path) -> Path:
    """The sweep folder for a job of a Hydra multirun (its parent holds multirun.yaml), else the run folder."""
    return run_dir.parent if (run_dir.parent / "multirun.yaml").exists() else run_dir


def reward_quarters(records: Sequence[dict]) -> tuple[float, float] | None:
    """Mean ``reward_mean`` of the first and of the last quarter of the logged steps (None without any)."""
    rewards = [float(r["reward_mean"]) for r in records if "reward_mean" in r]
    if not rewards:
        return None
    q = max(len(rewards) // 4, 1)
    return sum(rewards[:q]) / q, sum(rewards[-q:]) / q


def summary_lines(run_dir: Path, records: Sequence[dict], *, outcome: Outcome, wall_seconds: float,
                  first_step: int, last_step: int, max_steps: int, launcher: str = TRAIN) -> list[str]:
    """The closing lines of a run.

    Args:
        run_dir: the run folder.
        records: the run's step records (every step, also those before a resume).
        outcome: finished (reached max_steps), stopped (on request, checkpoint written) or aborted.
        wall_seconds: wall time of this process, start of the loop to now.
        first_step: the step this process started from (0, or the resumed checkpoint's step).
        last_step: the last optimizer step taken.
        max_steps: the configured number of steps.
        launcher: the command that starts the run (see :func:`launcher_command`).
    """
    done = last_step - first_step
    rate = f", {done / wall_seconds:.2f} steps/s" if done > 0 and wall_seconds > 0 else ""
    span = f"steps {first_step + 1}-{last_step}" if first_step else f"{last_step} steps"
    head = {
        "finished": f"finished: {span} in {format_duration(wall_seconds)}{rate}",
        "stopped": f"stopped at step {last_step} of {max_steps} after {format_duration(wall_seconds)}{rate}; "
                   "checkpoint written",
        "aborted": f"aborted at step {last_step} of {max_steps} after {format_duration(wall_seconds)}; "
                   "resuming continues from the latest checkpoint",
    }[outcome]
    quarters = reward_quarters(records)
    if quarters is not None:
        head += f"; reward {quarters[0]:.3f} (first quarter) -> {quarters[1]:.3f} (last quarter), " \
                f"{quarters[1] - quarters[0]:+.3f}"
    lines = [head, f"run folder: {_shown(run_dir)}"]
    if (run_dir / "tensorboard").is_dir():
        lines.append(f"  curves:   tensorboard --logdir {shlex.quote(_shown(run_dir / 'tensorboard'))}")
    lines.append(f"  report:   python -m launchers.report {shlex.quote(_shown(_report_target(run_dir)))}")
    if outcome == "finished":
        more = f"trainer.max_steps={2 * max_steps}"
        lines.append(f"  continue: {resume_command(run_dir, launcher, [more])}")
    else:
        lines.append(f"  resume:   {resume_command(run_dir, launcher)}")
    return lines


def log_run_summary(run_dir: Path, *, outcome: Outcome, wall_seconds: float, first_step: int, last_step: int,
                    max_steps: int, world_size: int = 1, logger: logging.Logger = log) -> None:
    """Read the run's ``metrics.jsonl`` and log :func:`summary_lines` (call on rank 0 only)."""
    records, _ = read_metrics(Path(run_dir) / METRICS_FILE) if (Path(run_dir) / METRICS_FILE).exists() else ([], [])
    lines = summary_lines(Path(run_dir), records, outcome=outcome, wall_seconds=wall_seconds, first_step=first_step,
                          last_step=last_step, max_steps=max_steps, launcher=launcher_command(world_size))
    emit = logger.info if outcome == "finished" else logger.warning
    for line in lines:
        emit("%s", line)
