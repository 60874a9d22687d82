"""verl: rl-loss's aggregation modes and surrogates as a verl policy loss (``pip install rl-loss[verl]``).

Checked against verl 0.9.1 (``make test-verl``). Importing this module imports verl; ``import rl_loss``
never does. verl loads it through the ``verl.plugins`` entry point (:mod:`rl_loss.integrations.verl_plugin`).

Two extension points of verl, see ``docs/integrations/verl.md``:

- ``@register_policy_loss("rl_loss")``: :func:`rl_loss_policy_loss`, selected by
  ``actor_rollout_ref.actor.policy_loss.loss_mode=rl_loss`` and configured by the ``rl_loss`` section of
  :class:`RLLossPolicyLossConfig` (``policy_loss._target_``). sample_mean, token_mean and constant are
  exact over micro-batches, DP and accumulation from verl's own ``config.global_batch_info``.
- ``set_loss_fn``: :func:`make_loss_fn` wraps verl's ``ppo_loss`` so that the per-sample scales computed
  on the driver over the whole step (:func:`add_step_scales`, from verl's ``uid`` and a trajectory id)
  reach the policy loss: prompt_mean and trajectory_mean need them, and refuse to run without them.

The loss returned per micro-batch follows ``agg_loss``'s convention: the micro-batch's partial of the
step objective J times ``dp_size`` (DDP/FSDP average gradients over DP; verl sums micro-batches), so
summed over micro-batches and averaged over DP ranks it is J (``docs/exactness.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config import PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from rl_loss.aggregation import ReducerFactory
from rl_loss.config import LossConfig
from rl_loss.integrations.verl_scales import (
    LOSS_MODE,
    SECTION,
    STEP_MODES,
    count_scales,
    loss_config,
    section_problems,
    step_sample_scales,
)
from rl_loss.step import StepBatch
from rl_loss.surrogates import per_token_pg_loss

STEP_SCALE_KEY = "rl_loss_scale"
"""Batch field holding c_i of every sample (float64), written by :func:`add_step_scales`."""
STEP_SIZE_KEY = "rl_loss_step_size"
"""Batch field holding the number of samples the scales were computed over (checked against verl's step)."""

_step_scales: ContextVar[Tensor | None] = ContextVar("rl_loss_step_scales", default=None)


def _plain(section: Any) -> dict[str, Any]:
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    return dict(section) if isinstance(section, Mapping) else {}


@dataclass
class RLLossPolicyLossConfig(PolicyLossConfig):
    """verl's ``policy_loss`` config with an ``rl_loss`` section (validated when verl builds the config).

    Select it with ``policy_loss._target_=rl_loss.integrations.verl.RLLossPolicyLossConfig`` and
    ``policy_loss.loss_mode=rl_loss``; the section takes ``aggregation``, ``divisor``, ``surrogate`` and
    ``ratio_level`` (LossConfig's meanings); verl's actor fields keep the clip ranges, KL and entropy.

    Raises:
        ValueError: one line per problem of the section, or a section given with another loss_mode.
    """

    rl_loss: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        section = _plain(self.rl_loss)
        if section and self.loss_mode != LOSS_MODE:
            raise ValueError(
                f"actor_rollout_ref.actor.policy_loss.loss_mode: the rl_loss section is used by loss_mode=rl_loss "
                f"only and would be ignored (got {self.loss_mode!r}); set loss_mode=rl_loss or remove the section"
            )
        problems = section_problems(section)
        if problems:
            raise ValueError("\n".join(problems))


def actor_loss_config(actor: Any) -> LossConfig:
    """The LossConfig of a verl actor config (dataclass or DictConfig): its rl_loss section + verl's clips."""
    policy_loss = actor.get("policy_loss") or {}
    return loss_config(_plain(policy_loss.get("rl_loss") or {}), actor, SECTION)


@register_policy_loss(LOSS_MODE)
def rl_loss_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """verl policy loss ``rl_loss``: this micro-batch's partial of J = sum_i c_i * sum_t m*l, times dp_size.

    l is the configured surrogate (``docs/objectives.md``) times verl's rollout-correction weights; c_i
    comes from :func:`add_step_scales` when the whole loss (:func:`make_loss_fn`) is installed, else from
    verl's ``global_batch_info``. ``loss_agg_mode`` is verl's setting for the entropy and KL terms that
    verl's ``ppo_loss`` adds; pg_loss does not use it. Metrics (clipfrac, ppo_kl) are sample means of
    the micro-batch, as rl-loss reports every diagnostic.
    """
    if config is None:
        raise ValueError("config: verl's actor config is required by the rl_loss policy loss (got None)")
    loss_cfg = actor_loss_config(config)
    mask = response_mask.to(log_prob.dtype)
    rows, width = mask.shape
    info = config.global_batch_info
    scales = _step_scales.get()
    if scales is None:
        scales = count_scales(
            loss_cfg.aggregation, mask.sum(-1), info.get("global_batch_size"), info.get("batch_num_tokens"),
            loss_cfg.divisor,
        )
    if scales.numel() != rows:
        raise ValueError(f"{STEP_SCALE_KEY}: {scales.numel()} scales for a micro-batch of {rows} samples")
    local = StepBatch(
        response_lengths=[width] * rows, total_lengths=[width + 1] * rows,
        loss_masks=mask.detach().reshape(-1).to("cpu", torch.float64),
    )
    metric = ReducerFactory(loss_cfg, check_finite=False).metric_reducer(local)  # sample_mean of the micro-batch
    per_token, clipped = per_token_pg_loss(
        loss_cfg, log_prob.reshape(-1), old_log_prob.detach().reshape(-1), advantages.detach().reshape(-1), metric
    )
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights.detach().reshape(-1)
    weights = (mask * scales.to(mask)[:, None]).reshape(-1)  # w = m * c_i
    per_token = torch.where(weights != 0, per_token, torch.zeros_like(per_token))  # padding adds nothing, not NaN
    pg_loss = (per_token * weights).sum() * info.get("dp_size", 1)
    metrics = {
        "actor/pg_clipfrac": metric(clipped.detach()).item(),
        "actor/ppo_kl": metric((old_log_prob - log_prob).detach().reshape(-1)).item(),
    }
    return pg_loss, metrics


def rl_loss_ppo_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None) -> tuple[Tensor, dict]:
    """verl's ``ppo_loss`` with the step's per-sample scales from the batch: every rl-loss mode.

    Install it with ``actor_rollout_wg.set_loss_fn(make_loss_fn(actor_config))``; the batch must carry
    :data:`STEP_SCALE_KEY` and :data:`STEP_SIZE_KEY` (:func:`add_step_scales`) for prompt_mean and
    trajectory_mean. The step is verl's mini-batch (``global_batch_size``): the scales must have been
    computed over exactly that many samples, or a group could be averaged over two optimizer steps.

    Raises:
        ValueError: another loss_mode, missing scales for a mode that needs them, or a step-size mismatch.
    """
    loss_mode = config.policy_loss.get("loss_mode")
    if loss_mode != LOSS_MODE:
        raise ValueError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode: rl-loss's whole loss computes loss_mode=rl_loss "
            f"(got {loss_mode!r}); set loss_mode=rl_loss or keep verl's ppo_loss"
        )
    scales = data.get(STEP_SCALE_KEY, None)
    if scales is None:
        aggregation = actor_loss_config(config).aggregation
        if aggregation in STEP_MODES:
            raise ValueError(
                f"{STEP_SCALE_KEY}: the batch has no step scales, which aggregation={aggregation} needs; call "
                "rl_loss.integrations.verl.add_step_scales(batch, ...) on the driver before update_actor"
            )
        return ppo_loss(config, model_output, data, dp_group)
    step_size = int(data[STEP_SIZE_KEY].reshape(-1)[0])
    if data["global_batch_size"] is not None and step_size != int(data["global_batch_size"]):
        raise ValueError(
            f"{STEP_SIZE_KEY}: the scales were computed over {step_size} samples but verl's optimizer step has "
            f"{data['global_batch_size']} (ppo_mini_batch_size * rollout.n); set actor.ppo_mini_batch_size to "
            "data.train_batch_size so that every prompt group lies within one step"
        )
    token = _step_scales.set(scales.to(torch.float64).reshape(-1))
    try:
        return ppo_loss(config, model_output, data, dp_group)
    finally:
        _step_scales.reset(token)


def make_loss_fn(actor_config: Any) -> partial:
    """The whole loss for verl's ``set_loss_fn`` (``loss_fn(model_output, data, dp_group)``)."""
    return partial(rl_loss_ppo_loss, config=actor_config)


def add_step_scales(batch: Any, config: LossConfig, trajectory_key: str | None = None) -> None:
    """Write c_i of every sample of the step into a verl ``DataProto`` (driver side, before update_actor).

    Args:
        batch: the step's DataProto, with ``batch["response_mask"]`` and ``non_tensor_batch["uid"]``.
        config: the loss configuration (:func:`actor_loss_config` of the trainer's actor config).
        trajectory_key: the ``non_tensor_batch`` key of each sample's trajectory id (trajectory_mean).
    """
    uid = batch.non_tensor_batch.get("uid")
    trajectories = None
    if trajectory_key is not None:
        if trajectory_key not in batch.non_tensor_batch:
            raise ValueError(
                f"trajectory_key: the batch has no non_tensor_batch[{trajectory_key!r}] (has "
                f"{sorted(batch.non_tensor_batch)}); give the key holding each sample's trajectory id"
            )
        trajectories = list(batch.non_tensor_batch[trajectory_key])
    mask = batch.batch["response_mask"]
    scales = step_sample_scales(config, mask, None if uid is None else list(uid), trajectories)
    batch.batch[STEP_SCALE_KEY] = scales.to(mask.device)
    batch.batch[STEP_SIZE_KEY] = torch.full((mask.shape[0],), mask.shape[0], dtype=torch.int64, device=mask.device)
