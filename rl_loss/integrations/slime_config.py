"""The loss configuration of a slime / miles job: read from ``RL_LOSS_CONFIG``, checked for what slime's hook can serve.

``RL_LOSS_CONFIG`` holds what ``rl-loss-validate`` takes: a loss group YAML file and/or overrides, e.g.
``RL_LOSS_CONFIG="loss=drgrpo loss.divisor=4096"`` or ``RL_LOSS_CONFIG=/path/to/loss.yaml``. It is composed and
validated exactly as ``rl-loss-validate`` does, then checked against what slime's
``--custom-pg-loss-reducer-function-path`` hook can compute exactly (docs/integrations/slime.md):

- served: ``sample_mean``, ``constant`` (with one training sample per rollout, slime's default) and
  ``token_mean`` (with slime's ``--calculate-per-token-loss``);
- refused: ``prompt_mean`` (the hook sees no prompt groups), ``trajectory_mean`` (the hook sees no rollout
  ids; it is slime's own default reducer), ``custom_pg_reducer`` (it needs the whole step), and every field
  that shapes the per-token loss (surrogate, clip ranges, KL, entropy): slime computes those itself, so
  they would be silently ignored.

Nothing here imports megatron, slime or miles: :func:`check_slime_env` is what
``rl-loss-validate --slime-env`` runs, and :mod:`rl_loss.integrations.slime` runs :func:`load_env_config`
when slime loads it. Hydra is imported only while a configuration is composed.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from rl_loss.config import LossConfig
from rl_loss.config_errors import ConfigError, show


class SlimeNotice(UserWarning):
    """A loss setting slime computes itself (advantages), with the slime flag that matches it."""


ENV_VAR = "RL_LOSS_CONFIG"
"""The environment variable naming the loss configuration of a slime / miles job."""

SERVED_AGGREGATIONS = ("sample_mean", "token_mean", "constant")
"""Aggregation modes the pg-loss reducer hook computes exactly (docs/integrations/slime.md)."""

REFUSED_AGGREGATIONS = {
    "prompt_mean": (
        "needs each sample's prompt group and the step's group count, and slime's pg-loss reducer hook receives "
        "neither; drop --custom-pg-loss-reducer-function-path and give the samples of one prompt the same "
        "Sample.rollout_id: slime's own per-rollout mean is then prompt_mean (docs/integrations/slime.md)"
    ),
    "trajectory_mean": (
        "is slime's own default (the per-rollout mean over Sample.rollout_id), and the pg-loss reducer hook "
        "receives no rollout ids; drop --custom-pg-loss-reducer-function-path to use it"
    ),
}

SLIME_FLAGS = {
    "surrogate": "--advantage-estimator cispo (slime has no SAPO)",
    "ratio_level": "--advantage-estimator gspo",
    "eps_clip": "--eps-clip",
    "eps_clip_high": "--eps-clip-high",
    "eps_clip_c": "--eps-clip-c",
    "sapo_tau_pos": "none (slime has no SAPO)",
    "sapo_tau_neg": "none (slime has no SAPO)",
    "kl_coef": "--use-kl-loss --kl-loss-coef",
    "kl_estimator": "--kl-loss-type",
    "entropy_coef": "--entropy-coef",
}
"""Per-token loss fields slime computes itself, and the slime flag that sets each."""

ADVANTAGE_FLAGS = {
    "advantage_estimator": {
        "drgrpo": "--advantage-estimator grpo --disable-grpo-std-normalization",
        "grpo_batch_std": "none (slime normalises by the group std)",
    },
    "advantage_eps": {},
}
"""Advantage fields: slime computes advantages at rollout time; a non-default value gets a notice naming its flag."""


def parse_env_value(value: str | None) -> list[str]:
    """The inputs written in ``RL_LOSS_CONFIG`` (shell words: a YAML file and/or overrides).

    Raises:
        ConfigError: when the variable is unset or empty, or is not valid shell quoting.
    """
    if value is None or not value.strip():
        raise ConfigError([
            f"{ENV_VAR}: is not set (got {show(value)}); set it to a loss YAML file or to overrides such as "
            f"{ENV_VAR}='loss=drgrpo loss.divisor=4096' in the environment of every training process"
        ])
    try:
        return shlex.split(value)
    except ValueError as err:
        raise ConfigError([f"{ENV_VAR}: is not valid shell quoting ({err}) (got {show(value)}); fix the quotes"]) from None


def compose_env_config(inputs: list[str]) -> tuple[LossConfig, list[str]]:
    """The LossConfig that ``rl-loss-validate INPUTS`` validates, and its warning lines.

    Raises:
        ConfigError: the same problem lines ``rl-loss-validate`` prints, each prefixed with ``RL_LOSS_CONFIG: ``.
    """
    from rl_loss import validate

    files, overrides = validate.split_inputs(inputs)
    if len(files) > 1:
        raise ConfigError([f"{ENV_VAR}: names {len(files)} files (got {show(' '.join(files))}); give one loss YAML file"])
    problems = [p for outcome in validate.run(inputs) for p in outcome.problems]
    if problems:
        raise ConfigError([f"{ENV_VAR}: {p}" for p in problems])
    loss_file = validate.read_loss_file(Path(files[0])) if files else None
    node = validate.compose_loss([validate.loss_override(o) for o in overrides], loss_file)
    return validate.validate_loss(validate.resolve_loss(node))


def slime_problems(config: LossConfig) -> list[str]:
    """One line per setting that slime's pg-loss reducer hook cannot serve (empty when it can serve them all)."""
    problems = []
    if config.custom_pg_reducer is not None:
        problems.append(
            f"loss.custom_pg_reducer: builds weights from the whole step, which slime's pg-loss reducer hook never "
            f"sees (got {config.custom_pg_reducer!r}); point --custom-pg-loss-reducer-function-path at your own "
            "function instead"
        )
    elif config.aggregation in REFUSED_AGGREGATIONS:
        problems.append(f"loss.aggregation: {config.aggregation} {REFUSED_AGGREGATIONS[config.aggregation]}")
    defaults = LossConfig()
    for name, flag in SLIME_FLAGS.items():
        value = getattr(config, name)
        if value != getattr(defaults, name):
            problems.append(
                f"loss.{name}: slime computes the per-token loss itself, so it would be ignored (got {show(value)}); "
                f"remove it from {ENV_VAR} and use slime's {flag}"
            )
    return problems


def slime_notices(config: LossConfig) -> list[str]:
    """One line per advantage setting slime computes itself (at rollout time), naming the slime flag to match."""
    defaults, lines = LossConfig(), []
    for name, flags in ADVANTAGE_FLAGS.items():
        value = getattr(config, name)
        if value != getattr(defaults, name):
            flag = flags.get(value, "its own advantage flags")
            lines.append(
                f"loss.{name}={value}: slime computes advantages before the loss and the adapter does not apply it; "
                f"match it with slime's {flag}"
            )
    return lines


def load_env_config(environ: Mapping[str, str] | None = None) -> tuple[LossConfig, list[str]]:
    """The validated, slime-servable LossConfig of ``RL_LOSS_CONFIG``, and its warning and notice lines.

    Args:
        environ: the environment to read (default: ``os.environ``).

    Raises:
        ConfigError: one line per problem, each starting ``RL_LOSS_CONFIG: ``.
    """
    env = os.environ if environ is None else environ
    config, warnings = compose_env_config(parse_env_value(env.get(ENV_VAR)))
    problems = slime_problems(config)
    if problems:
        raise ConfigError([f"{ENV_VAR}: {p}" for p in problems])
    return config, warnings + slime_notices(config)


def check_slime_env(environ: Mapping[str, str] | None = None) -> tuple[list[str], list[str], str]:
    """What ``rl-loss-validate --slime-env`` reports: (problem lines, warning lines, summary).

    Validates ``RL_LOSS_CONFIG`` exactly as :mod:`rl_loss.integrations.slime` does when slime loads it,
    without importing megatron, slime or miles.
    """
    try:
        config, warnings = load_env_config(environ)
    except ConfigError as err:
        return err.problems, [], ""
    divisor = f", divisor={config.divisor:g}" if config.divisor is not None else ""
    flag = ", needs --calculate-per-token-loss" if config.calculate_per_token_loss else ""
    return [], warnings, f"aggregation={config.aggregation}{divisor}{flag}"


def slime_env_main(inputs: list[str], environ: Mapping[str, str] | None = None) -> int:
    """``rl-loss-validate --slime-env``: print the outcome of :func:`check_slime_env`; exit status 0 or 2."""
    if inputs:
        print(f"rl-loss-validate: --slime-env reads ${ENV_VAR} only (got {' '.join(inputs)}); drop the other "
              f"inputs or validate them without --slime-env", file=sys.stderr)
        return 2
    problems, warnings, summary = check_slime_env(environ)
    for line in problems:
        print(line, file=sys.stderr)
    for line in warnings:
        print(f"{ENV_VAR}: warning: {line}", file=sys.stderr)
    if not problems:
        print(f"{ENV_VAR}: ok for slime's pg-loss reducer hook ({summary})")
    return 2 if problems else 0
