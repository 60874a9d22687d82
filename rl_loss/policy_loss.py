"""The policy loss of a micro-batch (surrogate, KL, entropy, TIS, RS) and its reduction (docs/objectives.md).

All per-token inputs are one rank's local values of one micro-batch, in the order its reducers expect
(per sample, its CP pieces concatenated). The surrogates themselves live in :mod:`rl_loss.surrogates`.
Only pg_loss goes through the configured aggregation; every other term and diagnostic goes through the
metric reducer (always sample_mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl_loss.aggregation import TokenReducer
from rl_loss.config import LossConfig
from rl_loss.surrogates import LOG_RATIO_LIMIT, CpAllReduce, clipped_pg_loss, per_token_pg_loss

__all__ = ["LOG_RATIO_LIMIT", "clipped_pg_loss", "kl_penalty", "policy_loss", "truncated_importance_weights"]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate to the reference policy, with d = logp - logp_ref.

    k1 = d;  k2 = d^2 / 2;  k3 = exp(-d) - 1 + d  (non-negative, unbiased for KL(pi || pi_ref)).
    """
    d = (logprobs - ref_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"kl_estimator must be one of k1, k2, k3 (got {estimator!r})")


def truncated_importance_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, low: float, high: float) -> Tensor:
    """TIS: clamp(exp(logp_old_train - logp_rollout), low, high), detached (a correction, not a path)."""
    log_ratio = (old_logprobs - rollout_logprobs).detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(log_ratio).clamp(low, high)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    pg_reducer: TokenReducer,
    metric_reducer: TokenReducer,
    config: LossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    tis_weights: Tensor | None = None,
    rs_mask: Tensor | None = None,
    cp_all_reduce: CpAllReduce | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This rank's partial of the step loss and of every metric, for one micro-batch.

    loss = pg_loss + kl_coef * kl_loss - entropy_coef * entropy, where pg_loss uses the configured
    aggregation and kl_loss / entropy use sample_mean. Each returned value is a partial: summed over
    the micro-batches, DP ranks and CP ranks of a step it is the step's figure.

    Args:
        logprobs: log-probabilities of the response tokens under the policy being trained.
        old_logprobs: the same under the policy that is being improved on (the rollout's, detached).
        advantages: per-token advantages (each sample's advantage repeated over its tokens).
        pg_reducer, metric_reducer: this rank's reducers for the micro-batch.
        config: the loss configuration (surrogate, ratio level, clip ranges, KL and entropy coefficients).
        ref_logprobs: reference policy log-probabilities; required when ``config.kl_coef > 0``.
        entropy: per-token entropy of the policy; required when ``config.entropy_coef > 0``.
        tis_weights: truncated importance weights multiplying the per-token pg loss.
        rs_mask: rejection-sampling mask (0 drops a token from the pg numerator; denominators keep it).
        cp_all_reduce: autograd-aware sum over this rank's CP group (its backward all-reduces the
            gradient too), e.g. ``lambda t: torch.distributed.nn.functional.all_reduce(t, group=cp_group)``;
            used once per call by ``ratio_level=sequence`` only, and required there when
            ``pg_reducer.cp_size > 1``.

    Returns:
        ``(loss, metrics)`` with metrics ``pg_loss``, ``pg_clipfrac`` (the share of tokens the surrogate
        counts as clipped, see :mod:`rl_loss.surrogates`), ``ppo_kl``, ``kl_loss``, ``entropy`` (detached
        except the differentiable loss).
    """
    n = pg_reducer.num_local_tokens
    for name, value in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
                        ("ref_logprobs", ref_logprobs), ("entropy", entropy), ("tis_weights", tis_weights),
                        ("rs_mask", rs_mask)):
        if value is not None and (value.dim() != 1 or value.numel() != n):
            raise ValueError(f"{name} must be 1-D with this rank's {n} local tokens (got shape {tuple(value.shape)})")
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when kl_coef > 0 (got kl_coef={config.kl_coef})")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy is required when entropy_coef > 0 (got entropy_coef={config.entropy_coef})")

    per_token, clipped = per_token_pg_loss(
        config, logprobs, old_logprobs.detach(), advantages.detach(), pg_reducer, cp_all_reduce
    )
    if tis_weights is not None:
        per_token = per_token * tis_weights.detach()
    if rs_mask is not None:
        per_token = per_token * rs_mask.detach().to(per_token.dtype)
    pg_loss = pg_reducer(per_token)
    loss = pg_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "pg_clipfrac": metric_reducer(clipped.detach()),
        "ppo_kl": metric_reducer((old_logprobs - logprobs).detach()),
    }
    if ref_logprobs is not None:
        kl_loss = metric_reducer(kl_penalty(logprobs, ref_logprobs.detach(), config.kl_estimator))
        metrics["kl_loss"] = kl_loss.detach()
        if config.kl_coef > 0:
            loss = loss + config.kl_coef * kl_loss
    if entropy is not None:
        entropy_mean = metric_reducer(entropy)
        metrics["entropy"] = entropy_mean.detach()
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * entropy_mean
    return loss, metrics
