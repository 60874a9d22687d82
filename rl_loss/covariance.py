"""Clip-Cov and KL-Cov (arXiv:2505.22617, "The Entropy Mechanism of RL for Reasoning LMs"; verl's
``compute_policy_loss_clip_cov`` / ``_kl_cov``): entropy control through the tokens whose log-prob and
advantage covary most.

The covariance of a token is a step-level statistic (its centring means run over the whole step), and
the selection of the highest-covariance tokens ranks them over the whole step, so it is computed once
per step by :func:`covariance_selection` from the step's detached log-probs and advantages in step
order (gathered over micro-batches, DP and CP ranks by the caller). Each rank then passes its slice,
``selection[pg_reducer.token_index]``, to :func:`rl_loss.policy_loss` as ``cov_selection``. A
configuration with a covariance penalty and no selection is refused; no rank computes its own from a
slice (docs/corrections.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl_loss.config import LossConfig
from rl_loss.inputs import instance_of, same_length_floats
from rl_loss.step import StepBatch
from rl_loss.surrogates import importance_ratio


def token_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """cov_t = (A_t - mean_m A) * (logp_t - mean_m logp), the means over the loss-mask tokens (m = 1)."""
    count = mask.sum().clamp_min(1)
    mean_adv = (advantages * mask).sum() / count
    mean_logp = (logprobs * mask).sum() / count
    return (advantages - mean_adv) * (logprobs - mean_logp)


def covariance_selection(
    config: LossConfig,
    step: StepBatch,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The step's 0/1 selection of ``config.cov_penalty``, one entry per response token in step order (float64).

    With T the step's loss-mask tokens and cov from :func:`token_covariance` over them:

    - clip_cov: candidates are loss-mask tokens where PPO's clip does not bind and
      clip_cov_lb < cov < clip_cov_ub; a uniformly random ``min(max(int(clip_cov_ratio * T), 1), #candidates)``
      of them are selected (``generator``: seed it identically on every rank, as the draw runs over the step).
    - kl_cov: the ``max(int(kl_cov_ratio * T), 1)`` loss-mask tokens of largest cov (none when T = 0).

    Args:
        logprobs: the current policy's log-probs of every response token of the step (detached; at the first
            update of a rollout they equal ``old_logprobs``, otherwise a no-grad forward of the step).
        old_logprobs, advantages: the same tokens' old log-probs and advantages, step order.
    """
    instance_of("config", config, LossConfig)
    n = instance_of("step", step, StepBatch).num_response_tokens
    same_length_floats(n, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    logprobs, old_logprobs, advantages = (v.detach().double().cpu() for v in (logprobs, old_logprobs, advantages))
    mask = step.mask_flat
    selection = torch.zeros(n, dtype=torch.float64)
    tokens = step.masked_tokens()
    if config.cov_penalty == "none" or tokens == 0:
        return selection
    cov = token_covariance(logprobs, advantages, mask)
    count = max(int(config.cov_ratio * tokens), 1)
    if config.cov_penalty == "kl_cov":
        valid = torch.nonzero(mask > 0).squeeze(1)
        selection[valid[torch.topk(cov[valid], count, largest=True).indices]] = 1.0
        return selection
    ratio = importance_ratio(logprobs, old_logprobs)
    unclipped = -advantages * ratio
    clipped_branch = -advantages * ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    candidate = (mask > 0) & ~(clipped_branch > unclipped) & (cov > config.cov_lb) & (cov < config.cov_ub)
    candidates = torch.nonzero(candidate).squeeze(1)
    if candidates.numel():
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
        selection[chosen] = 1.0
    return selection


def apply_cov_penalty(
    config: LossConfig,
    per_token: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    selection: Tensor,
) -> Tensor:
    """The per-token pg loss with the covariance penalty applied to the selected tokens (s = 1).

    clip_cov: l_t * (1 - s_t) — a selected token adds neither loss nor gradient.
    kl_cov:   -A_t * r_t + s_t * kl_cov_coef * |logp_t - logp_old_t| — PPO's unclipped surrogate, and a KL
              penalty on the selected tokens instead of a clip.
    """
    selection = selection.detach().to(per_token.dtype)
    if config.cov_penalty == "clip_cov":
        return per_token * (1.0 - selection)
    ratio = importance_ratio(logprobs, old_logprobs)
    return -advantages * ratio + selection * config.cov_kl_coef * (logprobs - old_logprobs).abs()
