"""``python -m launchers.train``: the Hydra entry point of a training run or sweep.

The command line is validated whole (every sweep job) by :mod:`launchers.config.preflight` before Hydra
starts any job; each job then validates its composed config again with the real world size and runs
:func:`launchers.backends.toy.trainer.train` (``backend=toy``) or :func:`launchers.backends.hf.train.train` (``backend=trl``) in
Hydra's run folder; the backend section names its entry point, imported only when the job starts.

Hydra writes its record (``.hydra/``) before the job function runs, so the main process points
``hydra.output_subdir`` at a staging folder of its own and moves the record into the run folder only
once :func:`launchers.runs.run_guard.claimed_run` holds the folder's lock and has accepted the launch:
a refused launch changes nothing in the folder it was refused for (``docs/run-safety-guarantees.md``).
Errors of a running job end it with one line (:mod:`launchers.runs.failures`), never a traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launchers.config.backends import import_entry
from launchers.config.conf_store import register_configs
from launchers.config.preflight import CONFIG_DIR, CONFIG_NAME, ConfigError, validate_run, world_size_from_env
from launchers.extras import require_backend, require_launcher
from launchers.runs import failures


@hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base=None)
def hydra_job(cfg: DictConfig) -> float | None:
    """One job: validate the composed config, then train in Hydra's output folder."""
    try:
        config, _ = validate_run(OmegaConf.to_container(cfg, resolve=True), world_size_from_env())
    except ConfigError as err:
        print("Invalid configuration:\n  " + "\n  ".join(err.problems), file=sys.stderr)
        raise SystemExit(2) from None
    require_backend(config.backend.kind)
    train = import_entry(config.backend.entry_point)  # the backend's trainer, imported only now
    factory = hydra.utils.instantiate(cfg.loss)  # the loss group's _target_: rl_loss.build_reducer_factory
    run_dir = HydraConfig.get().runtime.output_dir
    with failures.one_line(run_dir), failures.claim_and_record(config, run_dir, _staged_record()):
        return train(config, run_dir, factory=factory)


STAGING_ENV = "RL_LOSS_HYDRA_STAGING"
STAGING_PREFIX = "rl-loss-hydra-"
"""Set by :func:`main` in the main process: the folder Hydra writes each job's record into."""


def _staged_record() -> Path | None:
    """Where Hydra wrote this job's ``.hydra/`` record when :func:`main` staged it, else None."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:
        return None
    staged = Path(hydra_cfg.runtime.output_dir) / str(hydra_cfg.output_subdir)
    # by the folder's name, not STAGING_ENV alone: a launcher plugin may run the job in a fresh process
    return staged if staged.parent.name.startswith(STAGING_PREFIX) else None


def torchrun_run_dir() -> str:
    """A run folder every rank of one torchrun launch agrees on, without communicating.

    torchrun's run id when it has one (``--rdzv-id``, ``--standalone``), otherwise the start time of
    the torchrun agent, the parent of every local rank. Multi-node runs should pass hydra.run.dir.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id not in ("", "none"):
        return f"outputs/torchrun/{run_id}"
    ppid = os.getppid()
    try:
        ticks = int(Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        started = datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
        return f"outputs/torchrun/{started:%Y-%m-%d/%H-%M-%S}-{ppid}"
    except (OSError, ValueError, IndexError, StopIteration):
        return f"outputs/torchrun/agent-{ppid}"


def main(argv: list[str] | None = None) -> None:
    """Validate the command line, then hand it to Hydra."""
    argv = sys.argv[1:] if argv is None else argv
    require_launcher()
    os.environ.pop(STAGING_ENV, None)
    register_configs()
    if any(a in ("--help", "-h") for a in argv):
        from launchers.config.cli_help import render_help

        print(render_help())
        return
    argv = ["--help" if a == "--hydra-help" else a for a in argv]
    from launchers.config.preflight import preflight

    jobs = preflight(argv)
    for kind in sorted({job.config.backend.kind for job in jobs or ()}):
        require_backend(kind)
    if world_size_from_env() > 1 and not any(a.startswith("hydra.run.dir=") for a in argv):
        # Hydra stamps each process's folder with its own clock; ranks must share one run folder.
        argv = [*argv, f"hydra.run.dir={torchrun_run_dir()}"]
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if jobs and len(jobs) == 1 and not multirun and int(os.environ.get("RANK", "0")) == 0:
        from launchers.runs.run_guard import precheck

        # Refuse early (live run, changed recipe, a file in the way); claimed_run decides again under the lock.
        # Rank 0 alone: a later rank would find rank 0's own new run there and refuse it (torchrun ends the
        # other ranks when rank 0 exits on a refusal).
        run_dir = run_dir if run_dir and "${" not in run_dir else jobs[0].run_dir
        if run_dir:
            precheck(jobs[0].config, run_dir)
    if int(os.environ.get("RANK", "0")) > 0:
        # rank 0 alone writes the run folder's .hydra/ record and log file
        argv = [*argv, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    elif jobs and not any(a.startswith("hydra.output_subdir=") for a in argv):
        argv = [*argv, *_staging_overrides(multirun, custom_logging=any(a.startswith("hydra/job_logging=")
                                                                        or a.startswith("hydra.job_logging")
                                                                        for a in argv))]
    sys.argv = [sys.argv[0], *argv]
    try:
        hydra_job()
    finally:
        if root := os.environ.pop(STAGING_ENV, None):
            shutil.rmtree(root, ignore_errors=True)


def _staging_overrides(multirun: bool, custom_logging: bool) -> list[str]:
    """``hydra.output_subdir=`` a fresh private folder (one subfolder per job of a sweep), and the job's log
    file there too (unless the command line sets its own logging); see the module docstring."""
    import tempfile

    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX)
    os.environ[STAGING_ENV] = staging
    if multirun:
        # The log file is not staged in a sweep: a launcher plugin may run (and requeue) a job on another
        # machine, where the staging folder does not exist when Hydra opens the log, before any folder is made.
        return [f"hydra.output_subdir={staging}/${{hydra.job.num}}"]
    Path(staging, "job").mkdir()
    log_file = [] if custom_logging else [f"hydra.job_logging.handlers.file.filename={staging}/job/${{hydra.job.name}}.log"]
    return [f"hydra.output_subdir={staging}/job", *log_file]


if __name__ == "__main__":
    main()
