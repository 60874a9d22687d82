"""The per-token surrogate objectives of the policy loss (docs/objectives.md): PPO clip, CISPO, SAPO, and the
sequence-level ratio of GSPO.

Each surrogate maps one rank's local per-token inputs to ``(loss, clipped, ratio)``: the per-token loss
``l`` that the reducers aggregate (every aggregation mode applies unchanged), a 0/1 float tensor of the
tokens that ``pg_clipfrac`` counts (what "clipped" means for each surrogate is in its docstring), and
the importance ratio. Old log-probs and advantages are constants: callers pass them detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from rl_loss.aggregation import TokenReducer
from rl_loss.config import LossConfig

LOG_RATIO_LIMIT = 20.0
"""Log-ratios are clamped to [-20, 20] before exp, so a ratio is always finite."""

SAPO_HALVING_LOGIT = 2.0 * math.asinh(1.0)
"""ln(3 + 2*sqrt(2)) ~ 1.763: where |tau * (r - 1)| reaches it, SAPO's gate has halved PPO's gradient."""

CpAllReduce = Callable[[Tensor], Tensor]
"""An autograd-aware sum over the CP group: returns the group's sum, and its backward all-reduces the gradient."""


def importance_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """Per-token ratio r = exp(clamp(logp - logp_old, -20, 20)) (no gradient where the clamp binds)."""
    return torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def ppo_clip_of_ratio(
    ratio: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate of a given ratio, with separate low/high ranges and an optional dual clip.

    l = max(-r*A, -clip(r, 1 - eps_low, 1 + eps_high)*A);  dual clip (eps_c > 1): for A < 0, l = min(l, -eps_c*A).
    ``r`` is a per-token ratio, or a sample's sequence ratio repeated over its tokens (GSPO).

    Returns:
        ``(loss, clipped)``: the per-token loss, and 1.0 where a clip binds (the clipped branch is strictly
        larger, or the dual clip caps the loss), else 0.0.
    """
    high = eps_clip if eps_clip_high is None else eps_clip_high
    unclipped = -ratio * advantages
    clipped_branch = -ratio.clamp(1.0 - eps_clip, 1.0 + high) * advantages
    loss = torch.maximum(unclipped, clipped_branch)
    clipped = clipped_branch > unclipped
    if eps_clip_c is not None:
        cap = -eps_clip_c * advantages
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        clipped = clipped | dual
    return loss, clipped.to(loss.dtype)


def clipped_pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ppo_clip with the per-token ratio (:func:`importance_ratio`, then :func:`ppo_clip_of_ratio`).

    clipfrac counts the tokens where a clip binds. Returns ``(loss, clipped, ratio)``.
    """
    ratio = importance_ratio(logprobs, old_logprobs)
    loss, clipped = ppo_clip_of_ratio(ratio, advantages, eps_clip, eps_clip_high, eps_clip_c)
    return loss, clipped, ratio


def cispo_pg_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, eps_clip_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """CISPO (MiniMax-M1, arXiv:2506.13585): l = -sg(min(r, 1 + eps_clip_high)) * A * logp.

    The truncated importance weight is a constant (stop-gradient), so every token keeps the REINFORCE
    gradient dl/dlogp = -min(r, 1 + eps_clip_high) * A, however far its ratio has moved; there is no
    lower bound. clipfrac counts the tokens whose truncation binds: r > 1 + eps_clip_high.

    Returns:
        ``(loss, clipped, ratio)``; the ratio is detached.
    """
    ratio = importance_ratio(logprobs.detach(), old_logprobs)
    cap = 1.0 + eps_clip_high
    weight = ratio.clamp(max=cap)
    loss = -(weight * advantages) * logprobs
    return loss, (ratio > cap).to(loss.dtype), ratio


def sapo_pg_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, tau_pos: float, tau_neg: float
) -> tuple[Tensor, Tensor, Tensor]:
    """SAPO (arXiv:2511.20347): l = -g(r) * A, g(r) = sigmoid(tau * (r - 1)) * 4 / tau, tau = tau_pos for
    A > 0 and tau_neg otherwise.

    Its gradient is dl/dlogp = -A * r * 4 * s * (1 - s) with s = sigmoid(tau * (r - 1)): PPO's unclipped
    gradient -A * r scaled by a soft gate 4 s (1 - s) in (0, 1], equal to 1 at r = 1. SAPO has no hard
    clip, so clipfrac counts the tokens whose gate has at least halved that gradient,
    4 s (1 - s) <= 1/2, i.e. |tau * (r - 1)| >= ln(3 + 2*sqrt(2)) ~ 1.763 (|r - 1| >= 1.763 / tau).

    Returns:
        ``(loss, clipped, ratio)``.
    """
    ratio = importance_ratio(logprobs, old_logprobs)
    tau = ratio.new_full(ratio.shape, tau_neg).masked_fill_(advantages > 0, tau_pos)
    logit = tau * (ratio - 1.0)
    loss = -(torch.sigmoid(logit) * 4.0 / tau) * advantages
    clipped = logit.detach().abs() >= SAPO_HALVING_LOGIT
    return loss, clipped.to(loss.dtype), ratio


def sequence_importance_ratio(
    logprobs: Tensor, old_logprobs: Tensor, pg_reducer: TokenReducer, cp_all_reduce: CpAllReduce | None = None
) -> Tensor:
    """GSPO's sequence ratio (arXiv:2507.18071), one value per local token (its sample's).

    s_i = exp(clamp(sum_t m[i,t] * (logp - logp_old) / max(|o_i|, 1), -20, 20)) over every loss-mask token
    of sample i, with m and |o_i| from the step's masks before rejection sampling. A CP rank holds only
    some of those tokens: it sums its own (:meth:`~rl_loss.TokenReducer.sample_partial_means`), and
    ``cp_all_reduce`` sums the per-sample partials over the CP group, keeping their gradient, once per
    micro-batch. s_i is differentiable; its gradient reaches every token of the sample on every rank.

    Args:
        logprobs, old_logprobs: this rank's local log-probs (old ones detached).
        pg_reducer: this rank's reducer of the micro-batch (it knows which sample each local token is of).
        cp_all_reduce: autograd-aware sum over the CP group, called once with a tensor of one partial per
            sample of the micro-batch; required when the reducer's ``cp_size > 1``, the identity otherwise.

    Raises:
        ValueError: when the reducer is one of several CP ranks and no ``cp_all_reduce`` is given.
    """
    if cp_all_reduce is None and pg_reducer.cp_size > 1:
        raise ValueError(
            f"cp_all_reduce is required for ratio_level=sequence under context parallelism (got None with "
            f"cp_size={pg_reducer.cp_size}): each sample's log-ratio sum spans CP ranks; pass an autograd-aware "
            "all-reduce over the CP group, e.g. lambda t: torch.distributed.nn.functional.all_reduce(t, group=cp_group)"
        )
    partial = pg_reducer.sample_partial_means(logprobs - old_logprobs)
    mean_log_ratio = partial if cp_all_reduce is None else cp_all_reduce(partial)
    per_sample = torch.exp(mean_log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    return per_sample.index_select(0, pg_reducer.local_sample_index.to(per_sample.device))


def per_token_pg_loss(
    config: LossConfig,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    pg_reducer: TokenReducer,
    cp_all_reduce: CpAllReduce | None = None,
) -> tuple[Tensor, Tensor]:
    """The configured surrogate's per-token loss and clip indicator (``config.surrogate``, ``config.ratio_level``).

    With ratio_level=sequence, clipfrac counts the tokens of the samples whose sequence ratio is clipped
    (so its sample_mean is the share of samples clipped).
    """
    if config.surrogate == "cispo":
        loss, clipped, _ = cispo_pg_loss(logprobs, old_logprobs, advantages, config.clip_high)
    elif config.surrogate == "sapo":
        loss, clipped, _ = sapo_pg_loss(logprobs, old_logprobs, advantages, config.tau_pos, config.tau_neg)
    elif config.ratio_level == "sequence":
        ratio = sequence_importance_ratio(logprobs, old_logprobs, pg_reducer, cp_all_reduce)
        loss, clipped = ppo_clip_of_ratio(ratio, advantages, config.clip_low, config.clip_high, config.eps_clip_c)
    else:
        loss, clipped, _ = clipped_pg_loss(
            logprobs, old_logprobs, advantages, config.clip_low, config.clip_high, config.eps_clip_c
        )
    return loss, clipped
