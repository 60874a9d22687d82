"""The per-token surrogate objectives of the policy loss (docs/objectives.md, docs/objectives-2026.md): PPO
clip, CISPO, SAPO, DPPO-TV/KL, the sequence-level ratios of GSPO and GSPO-token, and (in
:mod:`rl_loss.surrogates_sequence`) GMPO and VESPO.

Each surrogate maps one rank's local per-token inputs to ``(loss, clipped, ratio)``: the per-token loss
``l`` that the reducers aggregate (every aggregation mode applies unchanged), a 0/1 float tensor of the
tokens that ``pg_clipfrac`` counts (what "clipped" means for each surrogate is in its docstring), and
the importance ratio. Old log-probs and advantages are constants: callers pass them detached.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rl_loss.aggregation import TokenReducer
from rl_loss.config import LossConfig
from rl_loss.inputs import describe, real_number, same_length_floats, same_shape_floats
from rl_loss.ratios import LOG_RATIO_LIMIT, CpAllReduce, importance_ratio, per_token, sample_means
from rl_loss.surrogates_sequence import gmpo_pg_loss, vespo_pg_loss

SAPO_HALVING_LOGIT = 2.0 * math.asinh(1.0)
"""ln(3 + 2*sqrt(2)) ~ 1.763: where |tau * (r - 1)| reaches it, SAPO's gate has halved PPO's gradient."""

BINARY_KL_EPS = 1e-8
"""Added to 1 - p and 1 - p_old in DPPO's binary KL, so a token of probability 1 gives a finite divergence."""


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
    same_shape_floats(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    real_number("eps_clip", eps_clip)
    real_number("eps_clip_high", eps_clip_high, optional=True)
    real_number("eps_clip_c", eps_clip_c, optional=True)
    ratio = importance_ratio(logprobs, old_logprobs)
    loss, clipped = ppo_clip_of_ratio(ratio, advantages, eps_clip, eps_clip_high, eps_clip_c)
    return loss, clipped, ratio


def cispo_pg_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, eps_clip_high: float, eps_clip_low: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """CISPO (MiniMax-M1, arXiv:2506.13585): l = -sg(min(r, 1 + eps_clip_high)) * A * logp.

    The truncated importance weight is a constant (stop-gradient), so every token keeps the REINFORCE
    gradient dl/dlogp = -min(r, 1 + eps_clip_high) * A, however far its ratio has moved; there is no
    lower bound unless ``eps_clip_low`` (``cispo_clip_low``, as slime and verl) gives one: the weight is then
    sg(clip(r, 1 - eps_clip_low, 1 + eps_clip_high)). clipfrac counts the tokens whose truncation binds:
    r > 1 + eps_clip_high (or r < 1 - eps_clip_low).

    Returns:
        ``(loss, clipped, ratio)``; the ratio is detached.
    """
    same_shape_floats(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    real_number("eps_clip_high", eps_clip_high)
    ratio = importance_ratio(logprobs.detach(), old_logprobs)
    cap = 1.0 + eps_clip_high
    floor = None if eps_clip_low is None else 1.0 - eps_clip_low
    weight = ratio.clamp(min=floor, max=cap)
    loss = -(weight * advantages) * logprobs
    clipped = ratio > cap if floor is None else (ratio > cap) | (ratio < floor)
    return loss, clipped.to(loss.dtype), ratio


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
    same_shape_floats(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    real_number("tau_pos", tau_pos)
    real_number("tau_neg", tau_neg)
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
    if not isinstance(pg_reducer, TokenReducer):
        raise TypeError(f"pg_reducer must be a TokenReducer (got {describe(pg_reducer)})")
    same_length_floats(pg_reducer.num_local_tokens, logprobs=logprobs, old_logprobs=old_logprobs)
    mean_log_ratio = sample_means(logprobs - old_logprobs, pg_reducer, cp_all_reduce, "ratio_level=sequence")
    return per_token(torch.exp(mean_log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)), pg_reducer)


def dppo_valid_mask(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, divergence: str, delta_low: float, delta_high: float
) -> Tensor:
    """DPPO's binary trust region (arXiv:2602.04879): 1.0 where a token may still move, 0.0 where it has left.

    With p = exp(logp), p_old = exp(logp_old) (the sampled token's probabilities):
    - ``tv``: valid iff p - p_old <= delta_high for A > 0, and p - p_old >= -delta_low otherwise;
    - ``kl``: D = p_old * ln(p_old / p) + (1 - p_old) * ln((1 - p_old + 1e-8) / (1 - p + 1e-8)), the binary
      KL(old || current) of the token; valid iff D <= delta_high or p <= p_old for A > 0, and
      D <= delta_low or p >= p_old otherwise.
    A token is masked only when its probability moved past delta in the direction the advantage pushes it.
    """
    logp, old = logprobs.detach(), old_logprobs.detach()
    p, p_old = torch.exp(logp), torch.exp(old)
    rising = advantages > 0
    if divergence == "tv":
        return torch.where(rising, p - p_old <= delta_high, p - p_old >= -delta_low).to(logp.dtype)
    binary_kl = p_old * (old - logp) + (1.0 - p_old) * torch.log(
        (1.0 - p_old + BINARY_KL_EPS) / (1.0 - p + BINARY_KL_EPS)
    )
    valid = torch.where(rising, (binary_kl <= delta_high) | (p <= p_old), (binary_kl <= delta_low) | (p >= p_old))
    return valid.to(logp.dtype)


def dppo_pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    divergence: str,
    delta_low: float,
    delta_high: float,
    ratio_cap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPPO-Binary-TV / -KL (arXiv:2602.04879): l = -A * sg(min(r, C)) * logp * valid.

    ``valid`` is :func:`dppo_valid_mask` (a constant); C = ``ratio_cap`` (None: no truncation, as prime-rl).
    Every valid token keeps the gradient dl/dlogp = -A * min(r, C); a masked token's loss and gradient are 0
    (the mask changes the numerator only: the aggregation's denominators still count the token).
    clipfrac counts the masked tokens.

    Returns:
        ``(loss, clipped, ratio)``; the ratio is detached.
    """
    ratio = importance_ratio(logprobs.detach(), old_logprobs)
    weight = ratio if ratio_cap is None else ratio.clamp(max=ratio_cap)
    valid = dppo_valid_mask(logprobs, old_logprobs, advantages, divergence, delta_low, delta_high)
    loss = -(advantages * weight * valid) * logprobs
    return loss, 1.0 - valid, ratio


def sequence_token_ratio(
    logprobs: Tensor, old_logprobs: Tensor, pg_reducer: TokenReducer, cp_all_reduce: CpAllReduce | None = None
) -> Tensor:
    """GSPO-token's ratio (arXiv:2507.18071, eq. 13): s_i,t = sg(s_i) * pi(y_t) / sg(pi(y_t)).

    Its value is the sample's sequence ratio s_i (as :func:`sequence_importance_ratio`, the mean over the
    sample's loss-mask tokens on every CP rank: one all-reduce, of detached partials), and its gradient is
    s_i * dlogp_t: token t's own, not the sample's mean. With sample-level advantages and sample_mean it
    equals ``ratio_level=sequence``; per-token advantages or another aggregation tell them apart.
    """
    mean_log_ratio = sample_means(
        (logprobs - old_logprobs).detach(), pg_reducer, cp_all_reduce, "ratio_level=sequence_token"
    )
    value = per_token(torch.exp(mean_log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)), pg_reducer)
    return value * torch.exp(logprobs - logprobs.detach())


def per_token_pg_loss(
    config: LossConfig,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    pg_reducer: TokenReducer,
    cp_all_reduce: CpAllReduce | None = None,
) -> tuple[Tensor, Tensor]:
    """The configured surrogate's per-token loss and clip indicator (``config.surrogate``, ``config.ratio_level``).

    With ratio_level=sequence or sequence_token, clipfrac counts the tokens of the samples whose sequence
    ratio is clipped (so its sample_mean is the share of samples clipped). ``cp_all_reduce`` is called once
    by the sequence-level choices (ratio_level sequence / sequence_token, gmpo, vespo), never by the others.
    """
    if config.surrogate == "gmpo":
        loss, clipped, _ = gmpo_pg_loss(
            logprobs, old_logprobs, advantages, config.clip_low, config.clip_high, pg_reducer, cp_all_reduce
        )
    elif config.surrogate == "vespo":
        loss, clipped, _ = vespo_pg_loss(logprobs, old_logprobs, advantages, config.vespo_shape, pg_reducer, cp_all_reduce)
    elif config.surrogate in ("dppo_tv", "dppo_kl"):
        loss, clipped, _ = dppo_pg_loss(
            logprobs, old_logprobs, advantages, config.surrogate[-2:], *config.dppo_thresholds, config.dppo_ratio_cap
        )
    elif config.ratio_level == "sequence_token":
        ratio = sequence_token_ratio(logprobs, old_logprobs, pg_reducer, cp_all_reduce)
        loss, clipped = ppo_clip_of_ratio(ratio, advantages, config.clip_low, config.clip_high, config.eps_clip_c)
    elif config.surrogate == "cispo":
        loss, clipped, _ = cispo_pg_loss(logprobs, old_logprobs, advantages, config.clip_high, config.cispo_clip_low)
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
