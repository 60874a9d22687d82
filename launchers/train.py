"""``python -m launchers.train``: the Hydra entry point of a training run or sweep.

The command line is validated whole (every sweep job) by :mod:`launchers.config.preflight` before Hydra
starts any job; each job then validates its composed config again with the real world size and runs
:func:`launchers.backends.toy.trainer.train` (``backend=toy``) or :func:`launchers.backends.hf.train.train` (``backend=trl``) in
Hydra's run folder; the backend section names its entry point, imported only when the job starts.
"""

from __future__ import annotations

import os
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
    return train(config, HydraConfig.get().runtime.output_dir, factory=factory)


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
    if jobs and len(jobs) == 1 and run_dir and "${" not in run_dir and not any(a in ("-m", "--multirun") for a in argv):
        from launchers.runs.run_guard import precheck

        # A refused launch (live run, changed recipe) must not leave Hydra's files in that folder.
        precheck(jobs[0].config, run_dir, quiet=int(os.environ.get("RANK", "0")) > 0)
    if int(os.environ.get("RANK", "0")) > 0:
        # rank 0 alone writes the run folder's .hydra/ record and log file
        argv = [*argv, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    sys.argv = [sys.argv[0], *argv]
    hydra_job()


if __name__ == "__main__":
    main()
