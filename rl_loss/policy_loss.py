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
from rl_loss.covariance import apply_cov_penalty
from rl_loss.inputs import describe, float_tensor, instance_of, same_length_floats, same_shape_floats
from rl_loss.rollout_correction import rollout_correction_terms
from rl_loss.sample_masks import off_policy_sequence_mask
from rl_loss.surrogates import LOG_RATIO_LIMIT, CpAllReduce, clipped_pg_loss, per_token_pg_loss

__all__ = ["LOG_RATIO_LIMIT", "clipped_pg_loss", "kl_penalty", "policy_loss", "truncated_importance_weights"]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, clamp: float | None = None) -> Tensor:
    """Per-token KL estimate to the reference policy, with d = logp - logp_ref (clamped to [-20, 20]).

    k1 = d;  k2 = d^2 / 2;  k3 = exp(-d) - 1 + d  (non-negative, unbiased for KL(pi || pi_ref)).
    ``clamp`` (``loss.kl_clamp``, verl's 10) clamps k3 to [-clamp, clamp]; k1 and k2 are never clamped (as verl).
    """
    same_shape_floats(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = (logprobs - ref_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        k3 = torch.expm1(-d) + d
        return k3 if clamp is None else k3.clamp(-clamp, clamp)
    raise ValueError(f"kl_estimator must be one of k1, k2, k3 (got {estimator!r})")


def truncated_importance_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, low: float, high: float) -> Tensor:
    """TIS: clamp(exp(logp_old_train - logp_rollout), low, high), detached (a correction, not a path)."""
    same_shape_floats(old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    for name, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound != bound:
            raise ValueError(f"{name} must be a number (got {describe(bound)})")
    if not 0 <= low <= high:
        raise ValueError(f"TIS bounds must satisfy 0 <= low <= high (got low={low}, high={high})")
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
    rollout_logprobs: Tensor | None = None,
    cov_selection: Tensor | None = None,
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
            used once per call by every per-sample statistic (``ratio_level`` sequence / sequence_token,
            ``surrogate`` gmpo / vespo, ``off_policy_mask_delta``, sequence-level ``rollout_correction``), and
            required by them when ``pg_reducer.cp_size > 1``.
        rollout_logprobs: the rollout engine's log-probs of the tokens; required by ``rollout_correction``,
            and OPSM's behaviour policy when given (docs/corrections.md).
        cov_selection: this rank's slice of the step's :func:`rl_loss.covariance_selection`
            (``selection[pg_reducer.token_index]``); required when ``cov_penalty`` is not none.

    Returns:
        ``(loss, metrics)`` with metrics ``pg_loss``, ``pg_clipfrac`` (the share of tokens the surrogate
        counts as clipped, see :mod:`rl_loss.surrogates`), ``ppo_kl``, ``kl_loss``, ``entropy``, and those
        of the corrections in use (``opsm_masked_fraction``, ``cov_selected_fraction``, ``rollout_*``; all
        sample_mean partials, detached).
    """
    for name, value, kind in (("pg_reducer", pg_reducer, TokenReducer), ("metric_reducer", metric_reducer, TokenReducer),
                              ("config", config, LossConfig)):
        instance_of(name, value, kind)
    n = pg_reducer.num_local_tokens
    same_length_floats(n, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                       ref_logprobs=ref_logprobs, entropy=entropy, tis_weights=tis_weights,
                       rollout_logprobs=rollout_logprobs)
    if rs_mask is not None:
        float_tensor("rs_mask", rs_mask, allow_integers=True)
        if rs_mask.dim() != 1 or rs_mask.numel() != n:
            raise ValueError(f"rs_mask must be 1-D with this rank's {n} local tokens (got shape {tuple(rs_mask.shape)})")
    if cov_selection is not None and (not isinstance(cov_selection, Tensor) or cov_selection.dim() != 1 or cov_selection.numel() != n):
        raise ValueError(f"cov_selection must be a 1-D tensor with this rank's {n} local tokens (got {describe(cov_selection)}); "
                         "pass this rank's slice of covariance_selection(...)")
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when kl_coef > 0 (got kl_coef={config.kl_coef})")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy is required when entropy_coef > 0 (got entropy_coef={config.entropy_coef})")

    _check_correction_inputs(config, rollout_logprobs, cov_selection)

    per_token, clipped = per_token_pg_loss(
        config, logprobs, old_logprobs.detach(), advantages.detach(), pg_reducer, cp_all_reduce
    )
    correction_metrics: dict[str, Tensor] = {}
    if cov_selection is not None:
        per_token = apply_cov_penalty(config, per_token, logprobs, old_logprobs.detach(), advantages.detach(),
                                      cov_selection)
        if config.cov_penalty == "kl_cov":  # PPO's unclipped surrogate: nothing is clipped
            clipped = torch.zeros_like(clipped)
        correction_metrics["cov_selected_fraction"] = metric_reducer(cov_selection.detach().to(per_token.dtype))
    if tis_weights is not None:
        per_token = per_token * tis_weights.detach()
    if rs_mask is not None:
        per_token = per_token * rs_mask.detach().to(per_token.dtype)
    if config.rollout_correction.enabled:
        terms = rollout_correction_terms(config.rollout_correction, old_logprobs, rollout_logprobs, pg_reducer,
                                         metric_reducer, cp_all_reduce)
        for factor in (terms.weights, terms.keep):
            if factor is not None:
                per_token = per_token * factor.to(per_token.dtype)
        correction_metrics.update(terms.metrics)
    if config.off_policy_mask_delta is not None:
        behaviour = old_logprobs if rollout_logprobs is None else rollout_logprobs
        keep = off_policy_sequence_mask(logprobs, behaviour, advantages, config.off_policy_mask_delta, pg_reducer,
                                        cp_all_reduce)
        per_token = per_token * keep
        correction_metrics["opsm_masked_fraction"] = metric_reducer(1.0 - keep)
    pg_loss = pg_reducer(per_token)
    loss = pg_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "pg_clipfrac": metric_reducer(clipped.detach()),
        "ppo_kl": metric_reducer((old_logprobs - logprobs).detach()),
    }
    metrics.update({name: value.detach() for name, value in correction_metrics.items()})
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs.detach(), config.kl_estimator, config.kl_clamp)
        kl_loss = metric_reducer(kl)
        metrics["kl_loss"] = kl_loss.detach()
        if config.kl_coef > 0:
            # kl_aggregation=pg: the KL term takes pg_loss's aggregation, unmasked (as verl, TRL and Liger)
            kl_term = kl_loss if config.kl_aggregation == "sample_mean" else pg_reducer(kl)
            loss = loss + config.kl_coef * kl_term
    if entropy is not None:
        entropy_mean = metric_reducer(entropy)
        metrics["entropy"] = entropy_mean.detach()
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * entropy_mean
    return loss, metrics


def _check_correction_inputs(config: LossConfig, rollout_logprobs: Tensor | None, cov_selection: Tensor | None) -> None:
    """Refuse a correction without its input, and an input that no configured correction would use."""
    if config.rollout_correction.enabled and rollout_logprobs is None:
        raise ValueError(
            "rollout_logprobs is required when loss.rollout_correction sets is_level or rs (got None); pass the "
            "rollout engine's log-probs of the response tokens"
        )
    if rollout_logprobs is not None and not config.rollout_correction.enabled and config.off_policy_mask_delta is None:
        raise ValueError(
            "rollout_logprobs: no configured correction uses them, so they would be ignored; set "
            "loss.rollout_correction or off_policy_mask_delta, or do not pass them"
        )
    if config.cov_penalty != "none" and cov_selection is None:
        raise ValueError(
            f"cov_selection is required with cov_penalty={config.cov_penalty} (got None): the covariance is a "
            "step-level statistic; compute rl_loss.covariance_selection(...) once per step and pass "
            "selection[pg_reducer.token_index]"
        )
    if config.cov_penalty == "none" and cov_selection is not None:
        raise ValueError(
            "cov_selection: would be ignored with cov_penalty=none; set cov_penalty=clip_cov or kl_cov, or do not pass it"
        )
