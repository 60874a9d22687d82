"""What ``backend=trl`` cannot honour, and the run schema's rules that reject it before any model work.

A field of :data:`UNSUPPORTED_BY_TRL` set to anything but its default is rejected by :data:`TRL_RULES`
(run by the run schema's cross-section validator, :class:`launchers.config.backends.TrlBackendConfig`),
so no setting is silently ignored. :func:`trl_layout_summary` is the backend's line of the dry-run
summary. The GRPOConfig mapping itself is :mod:`launchers.backends.hf.grpo_args`, which imports from
here (the configuration never imports the backend). This module imports neither trl nor transformers.

World size: under ``accelerate launch`` (which starts its processes through torchrun) ``WORLD_SIZE``
is the number of data-parallel processes; TRL has no context parallelism, so DP = world size, and
``trainer.global_batch_size = micro_batch_size * gradient_accumulation_steps * world size``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from launchers.config.run_config import RunConfig

UNSUPPORTED_BY_TRL: dict[str, str] = {
    "loss.cov_penalty": "RLLossGRPOTrainer has no step-level covariance pass (docs/corrections.md)",
    "loss.rollout_correction": "the launcher's TRL runs generate without vLLM, so there are no rollout-engine log-probs",
    "parallel.cp_size": "TRL's GRPOTrainer has no context parallelism; use data parallelism (accelerate launch)",
    "parallel.qkv_format": "TRL packs no sequences across CP ranks, so the CP layout has no meaning there",
    "parallel.backend": "accelerate picks the torch.distributed backend; configure it with `accelerate config`",
    "loss.advantage_eps": "TRL computes the advantages and adds a fixed 1e-4 to the group std",
}
"""Launcher fields (dotted paths) that TRL cannot honour: rejected with backend=trl unless at their default."""

ALSO_HONOURED: dict[str, tuple[Any, ...]] = {"loss.advantage_eps": (1e-4,)}
"""Values besides the default that TRL does honour for a field of :data:`UNSUPPORTED_BY_TRL`."""


def gradient_accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each process: global_batch_size / (micro_batch_size * world_size)."""
    return cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * max(world_size, 1))


def steps_per_generation(cfg: RunConfig, world_size: int) -> int:
    """TRL's steps_per_generation: micro-batches per process in one rollout (GA * steps per rollout)."""
    return cfg.rollout_samples // (cfg.trainer.micro_batch_size * max(world_size, 1))


def trl_layout_summary(cfg: RunConfig, world_size: int) -> str:
    """The GRPOConfig batch figures of ``cfg`` on ``world_size`` processes, for the dry-run summary."""
    return (
        f"DP={max(world_size, 1)} through accelerate; GRPOConfig num_generations={cfg.rollout.n_samples_per_prompt} "
        f"generation_batch_size={cfg.rollout_samples} per_device_train_batch_size={cfg.trainer.micro_batch_size} "
        f"gradient_accumulation_steps={gradient_accumulation_steps(cfg, world_size)} "
        f"steps_per_generation={steps_per_generation(cfg, world_size)}"
    )


@functools.cache
def _defaults(config_class: type[RunConfig]) -> RunConfig:
    """The run configuration with every field at its default (the class is the rule's argument's: no import)."""
    return config_class()


def _value_at(cfg: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), cfg)


def _shown(value: Any) -> str:
    """A value as an error line shows it: a nested section by the settings given, not its Python repr."""
    return repr(value.model_dump(exclude_defaults=True) if isinstance(value, BaseModel) else value)


def _unsupported_fields_at_default(cfg: RunConfig, world_size: int) -> str | None:
    problems = []
    for path, reason in UNSUPPORTED_BY_TRL.items():
        value, default = _value_at(cfg, path), _value_at(_defaults(type(cfg)), path)
        if value != default and value not in ALSO_HONOURED.get(path, ()):
            problems.append(f"{path}: backend=trl cannot honour it: {reason} (got {_shown(value)}); remove it (default {_shown(default)})")
    return "\n".join(problems) or None


def _two_samples_per_prompt(cfg: RunConfig, world_size: int) -> str | None:
    if cfg.rollout.n_samples_per_prompt < 2:
        return (
            f"rollout.n_samples_per_prompt: TRL's GRPOTrainer needs at least 2 samples per prompt for group advantages "
            f"(got {cfg.rollout.n_samples_per_prompt}); set 2 or more"
        )
    return None


def _checkpoints_between_rollouts(cfg: RunConfig, world_size: int) -> str | None:
    # TRL keeps a rollout's unused micro-batches in memory only: a checkpoint inside a rollout would
    # resume on a fresh rollout, not on the rest of the saved one.
    if not cfg.whole_rollouts(cfg.trainer.save_every):
        return (
            f"trainer.save_every: with backend=trl a checkpoint must fall between rollouts, every multiple of the "
            f"{cfg.steps_per_rollout} optimizer steps per rollout (got {cfg.trainer.save_every}); "
            f"use a multiple of {cfg.steps_per_rollout}"
        )
    return None


TRL_RULES = (_unsupported_fields_at_default, _two_samples_per_prompt, _checkpoints_between_rollouts)
"""Cross-section rules that only apply with backend=trl (rl_loss's launcher runs them from the run schema)."""
