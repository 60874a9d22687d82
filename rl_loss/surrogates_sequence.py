"""Surrogates whose per-token loss needs a per-sequence reduction: GMPO and VESPO (docs/objectives-2026.md).

Each reduces over the sample's loss-mask tokens on **every** CP rank: a rank computes its per-sample
partials and the caller's ``cp_all_reduce`` sums them over the CP group, once per micro-batch
(:func:`rl_loss.ratios.sample_means`). The per-token loss they return is then aggregated like any other
(every aggregation mode applies unchanged). Old log-probs and advantages are constants: callers pass
them detached.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rl_loss.aggregation import TokenReducer
from rl_loss.ratios import LOG_RATIO_LIMIT, CpAllReduce, per_token, sample_means

VESPO_LOG_W_MIN = math.log(1e-8)
"""VESPO's sequence log-ratio is clamped to [ln 1e-8, 20] (the paper's implementation, as TRL and liger-kernel)."""

VESPO_HALVED_WEIGHT = 0.5
"""VESPO has no hard clip: clipfrac counts the tokens whose weight phi(w) is at most half its on-policy value 1."""


def gmpo_pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    pg_reducer: TokenReducer,
    cp_all_reduce: CpAllReduce | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GMPO (arXiv:2507.20673): l = -g_i * A, g_i the clipped geometric mean of sample i's token ratios.

    With d_t = logp - logp_old and c_t = clamp(d_t, -eps_low, eps_high) (clipping in log space):
    d'_t = min(d_t, c_t) for A > 0 and max(d_t, c_t) otherwise (the pessimistic side, as PPO's min), and
    g_i = exp(clamp(sum_t m * d'_t / max(|o_i|, 1), -20, 20)) over the sample's loss-mask tokens on every
    CP rank (one all-reduce, differentiable). This is (prod_t clip(r_t^sgnA))^(sgnA / |o_i|) of the paper;
    with sample_mean, J = -(1/N) sum_i g_i * A_i. clipfrac counts the tokens whose clip binds: d_t > eps_high
    with A > 0, or d_t < -eps_low with A <= 0 (a token with A = 0 has loss 0 either way).

    Returns:
        ``(loss, clipped, ratio)``: the ratio is g_i on each of sample i's local tokens.
    """
    log_ratio = logprobs - old_logprobs
    # min(d, clamp(d, -eps_low, eps_high)) = min(d, eps_high) and max(d, clamp(...)) = max(d, -eps_low):
    # one clamp with per-token bounds (one pass forward and backward)
    positive = advantages > 0
    bound = log_ratio.detach().new_tensor  # 0-dim bounds in the log-ratios' dtype (a float32 0.15 is not 0.15)
    upper = torch.where(positive, bound(eps_high), bound(math.inf))
    lower = torch.where(positive, bound(-math.inf), bound(-eps_low))
    pessimistic = torch.clamp(log_ratio, lower, upper)
    mean = sample_means(pessimistic, pg_reducer, cp_all_reduce, "surrogate=gmpo")
    ratio = per_token(torch.exp(mean.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)), pg_reducer)
    loss = -ratio * advantages
    clipped = pessimistic.detach() != log_ratio.detach()  # d > eps_high with A > 0, d < -eps_low with A <= 0
    return loss, clipped.to(loss.dtype), ratio


def vespo_pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    shape: tuple[float, float, float, float],
    pg_reducer: TokenReducer,
    cp_all_reduce: CpAllReduce | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """VESPO (arXiv:2602.10693): l = -sg(phi(w_i)) * A * logp, phi(w) = e^lambda * w^k * e^(-lambda * w).

    w_i is sample i's sequence ratio pi(o_i) / pi_old(o_i): ln w_i = clamp(sum_t m * clamp(logp - logp_old,
    -20, 20), ln 1e-8, 20), a SUM over the sample's loss-mask tokens on every CP rank (one all-reduce, of
    detached partials: phi is a constant). (k, lambda) = ``shape``'s (k_pos, lambda_pos) for A >= 0 and
    (k_neg, lambda_neg) for A < 0; phi(1) = 1, so on-policy VESPO is REINFORCE. Every token keeps the
    gradient dl/dlogp = -phi(w_i) * A. clipfrac counts the tokens with phi(w_i) <= 1/2.

    Returns:
        ``(loss, clipped, ratio)``: the ratio is w_i on each of sample i's local tokens (detached).
    """
    k_pos, lambda_pos, k_neg, lambda_neg = shape
    log_ratio = (logprobs.detach() - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    mean = sample_means(log_ratio, pg_reducer, cp_all_reduce, "surrogate=vespo")
    counts = pg_reducer.sample_token_counts.to(device=mean.device, dtype=mean.dtype).clamp_min(1)
    log_w = per_token((mean * counts).clamp(VESPO_LOG_W_MIN, LOG_RATIO_LIMIT), pg_reducer)
    non_negative = advantages >= 0
    k = torch.where(non_negative, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(non_negative, lambda_pos, lambda_neg).to(log_w.dtype)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    loss = -(phi * advantages) * logprobs
    return loss, (phi <= VESPO_HALVED_WEIGHT).to(loss.dtype), torch.exp(log_w)
