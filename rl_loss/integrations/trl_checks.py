"""Which ``trl.GRPOConfig`` settings :class:`RLLossGRPOTrainer` honours, and the ones it rejects.

``loss_config`` is the one source of truth for the loss. A GRPOConfig field that TRL's own loss would
read is accepted when it is left at TRL's default (the loss config decides) or when it says the same
thing as the loss config; any other value would be silently ignored or contradict the loss config,
so it is rejected when the trainer is built, one line per problem naming the field, the value and the
fix. TRL keeps what is TRL's: generation, rewards and advantages (``scale_rewards``), so the loss
config's advantage fields, when set to other values than their defaults, must agree with it.

This module reads the GRPOConfig as a plain object (its dataclass defaults); it does not import trl.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from rl_loss.config import AGGREGATIONS, LossConfig
from rl_loss.integrations.trl_steps import LOCAL_MODES

SUPPORTED_AGGREGATIONS: tuple[str, ...] = ("sample_mean", "prompt_mean", "token_mean", "constant")
"""Modes RLLossGRPOTrainer implements; any other mode of :data:`rl_loss.AGGREGATIONS` is rejected."""

TRL_LOSS_TYPES: dict[str, tuple[str, str]] = {
    "grpo": ("sample_mean", "ppo_clip"),
    "dapo": ("token_mean", "ppo_clip"),
    "dr_grpo": ("constant", "ppo_clip"),  # with divisor = max_completion_length
    "cispo": ("token_mean", "cispo"),
    "sapo": ("sample_mean", "sapo"),
    "vespo": ("token_mean", "vespo"),
    "luspo": ("constant", "ppo_clip"),  # with divisor = 1: each sample's token sum, averaged over the samples
}
"""TRL ``loss_type`` -> the (aggregation, surrogate) of the loss config that means the same objective."""

TRL_UNMAPPED_LOSS_TYPES = "bnpo (a token mean per micro-batch, not of the optimizer step)"
"""The TRL 1.16 loss types rl-loss cannot express, in one line."""

TRL_ADVANTAGE_EPS = 1e-4
"""The eps TRL 1.16 adds to the reward std (hard-coded in ``_generate_and_score_completions``)."""

SCALE_REWARDS: dict[str, str] = {"grpo": "group", "drgrpo": "none", "grpo_batch_std": "none"}
"""loss_config.advantage_estimator -> the GRPOConfig.scale_rewards computing the same advantages (grpo_batch_std:
TRL centres the rewards on their group mean and RLLossGRPOTrainer divides by the batch std itself)."""


def _default(args: Any, name: str) -> Any:
    for f in dataclasses.fields(args):
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return None


def _is_default(args: Any, name: str) -> bool:
    return getattr(args, name) == _default(args, name)


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _surrogate(loss: LossConfig) -> str:
    return getattr(loss, "surrogate", "ppo_clip")


def _aggregation_supported(args: Any, loss: LossConfig) -> str | None:
    mode = loss.aggregation
    if mode in SUPPORTED_AGGREGATIONS:
        return None
    hint = (
        "TRL trains each completion (tool turns included) as one sample, so a trajectory is a sample there: "
        "use aggregation=sample_mean"
        if mode == "trajectory_mean"
        else f"use one of {', '.join(SUPPORTED_AGGREGATIONS)}"
    )
    known = "a mode of rl_loss.AGGREGATIONS" if mode in AGGREGATIONS else "an unknown mode"
    return f"loss_config.aggregation: {known} that RLLossGRPOTrainer does not implement (got {mode!r}); {hint}"


def _step_masks_available(args: Any, loss: LossConfig) -> str | None:
    spg, ga = args.steps_per_generation, args.gradient_accumulation_steps
    needs_all_masks = loss.custom_pg_reducer is not None or loss.aggregation not in LOCAL_MODES
    if spg % ga == 0 or not needs_all_masks:
        return None
    mode = "custom_pg_reducer" if loss.custom_pg_reducer is not None else f"aggregation={loss.aggregation}"
    return (
        f"GRPOConfig.steps_per_generation: an optimizer step of gradient_accumulation_steps={ga} micro-batches mixes "
        f"generation batches of {spg} micro-batches, so {mode} would need the loss masks of completions not "
        f"generated yet (got steps_per_generation={spg}); set steps_per_generation to a multiple of "
        f"gradient_accumulation_steps, e.g. {ga} (TRL's default), or use sample_mean or constant"
    )


def _prompt_groups_within_one_step(args: Any, loss: LossConfig) -> str | None:
    spg, ga = args.steps_per_generation, args.gradient_accumulation_steps
    if loss.aggregation != "prompt_mean" or spg == ga or spg % ga:  # (spg % ga: _step_masks_available says it)
        return None
    return (
        f"GRPOConfig.steps_per_generation: with aggregation=prompt_mean a prompt group must lie in one optimizer step, "
        f"but TRL shuffles each generation batch over steps_per_generation/gradient_accumulation_steps={spg // ga} "
        f"optimizer steps (got steps_per_generation={spg}, gradient_accumulation_steps={ga}); set "
        f"steps_per_generation={ga}"
    )


def _loss_type_agrees(args: Any, loss: LossConfig) -> str | None:
    if _is_default(args, "loss_type"):
        return None
    wanted = TRL_LOSS_TYPES.get(args.loss_type)
    ours = (loss.aggregation, _surrogate(loss))
    divisor = {"dr_grpo": float(args.max_completion_length), "luspo": 1.0}.get(args.loss_type)
    divisor_ok = divisor is None or _same(loss.divisor, divisor)
    if wanted == ours and divisor_ok:
        return None
    if wanted is None:
        why = f"it has no rl-loss equivalent (TRL loss types without one: {TRL_UNMAPPED_LOSS_TYPES})"
    elif wanted == ours:
        why = f"{args.loss_type} divides by {divisor} but loss_config.divisor={loss.divisor}"
    else:
        why = f"it means aggregation={wanted[0]}, surrogate={wanted[1]} but loss_config has {ours[0]}, {ours[1]}"
    return (
        f"GRPOConfig.loss_type: loss_config decides the loss and {why} (got loss_type={args.loss_type!r}); "
        "leave loss_type at its default or set the loss_config that means the same"
    )


def _clip_range_agrees(args: Any, loss: LossConfig) -> str | None:
    problems = []
    surrogate = _surrogate(loss)
    if surrogate == "ppo_clip" and not _is_default(args, "epsilon") and not _same(args.epsilon, loss.clip_low):
        problems.append(
            f"GRPOConfig.epsilon: must equal loss_config.eps_clip={loss.clip_low}, which decides the clip range "
            f"(got epsilon={args.epsilon}); set loss_config.eps_clip={args.epsilon} or leave epsilon at its default"
        )
    if surrogate == "cispo" and args.loss_type == "cispo" and args.epsilon_high is None:
        # TRL's cispo caps the ratio at epsilon_high, which defaults to epsilon (0.2): a cap below 1
        problems.append(
            f"GRPOConfig.epsilon_high: TRL's cispo caps the ratio at epsilon_high itself, which unset is epsilon="
            f"{args.epsilon} (got None); set epsilon_high = 1 + loss_config.eps_clip_high = {1.0 + loss.clip_high}"
        )
    if surrogate in ("ppo_clip", "cispo") and args.epsilon_high is not None:
        # TRL's cispo caps the ratio at epsilon_high itself; rl-loss's at 1 + eps_clip_high (docs/objectives.md).
        expected = loss.clip_high + (1.0 if surrogate == "cispo" else 0.0)
        if not _same(args.epsilon_high, expected):
            problems.append(
                f"GRPOConfig.epsilon_high: must equal {'1 + ' if surrogate == 'cispo' else ''}loss_config.eps_clip_high "
                f"= {expected}, which decides the upper clip (got epsilon_high={args.epsilon_high}); set "
                "loss_config.eps_clip_high accordingly or leave epsilon_high unset"
            )
    return "\n".join(problems) or None


def _dual_clip_agrees(args: Any, loss: LossConfig) -> str | None:
    delta = args.delta
    if delta is None:
        return None
    # TRL's delta caps the ratio before the PPO min: for A < 0 the loss is capped at -delta*A (a dual clip with
    # eps_clip_c = delta); for A > 0 it changes nothing while delta > 1 + eps_clip_high.
    if _same(delta, loss.eps_clip_c) and delta > 1.0 + loss.clip_high:
        return None
    return (
        f"GRPOConfig.delta: is rl-loss's dual clip only when it equals loss_config.eps_clip_c (= {loss.eps_clip_c}) "
        f"and exceeds 1 + eps_clip_high (got delta={delta}); set loss_config.eps_clip_c={delta} and leave delta unset"
    )


def _ratio_level_agrees(args: Any, loss: LossConfig) -> str | None:
    ours = getattr(loss, "ratio_level", "token")
    if ours == "sequence_token":  # TRL 1.16 has no such level; its default "token" leaves the choice to loss_config
        ours = "token"
    if _is_default(args, "importance_sampling_level") or args.importance_sampling_level == ours:
        return None
    return (
        f"GRPOConfig.importance_sampling_level: must equal loss_config's ratio level ({ours}), which decides the "
        f"ratio (got importance_sampling_level={args.importance_sampling_level!r}); set it to {ours!r}"
    )


VESPO_FIELDS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
"""GRPOConfig's VESPO fields, named as LossConfig's (and in the same order as ``LossConfig.vespo_shape``)."""


def _no_trl_surrogate_parameters(args: Any, loss: LossConfig) -> str | None:
    # read only by TRL's own sapo / vespo losses; rl-loss takes a surrogate's parameters from loss_config
    problems = [
        f"GRPOConfig.{name}: a parameter of TRL's own loss, which RLLossGRPOTrainer replaces (got {getattr(args, name)}); "
        "leave it at its default and set the surrogate's parameters in loss_config"
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", *(() if _surrogate(loss) == "vespo" else VESPO_FIELDS))
        if not _is_default(args, name)
    ]
    return "\n".join(problems) or None


def _vespo_shape_agrees(args: Any, loss: LossConfig) -> str | None:
    if _surrogate(loss) != "vespo":
        return None
    problems = [
        f"GRPOConfig.{name}: must equal loss_config.{name}={ours}, which decides VESPO's weight (got {getattr(args, name)}); "
        f"set loss_config.{name}={getattr(args, name)} or leave {name} at its default"
        for name, ours in zip(VESPO_FIELDS, loss.vespo_shape, strict=True)
        if not _is_default(args, name) and not _same(getattr(args, name), ours)
    ]
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        problems.append(
            "GRPOConfig.vllm_importance_sampling_correction: TRL folds the vLLM ratio into VESPO's sequence weight, "
            "rl-loss multiplies each token's loss by it (got True with surrogate=vespo); set it to False"
        )
    return "\n".join(problems) or None


def _kl_coef_is_beta(args: Any, loss: LossConfig) -> str | None:
    if _same(float(args.beta), loss.kl_coef):
        return None
    return (
        f"GRPOConfig.beta: TRL computes reference log-probs only when beta > 0 and rl-loss weights the KL with "
        f"loss_config.kl_coef, so they must be equal (got beta={args.beta}, kl_coef={loss.kl_coef}); "
        f"set beta={loss.kl_coef} or loss_config.kl_coef={args.beta}"
    )


def _kl_without_bias_correction(args: Any, loss: LossConfig) -> str | None:
    if loss.kl_coef == 0 or not args.use_bias_correction_kl:
        return None
    return (
        f"GRPOConfig.use_bias_correction_kl: rl-loss's KL term is loss_config.kl_estimator={loss.kl_estimator} of "
        "logp - logp_ref without TRL's importance-ratio factor, so the correction would be ignored (got True with "
        f"kl_coef={loss.kl_coef}); set use_bias_correction_kl=False"
    )


def _entropy_from_loss_config(args: Any, loss: LossConfig) -> str | None:
    problems = []
    if args.entropy_coef != 0:
        problems.append(
            f"GRPOConfig.entropy_coef: the entropy bonus is loss_config.entropy_coef (a sample_mean over the optimizer "
            f"step) (got entropy_coef={args.entropy_coef}); set loss_config.entropy_coef={args.entropy_coef} and "
            "entropy_coef=0"
        )
    if args.use_adaptive_entropy:
        problems.append(
            "GRPOConfig.use_adaptive_entropy: TRL's adaptive entropy controller has no rl-loss equivalent (got True); "
            "set use_adaptive_entropy=False and a fixed loss_config.entropy_coef"
        )
    return "\n".join(problems) or None


def _no_trl_only_token_edits(args: Any, loss: LossConfig) -> str | None:
    problems = []
    if args.top_entropy_quantile < 1.0:
        problems.append(
            "GRPOConfig.top_entropy_quantile: TRL's high-entropy token mask is not applied by rl-loss (got "
            f"{args.top_entropy_quantile}); set top_entropy_quantile=1.0"
        )
    if args.off_policy_mask_threshold is not None:
        problems.append(
            "GRPOConfig.off_policy_mask_threshold: TRL's off-policy sequence mask is not applied by rl-loss (got "
            f"{args.off_policy_mask_threshold}); leave it unset and set loss_config.off_policy_mask_delta instead"
        )
    if args.mask_truncated_completions:
        problems.append(
            "GRPOConfig.mask_truncated_completions: TRL edits the loss masks before rl-loss sees them, so truncated "
            "completions would also leave the denominators, whose counts come from the unedited masks (docs/aggregation.md) (got True); "
            "set mask_truncated_completions=False"
        )
    return "\n".join(problems) or None


def _corrections_the_trainer_can_feed(args: Any, loss: LossConfig) -> str | None:
    problems = []
    if loss.cov_penalty != "none":
        problems.append(
            f"loss_config.cov_penalty: {loss.cov_penalty} needs a step-level covariance selection that "
            f"RLLossGRPOTrainer does not compute (got {loss.cov_penalty}); set cov_penalty=none"
        )
    if loss.rollout_correction.enabled and not args.use_vllm:
        problems.append(
            "loss_config.rollout_correction: needs the rollout engine's log-probs, which TRL has only with "
            "use_vllm=True (got use_vllm=False); generate with vLLM or drop rollout_correction"
        )
    elif loss.rollout_correction.enabled and args.vllm_importance_sampling_correction:
        problems.append(
            "GRPOConfig.vllm_importance_sampling_correction: TRL's own weights would multiply rl-loss's "
            "rollout_correction, correcting twice (got True with loss_config.rollout_correction set); keep one: "
            "this one for TRL's modes, loss_config.rollout_correction for verl's"
        )
    return "\n".join(problems) or None


def _given(loss: LossConfig, name: str) -> bool:
    """Was ``name`` set to a value other than its default? (A Hydra-composed loss node sets every field.)"""
    return name in loss.model_fields_set and getattr(loss, name) != type(loss).model_fields[name].default


def _advantages_agree(args: Any, loss: LossConfig) -> str | None:
    problems = []
    wanted = SCALE_REWARDS.get(loss.advantage_estimator)
    if _given(loss, "advantage_estimator") and wanted != args.scale_rewards:
        fix = f"set scale_rewards={wanted!r}" if wanted else "drop loss_config.advantage_estimator"
        problems.append(
            f"loss_config.advantage_estimator: TRL computes the advantages, with scale_rewards={args.scale_rewards!r} "
            f"(got advantage_estimator={loss.advantage_estimator!r}); {fix}"
        )
    # grpo_batch_std: RLLossGRPOTrainer divides by the batch std + loss_config.advantage_eps itself
    trl_adds_eps = loss.advantage_estimator != "grpo_batch_std"
    if trl_adds_eps and _given(loss, "advantage_eps") and not _same(loss.advantage_eps, TRL_ADVANTAGE_EPS):
        problems.append(
            f"loss_config.advantage_eps: TRL adds a fixed {TRL_ADVANTAGE_EPS} to the reward std "
            f"(got advantage_eps={loss.advantage_eps}); drop it"
        )
    return "\n".join(problems) or None


RULES: tuple[Callable[[Any, LossConfig], str | None], ...] = (
    _aggregation_supported,
    _step_masks_available,
    _prompt_groups_within_one_step,
    _loss_type_agrees,
    _clip_range_agrees,
    _dual_clip_agrees,
    _ratio_level_agrees,
    _no_trl_surrogate_parameters,
    _vespo_shape_agrees,
    _kl_coef_is_beta,
    _kl_without_bias_correction,
    _entropy_from_loss_config,
    _no_trl_only_token_edits,
    _corrections_the_trainer_can_feed,
    _advantages_agree,
)


def grpo_config_problems(args: Any, loss: LossConfig) -> list[str]:
    """One line per GRPOConfig / loss_config disagreement (empty when the pair is consistent)."""
    lines: list[str] = []
    for rule in RULES:
        problem = rule(args, loss)
        if problem:
            lines.extend(problem.split("\n"))
    return lines


def check_grpo_config(args: Any, loss: LossConfig) -> None:
    """Raise ``ValueError`` listing every problem of :func:`grpo_config_problems`, one per line."""
    problems = grpo_config_problems(args, loss)
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        raise ValueError(
            f"Invalid RLLossGRPOTrainer configuration ({len(problems)} {noun}):\n  " + "\n  ".join(problems)
        )
