"""Compose and validate every job of a command line before any work starts.

``python -m launchers.train`` calls :func:`preflight` before handing the command line to Hydra: each
job of a multirun sweep is composed with Hydra's own compose API and validated against the pydantic
models, and every problem is printed as one line naming the field, the value and the fix (exit code
2, no traceback). ``dry_run=true`` stops here with a summary of each job.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from pydantic import ValidationError

from launchers.config.conf_store import GROUP_SECTIONS, is_schema_node, register_configs, section_options
from launchers.config.run_config import RunConfig
from rl_loss import config_errors
from rl_loss.config_errors import ConfigError
from rl_loss.custom_reducer import load_custom_reducer

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "config"
EXIT_CONFIG_ERROR = 2


@dataclass(frozen=True)
class Job:
    """One composed and validated job of a command line."""

    overrides: tuple[str, ...]
    config: RunConfig
    warnings: tuple[str, ...]
    run_dir: str | None = None
    """Hydra's ``hydra.run.dir`` with its interpolations (``${seed}``) resolved; None when it cannot be."""


def world_size_from_env() -> int:
    """World size given by torchrun (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_run(data: dict[str, Any], world_size: int = 1) -> tuple[RunConfig, list[str]]:
    """Validate a plain config dict; returns the model and the warnings it raised.

    Raises:
        ConfigError: one line per problem.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = RunConfig.model_validate(data, context={"world_size": world_size})
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None
    return config, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per pydantic error of a RunConfig: ``section.field: what is wrong (got value)``."""
    return config_errors.format_validation_error(err, RunConfig, normalize_loc=_without_group_tags, names_at=field_names)


def _without_group_tags(loc: list[str]) -> list[str]:
    """Drop the tag pydantic puts after a group section (``model.hf_tiny.hidden_size`` -> ``model.hidden_size``)."""
    if len(loc) > 1 and loc[0] in GROUP_SECTIONS and loc[1] in section_options(loc[0]):
        return [loc[0], *loc[2:]]
    return loc


def field_names(loc: list[str]) -> list[str]:
    """Field names (and aliases) of the model at ``loc`` in the RunConfig tree (empty if none).

    A group section (``backend``, ``model``) offers the fields of every one of its options.
    """
    if len(loc) == 1 and loc[0] in GROUP_SECTIONS:
        options = section_options(loc[0]).values()
        return sorted({name for option in options for name in config_errors.field_names(option, [])})
    return config_errors.field_names(RunConfig, loc)


def _hydra_error_lines(err: Exception, override: str | None = None) -> list[str]:
    if hint := multirun_hint(str(err)):
        return [hint]
    return config_errors.hydra_error_lines(err, override, RunConfig, hidden_options=is_schema_node, names_at=field_names)


def multirun_hint(text: str) -> str | None:
    """Hydra's error for a sweep on a command line without ``--multirun``, on one line that keeps its hint.

    Hydra explains ``loss=grpo,dapo`` without ``-m`` over four lines (list, quoted string, or "add
    --multirun to your command line"); the launcher prints one line per problem, so the three readings
    go on one. ``range()``/``choice()``/``glob()`` sweeps get Hydra's one-line "requires --multirun".
    """
    ambiguous = re.match(r"Ambiguous value for argument '([^']+)'", text)
    if ambiguous:
        return (
            f"{ambiguous.group(1)}: ambiguous value: to sweep over it, add --multirun (-m) to your command line; "
            f"to use it as a list write key=[value1,value2]; as a string quote it: key='value1,value2'"
        )
    sweep = re.match(r"Sweep parameters '([^']+)' requires --multirun", text)
    if sweep:
        return f"{sweep.group(1)}: a sweep requires --multirun: add --multirun (-m) to your command line"
    return None


def compose_job(overrides: list[str], world_size: int = 1) -> Job:
    """Compose ``conf/config.yaml`` with ``overrides`` through Hydra and validate the result.

    Raises:
        ConfigError: for composition errors (unknown group option or key, bad override syntax) and
            every validation problem, one line each.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
    except Exception as err:  # Hydra raises several exception types; each becomes one line
        raise ConfigError(_hydra_error_lines(err, _blamed_override(err, overrides))) from None
    finally:
        GlobalHydra.instance().clear()
    choices = {section: cfg.hydra.runtime.choices.get(section) for section in GROUP_SECTIONS}
    try:
        run_dir = str(cfg.hydra.run.dir)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's job can resolve
        run_dir = None
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError([f"{err.full_key}: is required (got nothing); set {err.full_key}=VALUE"]) from None
    except Exception as err:
        raise ConfigError([f"interpolation: {str(err).splitlines()[0]}"]) from None
    _check_group_tags(data, choices)
    config, warns = validate_run(data, world_size)
    _check_custom_reducer(config)
    return Job(tuple(overrides), config, tuple(warns), run_dir)


def _check_custom_reducer(config: RunConfig) -> None:
    """Import and probe ``loss.custom_pg_reducer`` now (a run was asked for), so it fails here, not at step 1."""
    if config.loss.custom_pg_reducer is not None:
        try:
            load_custom_reducer(config.loss.custom_pg_reducer)
        except ValueError as err:
            raise ConfigError([f"loss.{err}"]) from None


def _check_group_tags(data: dict[str, Any], choices: dict[str, str | None]) -> None:
    """A group section's ``kind`` is its option: ``model.kind=hf`` on the command line is a slip for ``model=hf``."""
    problems = [
        f"{section}.kind: is set by the group option (got {data[section]['kind']!r} with {section}={option}); "
        f"pick the option instead: {section}={data[section]['kind']}"
        for section, option in choices.items()
        if option is not None and isinstance(data.get(section), dict) and data[section].get("kind") != option
    ]
    if problems:
        raise ConfigError(problems)


def _blamed_override(err: Exception, overrides: list[str]) -> str | None:
    text = str(err)
    for override in overrides:
        if override.split("=")[0].lstrip("+~") and f"'{override.split('=')[0].lstrip('+~')}'" in text:
            return override
    return None


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun: Hydra's basic-sweeper expansion of ``a=1,2 b=x,y`` into their product."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def summary(job: Job) -> str:
    """One line: backend and model, mode, divisor, surrogate, ratio level, advantages, steps per rollout and micro-batches per step (and the backend's layout)."""
    cfg = job.config
    world = world_size_from_env()
    dp_size = max(world // cfg.parallel.cp_size, 1)
    micro = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * dp_size)
    divisor = f"{cfg.loss.divisor:g}" if cfg.loss.divisor is not None else "-"
    mode = f"custom({cfg.loss.custom_pg_reducer})" if cfg.loss.custom_pg_reducer else cfg.loss.aggregation
    return (
        f"backend={cfg.backend.kind} model={cfg.model.kind} "
        f"aggregation={mode} divisor={divisor} surrogate={cfg.loss.surrogate} ratio={cfg.loss.ratio_level} "
        f"advantages={cfg.loss.advantage_estimator} "
        f"steps_per_rollout={cfg.steps_per_rollout} micro_batches_per_step={micro} (per DP rank, "
        f"{cfg.backend.layout_summary(cfg, world)}) max_steps={cfg.trainer.max_steps}"
    )


def split_argv(argv: list[str]) -> tuple[bool, list[str], list[str]]:
    """(multirun, overrides, hydra flags) of a command line."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    flags = [a for a in argv if a.startswith("-") and a not in ("-m", "--multirun")]
    overrides = [a for a in argv if not a.startswith("-")]
    return multirun, overrides, flags


def preflight(argv: list[str], out=None, err=None) -> list[Job] | None:
    """Validate every job of ``argv``; on a problem print it and exit 2. Exit 0 after a dry run.

    Returns:
        The validated jobs, or ``None`` when the command line has Hydra flags this pre-pass leaves
        to Hydra (``--cfg``, ``--info``, ...).
    """
    out, err = out or sys.stdout, err or sys.stderr
    multirun, overrides, flags = split_argv(argv)
    if flags:
        return None
    try:
        job_overrides = expand_sweep(overrides) if multirun else [overrides]
    except Exception as e:
        _fail([f"command line: {str(e).splitlines()[0]}"], err)
    jobs, failures = [], []
    world = world_size_from_env()
    for n, ov in enumerate(job_overrides):
        try:
            jobs.append(compose_job(ov, world))
        except ConfigError as e:
            label = f"job {n} ({' '.join(ov) or 'no overrides'}): " if multirun else ""
            failures.extend(label + p for p in e.problems)
    if failures:
        _fail(failures, err, multirun and len(job_overrides) > 1)
    for job in jobs:
        for w in job.warnings:
            print(f"warning: {w}", file=err)
    if any(job.config.dry_run for job in jobs):
        for n, job in enumerate(jobs):
            label = f"job {n} ({' '.join(job.overrides) or 'no overrides'}): " if multirun else ""
            print(f"{label}{summary(job)}", file=out)
        print(f"dry run: {len(jobs)} job(s) valid, nothing started", file=out)
        raise SystemExit(0)
    return jobs


def _fail(problems: list[str], err, sweep: bool = False) -> None:
    head = "Invalid sweep, no job was started" if sweep else "Invalid configuration"
    print(f"{head} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):", file=err)
    for p in problems:
        print(f"  {p}", file=err)
    raise SystemExit(EXIT_CONFIG_ERROR)
