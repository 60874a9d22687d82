"""``python -m launchers.train``: the Hydra entry point of a training run or sweep.

The command line is validated whole (every sweep job) by :mod:`launchers.preflight` before Hydra
starts any job; each job then validates its composed config again with the real world size and runs
:func:`launchers.trainer.train` in Hydra's run folder.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launchers.conf_store import register_configs
from launchers.preflight import CONFIG_DIR, CONFIG_NAME, ConfigError, validate_run, world_size_from_env


@hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base=None)
def hydra_job(cfg: DictConfig) -> float | None:
    """One job: validate the composed config, then train in Hydra's output folder."""
    try:
        config, _ = validate_run(OmegaConf.to_container(cfg, resolve=True), world_size_from_env())
    except ConfigError as err:
        print("Invalid configuration:\n  " + "\n  ".join(err.problems), file=sys.stderr)
        raise SystemExit(2) from None
    from launchers.trainer import train

    factory = hydra.utils.instantiate(cfg.loss)  # the loss group's _target_: rl_loss.build_reducer_factory
    return train(config, HydraConfig.get().runtime.output_dir, factory=factory)


def main(argv: list[str] | None = None) -> None:
    """Validate the command line, then hand it to Hydra."""
    argv = sys.argv[1:] if argv is None else argv
    register_configs()
    if any(a in ("--help", "-h") for a in argv):
        from launchers.cli_help import render_help

        print(render_help())
        return
    argv = ["--help" if a == "--hydra-help" else a for a in argv]
    from launchers.preflight import preflight

    preflight(argv)
    sys.argv = [sys.argv[0], *argv]
    hydra_job()


if __name__ == "__main__":
    main()
