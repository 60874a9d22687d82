"""Rollout correction: truncated IS weights and rejection masks from the rollout engine's log-probs
(docs/corrections.md; the modes of verl's ``rollout_corr_helper``, arXiv:2510.18855).

The inference engine that sampled the responses scores them slightly differently from the trainer. With
``lr = logp_old_train - logp_rollout`` per token (detached: a correction changes the measure, not the
objective), this module turns ``loss.rollout_correction`` into a per-token weight and a per-token keep
mask that multiply the pg numerator only: the aggregation's denominators stay the pre-mask counts.
Sequence-level quantities are sums over a sample's loss-mask tokens on every CP rank: each rank sums its
own tokens and the caller-supplied ``cp_all_reduce`` adds the CP group's partials, once per quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rl_loss import ratios
from rl_loss.corrections_config import RolloutCorrection
from rl_loss.inputs import instance_of, same_length_floats
from rl_loss.ratios import LOG_RATIO_LIMIT, CpAllReduce
from rl_loss.reducer import TokenReducer


@dataclass
class RolloutTerms:
    """What the rollout correction does to one rank's local tokens of a micro-batch.

    Attributes:
        weights: truncated IS weights (detached), or None without ``is_level``.
        keep: 0/1 numerator mask of the rejection option, or None without ``rs``.
        metrics: partials of the diagnostics (sample_mean over the step; sum them like the loss).
    """

    weights: Tensor | None = None
    keep: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


def sample_sums(values: Tensor, pg_reducer: TokenReducer, cp_all_reduce: CpAllReduce | None, what: str) -> Tensor:
    """Each micro-batch sample's sum of ``values`` over its loss-mask tokens on every CP rank, spread over its
    local tokens: ``sum_t m[i,t] * v[i,t]`` (pre-RS masks) = its mean times max(|o_i|, 1); detached."""
    means = ratios.sample_means(values.detach(), pg_reducer, cp_all_reduce, what)
    counts = pg_reducer.sample_token_counts.to(device=means.device, dtype=means.dtype)
    return ratios.per_token(means * counts.clamp_min(1), pg_reducer)


def sample_means(values: Tensor, pg_reducer: TokenReducer, cp_all_reduce: CpAllReduce | None, what: str) -> Tensor:
    """Each micro-batch sample's mean of ``values`` over its loss-mask tokens on every CP rank (0 for a sample
    without one), spread over its local tokens; detached (:func:`rl_loss.ratios.sample_means`)."""
    return ratios.per_token(ratios.sample_means(values.detach(), pg_reducer, cp_all_reduce, what), pg_reducer)


def truncated_is_weights(
    config: RolloutCorrection, log_ratio: Tensor, pg_reducer: TokenReducer, cp_all_reduce: CpAllReduce | None
) -> tuple[Tensor, Tensor, Tensor]:
    """TIS weights of ``is_level`` and the log-ratio their metrics test.

    token:    w_t = min(exp(clamp(lr_t, -20, 20)), C)
    sequence: w_t = min(exp(clamp(S_i, -20, 20)), C) for every token of sample i, S_i = sum_t m[i,t] * lr[i,t]

    Returns:
        ``(weights, untruncated, log_ratio_tested)``: the truncated weights, the weights before truncation
        (for ``rollout_is_mean``) and the per-token (token) or per-sample (sequence) log-ratio.
    """
    if config.is_level == "sequence":
        tested = sample_sums(log_ratio, pg_reducer, cp_all_reduce, "rollout_correction.is_level=sequence")
    else:
        tested = log_ratio
    untruncated = torch.exp(tested.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    return untruncated.clamp(max=config.is_threshold), untruncated, tested


def rejection_statistic(
    config: RolloutCorrection, log_ratio: Tensor, pg_reducer: TokenReducer, cp_all_reduce: CpAllReduce | None
) -> Tensor:
    """The statistic the rejection option bounds, per local token (a sample's own for seq_* options).

    With lr clamped to [-20, 20]: k1 = -lr, k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr per token; token_* tests
    the token's, seq_sum_* the sum over the sample's loss-mask tokens, seq_mean_* their mean.
    """
    rs = config.rs
    safe = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if rs.endswith("k1"):
        per_token = -safe
    elif rs.endswith("k2"):
        per_token = 0.5 * safe * safe
    else:
        per_token = torch.expm1(safe) - safe
    if rs.startswith("seq_sum"):
        return sample_sums(per_token, pg_reducer, cp_all_reduce, f"rollout_correction.rs={rs}")
    if rs.startswith("seq_mean"):
        return sample_means(per_token, pg_reducer, cp_all_reduce, f"rollout_correction.rs={rs}")
    return per_token


def rejection_keep_mask(config: RolloutCorrection, statistic: Tensor) -> Tensor:
    """Keep (1) where the statistic lies within the option's bounds: ln(low) <= k1-stat <= ln(high) for *_k1
    options (ratio bounds on pi_rollout / pi_train, as verl), k2/k3-stat <= high otherwise."""
    high = config.rs_threshold_high
    if config.rs.endswith("k1"):
        keep = (statistic >= math.log(config.ratio_low)) & (statistic <= math.log(high))
    else:
        keep = statistic <= high
    return keep.to(statistic.dtype)


def rollout_correction_terms(
    config: RolloutCorrection,
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    pg_reducer: TokenReducer,
    metric_reducer: TokenReducer,
    cp_all_reduce: CpAllReduce | None = None,
) -> RolloutTerms:
    """The weights, keep mask and metrics of ``config`` for one rank's local tokens.

    Metrics (partials of sample_mean over the step): ``rollout_is_mean`` (weights before truncation),
    ``rollout_is_fraction_high`` / ``_low`` (share of tokens, or of samples for sequence weights, whose
    ratio is above C / below 1/C), ``rollout_rs_masked_fraction`` (share of tokens rejected).
    """
    instance_of("config", config, RolloutCorrection)
    instance_of("metric_reducer", metric_reducer, TokenReducer)
    n = instance_of("pg_reducer", pg_reducer, TokenReducer).num_local_tokens
    same_length_floats(n, old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    log_ratio = (old_logprobs - rollout_logprobs).detach()
    terms = RolloutTerms()
    if config.is_level is not None:
        weights, untruncated, tested = truncated_is_weights(config, log_ratio, pg_reducer, cp_all_reduce)
        log_c = math.log(config.is_threshold)
        terms.weights = weights
        terms.metrics["rollout_is_mean"] = metric_reducer(untruncated)
        terms.metrics["rollout_is_fraction_high"] = metric_reducer((tested > log_c).to(weights.dtype))
        terms.metrics["rollout_is_fraction_low"] = metric_reducer((tested < -log_c).to(weights.dtype))
    if config.rs is not None:
        keep = rejection_keep_mask(config, rejection_statistic(config, log_ratio, pg_reducer, cp_all_reduce))
        terms.keep = keep
        terms.metrics["rollout_rs_masked_fraction"] = metric_reducer(1.0 - keep)
    return terms
