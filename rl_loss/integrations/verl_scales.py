"""The rl-loss section of a verl actor config, and the per-sample scales c_i that verl's loss applies.

Importable without verl (torch, pydantic and rl_loss only): the verl plugin
(:mod:`rl_loss.integrations.verl`), the config check (:mod:`rl_loss.integrations.verl_config`) and the
driver-side step scales share it. See ``docs/integrations/verl.md``.

Every aggregation mode is a per-sample scale on a masked token sum, ``J = sum_i c_i * sum_t m*l``
(``docs/aggregation.md``). Inside verl a micro-batch knows only verl's global counts
(``config.global_batch_info``: ``global_batch_size`` N, ``batch_num_tokens`` T, ``dp_size``), which
fix c_i for sample_mean, token_mean and constant. prompt_mean and trajectory_mean need the step's
group / trajectory token totals, which no micro-batch sees: the driver computes c_i over the whole
step (:func:`step_sample_scales`) and ships them in the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from rl_loss.aggregation import SAMPLE_SCALES
from rl_loss.config import LossConfig
from rl_loss.config_errors import format_validation_error
from rl_loss.step import StepBatch

SECTION = "actor_rollout_ref.actor.policy_loss.rl_loss"
"""Where the rl-loss section lives in verl's trainer config (ppo_trainer.yaml)."""

LOSS_MODE = "rl_loss"
"""The name rl-loss's policy loss is registered under in verl (``policy_loss.loss_mode``)."""

SECTION_FIELDS = ("aggregation", "divisor", "surrogate", "ratio_level")
"""LossConfig fields the rl-loss section sets; verl's own actor fields own the rest (VERL_OWNED)."""

VERL_OWNED = {
    "eps_clip": "actor_rollout_ref.actor.clip_ratio_low",
    "eps_clip_high": "actor_rollout_ref.actor.clip_ratio_high",
    "eps_clip_c": "actor_rollout_ref.actor.clip_ratio_c",
    "sapo_tau_pos": "actor_rollout_ref.actor.tau_pos",
    "sapo_tau_neg": "actor_rollout_ref.actor.tau_neg",
    "kl_coef": "actor_rollout_ref.actor.kl_loss_coef (with use_kl_loss=true)",
    "kl_estimator": "actor_rollout_ref.actor.kl_loss_type",
    "entropy_coef": "actor_rollout_ref.actor.entropy_coeff",
    "advantage_estimator": "algorithm.adv_estimator",
    "advantage_eps": "algorithm.adv_estimator",
    "calculate_per_token_loss": "aggregation: token_mean",
    "custom_pg_reducer": "aggregation (a custom reducer needs rl-loss's StepBatch, which verl does not build)",
}
"""LossConfig fields that verl already has a setting for: one source each, so the section refuses them."""

STEP_MODES = ("prompt_mean", "trajectory_mean")
"""Modes whose c_i need step-level group / trajectory totals: the driver computes them (step_sample_scales)."""


def section_problems(section: Mapping[str, Any], where: str = SECTION) -> list[str]:
    """One line per problem of an rl-loss section (field, value, fix); empty when it is valid."""
    problems = [
        f"{where}.{key}: verl owns this setting, so it would be set twice (got {value!r}); "
        f"remove it and set {VERL_OWNED[key]}"
        for key, value in section.items()
        if key in VERL_OWNED
    ]
    try:
        LossConfig.model_validate({k: v for k, v in section.items() if k not in VERL_OWNED})
    except ValidationError as err:
        problems += format_validation_error(err, LossConfig, where)
    return problems


def loss_config(section: Mapping[str, Any], actor: Any | None = None, where: str = SECTION) -> LossConfig:
    """The LossConfig of an rl-loss section, with the clip / SAPO settings taken from verl's actor config.

    Args:
        section: the ``rl_loss`` mapping (aggregation, divisor, surrogate, ratio_level).
        actor: verl's actor config (anything with ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
            ``clip_ratio_c``, ``tau_pos``, ``tau_neg`` attributes or keys); None keeps rl-loss's defaults.

    Raises:
        ValueError: one line per problem, fields named ``{where}.FIELD``.
    """
    problems = section_problems(section, where)
    if problems:
        raise ValueError("\n".join(problems))
    fields = dict(section)
    if actor is not None:
        fields.update(_verl_surrogate_fields(fields.get("surrogate", "ppo_clip"), actor))
    try:
        return LossConfig.model_validate(fields)
    except ValidationError as err:  # a verl value out of rl-loss's range: name verl's field
        def verl_names(loc: list[str]) -> list[str]:  # a field taken from verl's actor: verl's name
            return [VERL_OWNED[loc[0]].split(" ")[0]] if loc and loc[0] in VERL_OWNED else [where, *loc]

        raise ValueError("\n".join(format_validation_error(err, LossConfig, normalize_loc=verl_names))) from None


def _verl_surrogate_fields(surrogate: str, actor: Any) -> dict[str, float]:
    """verl's clip / temperature settings under LossConfig's names, for the surrogate that uses them."""

    def get(name: str) -> Any:
        return actor.get(name) if isinstance(actor, Mapping) or hasattr(actor, "get") else getattr(actor, name, None)

    clip = get("clip_ratio")
    low = get("clip_ratio_low") if get("clip_ratio_low") is not None else clip
    high = get("clip_ratio_high") if get("clip_ratio_high") is not None else clip
    if surrogate == "sapo":
        return {"sapo_tau_pos": get("tau_pos"), "sapo_tau_neg": get("tau_neg")}
    if surrogate == "cispo":
        return {"eps_clip_high": high}
    # verl's vanilla loss always applies the dual clip with clip_ratio_c (default 3.0)
    return {"eps_clip": low, "eps_clip_high": high, "eps_clip_c": get("clip_ratio_c")}


def count_scales(
    aggregation: str,
    sample_tokens: Tensor,
    global_batch_size: int | None,
    batch_num_tokens: int | None,
    divisor: float | None,
) -> Tensor:
    """c_i of the micro-batch's samples from verl's global counts (sample_mean, token_mean, constant).

    The formulas of ``rl_loss.aggregation`` with N = verl's ``global_batch_size`` (samples of the optimizer
    step) and T = its ``batch_num_tokens`` (masked tokens of the step over every DP rank):
    sample_mean c_i = 1 / (N * max(|o_i|, 1)); token_mean c_i = 1 / max(T, 1); constant c_i = 1 / (N * L).

    Raises:
        ValueError: when verl did not fill the count the mode needs, or for prompt_mean / trajectory_mean.
    """
    if aggregation in STEP_MODES:
        raise ValueError(
            f"aggregation={aggregation} needs the step's {'prompt groups' if aggregation == 'prompt_mean' else 'trajectories'}, "
            "which verl's policy-loss function does not receive; install rl-loss's whole loss "
            "(actor_rollout_wg.set_loss_fn(rl_loss.integrations.verl.make_loss_fn(actor_config))) and add the step "
            "scales to the batch (add_step_scales), see docs/integrations/verl.md"
        )
    if aggregation == "token_mean":
        if batch_num_tokens is None:
            raise ValueError(
                "global_batch_info['batch_num_tokens'] is None: token_mean needs verl's step token count "
                "(filled by verl's ppo_loss from the engine); call the loss through verl.workers.utils.losses.ppo_loss"
            )
        return torch.full_like(sample_tokens, 1.0 / max(float(batch_num_tokens), 1.0), dtype=torch.float64)
    if global_batch_size is None:
        raise ValueError(
            f"global_batch_info['global_batch_size'] is None: {aggregation} needs verl's step size N "
            "(filled by verl's ppo_loss from the trainer); call the loss through verl.workers.utils.losses.ppo_loss"
        )
    n = float(global_batch_size)
    if aggregation == "constant":
        return torch.full_like(sample_tokens, 1.0 / (n * float(divisor)), dtype=torch.float64)
    return 1.0 / (n * sample_tokens.to(torch.float64).clamp_min(1))


def dense_ids(values: Sequence[Any]) -> list[int]:
    """Any hashable ids (verl's uid strings) as 0..K-1 in order of first appearance."""
    seen: dict[Any, int] = {}
    return [seen.setdefault(v, len(seen)) for v in values]


def step_sample_scales(
    config: LossConfig,
    response_mask: Tensor,
    uid: Sequence[Any] | None = None,
    trajectory_ids: Sequence[Any] | None = None,
) -> Tensor:
    """c_i of every sample of one optimizer step (float64, one per row), for any aggregation mode.

    Args:
        config: the loss configuration (its aggregation and divisor).
        response_mask: verl's ``response_mask`` of the whole step, ``(N, max_response_len)``, before
            rejection sampling (denominators count it, ``docs/aggregation.md``).
        uid: verl's prompt id of each sample (``non_tensor_batch["uid"]``); required for prompt_mean.
        trajectory_ids: the trajectory of each sample; required for trajectory_mean.

    Raises:
        ValueError: from :class:`~rl_loss.StepBatch` when ids are missing or inconsistent.
    """
    mask = response_mask.detach().to("cpu", torch.float64)
    n, width = mask.shape
    step = StepBatch(
        response_lengths=[width] * n,
        total_lengths=[width + 1] * n,
        loss_masks=mask.reshape(-1),
        group_index=None if uid is None else dense_ids(uid),
        trajectory_index=None if trajectory_ids is None else dense_ids(trajectory_ids),
    )
    return SAMPLE_SCALES[config.aggregation](step, config.divisor).clone()
