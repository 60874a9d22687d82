"""Peer parity of the corrections (docs/corrections.md): value and gradient against the peers' code.

- TRL 1.16 (installed): ``GRPOTrainer.get_off_policy_mask`` (OPSM) runs as shipped; the rest of TRL's
  ``GRPOTrainer._compute_loss`` (PPO clip, KL term added per token, loss_type aggregation) needs a whole
  trainer, so it is restated below from trl 1.16.0, ``trl/trainer/grpo_trainer.py``.
- liger-kernel 0.8.5 (installed): ``LigerFusedLinearGRPOLoss`` with a reference model (KL aggregated with the
  loss_type), float32 inside, so its rows compare at 1e-5.
- verl (not installable in the test venv): the functions are restated from volcengine/verl commit
  b178a3cd56f58b2d502255daba591e92833930a7, ``verl/trainer/ppo/core_algos.py`` (compute_policy_loss_clip_cov,
  compute_policy_loss_kl_cov, kl_penalty_forward, compute_policy_loss_cispo) and
  ``verl/trainer/ppo/rollout_corr_helper.py`` (compute_rollout_correction_weights,
  compute_rollout_rejection_mask), reduced to the per-token quantities these tests compare.

Every batch is one step of B padded samples (one micro-batch, one rank: the peers' setting), float64, with
advantages of both signs, clipped tokens, a partly masked and a fully masked sample.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
from trl import GRPOTrainer

from rl_loss import LossConfig, ReducerFactory, RelabelNotice, StepBatch, covariance_selection, policy_loss
from tests.test_surrogate_liger_parity import batch as liger_batch
from tests.test_surrogate_liger_parity import logprobs_of

B, W = 5, 7
MASK_LENGTHS = (7, 4, 6, 0, 2)  # sample 3 is fully masked
TOLERANCE = 1e-6
LIGER_TOLERANCE = 1e-5  # liger computes in float32
MAX_ERROR: dict[str, float] = {}


def config_of(**fields) -> LossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        return LossConfig(**fields)


def padded(seed: int, spread: float = 0.6):
    """(logp leaf, old, rollout, ref, advantages (B,), mask (B, W)), float64; ratios spread past the clip."""
    gen = torch.Generator().manual_seed(seed)
    logp = -0.2 - 2.5 * torch.rand(B, W, generator=gen, dtype=torch.float64)
    old = logp + spread * (2 * torch.rand(B, W, generator=gen, dtype=torch.float64) - 1)
    rollout = old + spread * (2 * torch.rand(B, W, generator=gen, dtype=torch.float64) - 1)
    ref = logp + 2 * torch.rand(B, W, generator=gen, dtype=torch.float64) - 1
    advantages = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = (torch.arange(W) < torch.tensor(MASK_LENGTHS)[:, None]).double()
    return logp.requires_grad_(True), old, rollout, ref, advantages, mask


def ours(config: LossConfig, logp, old, advantages, mask, **kwargs):
    """rl-loss on the padded batch taken as one step: (loss, metrics)."""
    step = StepBatch(response_lengths=[W] * B, total_lengths=[W + 1] * B, loss_masks=mask.reshape(-1))
    factory = ReducerFactory(config)
    flat = {k: (v.reshape(-1) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return policy_loss(logp.reshape(-1), old.reshape(-1), advantages.repeat_interleave(W), factory.pg_reducer(step),
                       factory.metric_reducer(step), config, **flat)


def compare(label: str, loss, want, leaf, tolerance: float = TOLERANCE) -> None:
    """Value (relative to the larger of |want| and 1) and gradient (relative to its largest entry) within tolerance."""
    (grad,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want, leaf, retain_graph=True)
    value_error = float((loss - want).detach().abs()) / max(float(want.detach().abs()), 1.0)
    grad_error = float((grad - want_grad).abs().max() / want_grad.abs().max().clamp_min(1e-30))
    MAX_ERROR[f"{label}:value"] = max(MAX_ERROR.get(f"{label}:value", 0.0), value_error)
    MAX_ERROR[f"{label}:gradient"] = max(MAX_ERROR.get(f"{label}:gradient", 0.0), grad_error)
    assert value_error <= tolerance, (label, float(loss), float(want))
    assert grad_error <= tolerance, (label, grad_error)


def trl_ppo_per_token(logp, old, advantages, eps_low=0.2, eps_high=0.2):
    """Restated: trl 1.16.0 GRPOTrainer._compute_loss, token level, loss_type grpo/dapo: -min(r*A, clip(r)*A)."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    return -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])


def trl_aggregate(per_token_loss, mask, loss_type):
    """Restated: trl 1.16.0 GRPOTrainer._compute_loss: grpo's mean of sample means; dapo's token mean (one process,
    no accumulation: num_items_in_batch is the batch's token count)."""
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


# --- TRL: OPSM (installed) and the KL term's aggregation -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_opsm_matches_trl_get_off_policy_mask_value_and_gradient(seed):
    logp, old, rollout, _, advantages, mask = padded(seed)
    delta = 0.05
    keep = GRPOTrainer.get_off_policy_mask(advantages[:, None], logp, rollout, mask, delta)  # TRL as installed, (B, 1)
    assert 0 < int(keep.sum()) < B  # the seed drops some samples and keeps others
    want = trl_aggregate(trl_ppo_per_token(logp, old, advantages) * keep, mask, "grpo")
    loss, _ = ours(config_of(off_policy_mask_delta=delta), logp, old, advantages, mask, rollout_logprobs=rollout)
    compare("trl_opsm", loss, want, logp)


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "sample_mean"), ("dapo", "token_mean")])
def test_kl_aggregation_pg_matches_trl_kl_in_the_loss_type(loss_type, aggregation):
    logp, old, _, ref, advantages, mask = padded(7)
    beta = 0.04
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1  # trl 1.16.0 _compute_loss, restated
    want = trl_aggregate(trl_ppo_per_token(logp, old, advantages) + beta * per_token_kl, mask, loss_type)
    config = config_of(aggregation=aggregation, kl_coef=beta, kl_aggregation="pg")
    loss, _ = ours(config, logp, old, advantages, mask, ref_logprobs=ref)
    compare(f"trl_kl_{loss_type}", loss, want, logp)


# --- liger-kernel: the KL term (installed) ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type, aggregation", [("grpo", "sample_mean"), ("dapo", "token_mean")])
def test_kl_aggregation_pg_matches_liger_with_a_reference_model(loss_type, aggregation):
    hidden, weight, ids, mask, advantages, old = liger_batch(3)
    beta = 0.1
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        ref = (logprobs_of(hidden.double(), weight.double(), ids) + torch.rand(ids.shape, generator=gen) - 0.5).float()
    module = LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=True, loss_type=loss_type)
    hidden32 = hidden.clone().requires_grad_(True)
    theirs, _ = module(hidden32, weight, ids, mask, advantages, ref_per_token_logps=ref, old_per_token_logps=old)
    (their_grad,) = torch.autograd.grad(theirs, hidden32)

    hidden64 = hidden.double().requires_grad_(True)
    rows, width = ids.shape
    step = StepBatch(response_lengths=[width] * rows, total_lengths=[width + 1] * rows, loss_masks=mask.double().reshape(-1))
    config = config_of(aggregation=aggregation, kl_coef=beta, kl_aggregation="pg")
    factory = ReducerFactory(config)
    loss, _ = policy_loss(logprobs_of(hidden64, weight.double(), ids).reshape(-1), old.double().reshape(-1),
                          advantages.double().repeat_interleave(width), factory.pg_reducer(step),
                          factory.metric_reducer(step), config, ref_logprobs=ref.double().reshape(-1))
    (grad,) = torch.autograd.grad(loss, hidden64)
    value_error = float((loss.detach() - theirs.detach().double()).abs() / loss.detach().abs())
    grad_error = float((grad - their_grad.double()).abs().max() / grad.abs().max())
    MAX_ERROR[f"liger_kl_{loss_type}:value"] = value_error
    MAX_ERROR[f"liger_kl_{loss_type}:gradient"] = grad_error
    assert value_error <= LIGER_TOLERANCE and grad_error <= LIGER_TOLERANCE, (value_error, grad_error)


# --- verl (restated): rollout correction ---------------------------------------------------------------------------


def verl_is_weights(log_ratio, mask, level, threshold):
    """Restated: verl compute_rollout_correction_weights (no batch normalisation): truncated, detached, masked."""
    if level == "token":
        weights = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
    else:
        log_sum = (torch.where(mask.bool(), log_ratio, 0.0) * mask).sum(-1, keepdim=True)
        weights = torch.exp(torch.clamp(log_sum, -20.0, 20.0)).expand_as(log_ratio)
    return (weights * mask).clamp(max=threshold).detach()


def verl_rejection_mask(log_ratio, mask, option, low, high):
    """Restated: verl compute_rollout_rejection_mask for one option (its combined mask; masked_mean has +1e-8)."""
    safe = torch.clamp(log_ratio, -20.0, 20.0)
    stat = {"k1": -safe, "k2": 0.5 * safe**2, "k3": torch.exp(safe) - 1.0 - safe}[option[-2:]]
    masked_sum = (torch.where(mask.bool(), stat, 0.0) * mask).sum(-1, keepdim=True)
    if option.startswith("seq_sum"):
        stat = masked_sum.expand_as(mask)
    elif option.startswith("seq_mean"):
        stat = (masked_sum / (mask.sum(-1, keepdim=True) + 1e-8)).expand_as(mask)
    if option.endswith("k1"):
        return ((stat >= math.log(low)) & (stat <= math.log(high))).double()
    return (stat <= high).double()


ROLLOUT_CASES = {
    # name: (rollout_correction fields, (low, high) of the verl threshold spec)
    "token_tis": (dict(is_level="token", is_threshold=1.3), None),
    "sequence_tis": (dict(is_level="sequence", is_threshold=1.5), None),
    "token_k1": (dict(rs="token_k1", rs_threshold_low=0.7, rs_threshold_high=1.4), (0.7, 1.4)),
    "seq_sum_k1": (dict(rs="seq_sum_k1", rs_threshold_high=2.0), (0.5, 2.0)),
    "seq_mean_k1": (dict(rs="seq_mean_k1", rs_threshold_high=1.1), (1 / 1.1, 1.1)),
    "token_k3": (dict(rs="token_k3", rs_threshold_high=0.02), (None, 0.02)),
    "seq_mean_k2": (dict(rs="seq_mean_k2", rs_threshold_high=0.05), (None, 0.05)),
    "tis_and_seq_sum_k3": (dict(is_level="token", is_threshold=1.2, rs="seq_sum_k3", rs_threshold_high=0.3),
                           (None, 0.3)),
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", list(ROLLOUT_CASES))
def test_rollout_correction_matches_verl_rollout_corr_helper(case, seed):
    fields, bounds = ROLLOUT_CASES[case]
    logp, old, rollout, _, advantages, mask = padded(seed)
    log_ratio = old - rollout
    factor = torch.ones_like(mask)
    if "is_level" in fields:
        factor = factor * verl_is_weights(log_ratio, mask, fields["is_level"], fields["is_threshold"])
    if "rs" in fields:
        keep = verl_rejection_mask(log_ratio, mask, fields["rs"], *bounds)
        assert 0 < float((keep * mask).sum()) < float(mask.sum())  # some tokens rejected, some kept
        factor = factor * keep
    # verl's corrected per-token loss (vanilla PPO pg_losses * rollout_is_weights on the modified mask), over the
    # batch's tokens counted before rejection (rl-loss's rule: masks change numerators only)
    want = (trl_ppo_per_token(logp, old, advantages) * factor * mask).sum() / mask.sum()
    loss, _ = ours(config_of(aggregation="token_mean", rollout_correction=fields), logp, old, advantages, mask,
                   rollout_logprobs=rollout)
    compare(f"verl_rollout_{case}", loss, want, logp)


def test_rollout_correction_metrics_match_verl_on_equal_length_samples():
    # verl's token metrics are token means over the batch; rl-loss's are sample means (comparable across modes):
    # with every sample's tokens all active they coincide
    logp, old, rollout, _, advantages, _ = padded(5)
    mask = torch.ones(B, W, dtype=torch.float64)
    log_ratio = old - rollout
    fields = dict(is_level="token", is_threshold=1.3, rs="token_k1", rs_threshold_high=1.3)
    _, metrics = ours(config_of(rollout_correction=fields), logp, old, advantages, mask, rollout_logprobs=rollout)
    untruncated = torch.exp(log_ratio.clamp(-20, 20))  # verl: rollout_is_mean is taken before truncation
    assert float(metrics["rollout_is_mean"]) == pytest.approx(float(untruncated.mean()), rel=1e-12)
    assert float(metrics["rollout_is_fraction_high"]) == pytest.approx(float((untruncated > 1.3).double().mean()), rel=1e-12)
    keep = verl_rejection_mask(log_ratio, mask, "token_k1", 1 / 1.3, 1.3)
    assert float(metrics["rollout_rs_masked_fraction"]) == pytest.approx(float((1 - keep).mean()), rel=1e-12)


# --- verl (restated): clip-cov, KL-cov, k3 clamp, CISPO ----------------------------------------------------------------


def verl_covariance(logp, advantages, mask):
    """Restated: the covariance of verl's clip_cov / kl_cov over the batch's masked tokens (masked_mean: +1e-8)."""
    adv = advantages[:, None].expand_as(logp)
    mean_adv = (adv * mask).sum() / (mask.sum() + 1e-8)
    mean_logp = (logp.detach() * mask).sum() / (mask.sum() + 1e-8)
    return (adv - mean_adv) * (logp.detach() - mean_logp)


def verl_clip_cov_loss(logp, old, advantages, mask, ratio, lb, ub, eps=0.2):
    """Restated: verl compute_policy_loss_clip_cov; with ratio * T >= the candidates, every candidate is taken."""
    coef = torch.exp(logp - old)
    adv = advantages[:, None]
    pg1, pg2 = -adv * coef, -adv * torch.clamp(coef, 1 - eps, 1 + eps)
    cov = verl_covariance(logp, advantages, mask)
    cov[mask == 0] = -torch.inf
    cov[(pg2 > pg1) & (mask > 0)] = -torch.inf
    candidates = (cov < ub) & (cov > lb) & (mask > 0)
    assert int(candidates.sum()) <= max(int(ratio * mask.sum()), 1)  # no random draw: the parity is exact
    corr = torch.where(candidates, 0.0, 1.0).double()
    return (torch.maximum(pg1, pg2) * corr * mask).sum() / mask.sum(), candidates


def verl_kl_cov_loss(logp, old, advantages, mask, ratio, coef):
    """Restated: verl compute_policy_loss_kl_cov: top-k covariance tokens get + coef * |logp - old|, no clip."""
    log_ratio = logp - old
    adv = advantages[:, None]
    losses = -adv * torch.exp(log_ratio)
    losses_kl = losses + coef * log_ratio.abs()
    valid = torch.nonzero(mask.reshape(-1) > 0).squeeze(1)
    cov = verl_covariance(logp, advantages, mask).reshape(-1)[valid]
    top = valid[torch.topk(cov, max(1, int(valid.numel() * ratio)), largest=True).indices]
    chosen = torch.zeros(B * W, dtype=torch.bool)
    chosen[top] = True
    per_token = torch.where(chosen.reshape(B, W), losses_kl, losses)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("seed", range(3))
def test_clip_cov_matches_verl_value_and_gradient(seed):
    logp, old, _, _, advantages, mask = padded(seed, spread=0.15)
    lb, ub, ratio = 0.3, 5.0, 0.5
    want, candidates = verl_clip_cov_loss(logp, old, advantages, mask, ratio, lb, ub)
    assert int(candidates.sum()) > 0
    config = config_of(aggregation="token_mean", cov_penalty="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb,
                       clip_cov_ub=ub)
    step = StepBatch(response_lengths=[W] * B, total_lengths=[W + 1] * B, loss_masks=mask.reshape(-1))
    selection = covariance_selection(config, step, logp.detach().reshape(-1), old.reshape(-1),
                                     advantages.repeat_interleave(W))
    assert torch.equal(selection.bool(), candidates.reshape(-1))
    loss, _ = ours(config, logp, old, advantages, mask, cov_selection=selection)
    compare("verl_clip_cov", loss, want, logp)


@pytest.mark.parametrize("seed", range(3))
def test_kl_cov_matches_verl_value_and_gradient(seed):
    logp, old, _, _, advantages, mask = padded(seed)
    ratio, coef = 0.2, 1.5
    want = verl_kl_cov_loss(logp, old, advantages, mask, ratio, coef)
    config = config_of(aggregation="token_mean", cov_penalty="kl_cov", kl_cov_ratio=ratio, kl_cov_coef=coef)
    step = StepBatch(response_lengths=[W] * B, total_lengths=[W + 1] * B, loss_masks=mask.reshape(-1))
    selection = covariance_selection(config, step, logp.detach().reshape(-1), old.reshape(-1),
                                     advantages.repeat_interleave(W))
    assert int(selection.sum()) == int(mask.sum() * ratio)
    loss, _ = ours(config, logp, old, advantages, mask, cov_selection=selection)
    compare("verl_kl_cov", loss, want, logp)


def test_k3_clamp_matches_verl_low_var_kl():
    logp, old, _, _, advantages, mask = padded(2)
    ref = logp.detach() + torch.linspace(-16, 16, B * W, dtype=torch.float64).reshape(B, W)  # k3 up to ~9e6
    kl = torch.clamp(ref - logp, -20, 20)  # verl kl_penalty_forward("low_var_kl"), restated
    verl_k3 = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    assert float(verl_k3.detach().max()) == 10.0  # the clamp binds
    want = trl_aggregate(trl_ppo_per_token(logp, old, advantages) + 0.5 * verl_k3, mask, "dapo")
    config = config_of(aggregation="token_mean", kl_coef=0.5, kl_clamp=10.0, kl_aggregation="pg")
    loss, _ = ours(config, logp, old, advantages, mask, ref_logprobs=ref)
    compare("verl_k3_clamp", loss, want, logp)


@pytest.mark.parametrize("seed", range(3))
def test_cispo_lower_bound_matches_verl_cispo(seed):
    logp, old, _, _, advantages, mask = padded(seed)
    low, high = 0.2, 0.28
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))  # verl compute_policy_loss_cispo, restated
    clipped = torch.clamp(ratio, 1 - low, 1 + high).detach()
    assert bool((ratio < 1 - low).any()) and bool((ratio > 1 + high).any())
    want = (-clipped * advantages[:, None] * logp * mask).sum() / mask.sum()
    config = config_of(aggregation="token_mean", surrogate="cispo", eps_clip_high=high, cispo_clip_low=low)
    loss, _ = ours(config, logp, old, advantages, mask)
    compare("verl_cispo_low", loss, want, logp)


def test_corrections_parity_summary_reports_largest_errors(capsys):
    """Prints the largest errors of this file's parity rows (run with -s)."""
    if not MAX_ERROR:
        pytest.skip("the parity tests of this module did not run in this session")
    with capsys.disabled():
        print("\ncorrections parity, largest errors:")
        for key, value in sorted(MAX_ERROR.items()):
            print(f"  {key}: {value:.2e}")
