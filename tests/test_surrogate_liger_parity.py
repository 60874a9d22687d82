"""Parity of the surrogates with an external implementation: liger-kernel's LigerFusedLinearGRPOLoss.

liger-kernel 0.8.5 (installed with the dev extra) runs on CPU with ``compiled=False``. It computes
log-probs from hidden states and an LM-head weight in float32; the reference here computes the same
log-probs in float64 from the same (float32-rounded) tensors, runs :func:`rl_loss.policy_loss`, and
compares the loss and the gradients of the hidden states and the weight.

Parameter mapping (docs/objectives.md vs liger, see INTEGRATIONS.md):
- cispo: our IS-weight cap is ``1 + eps_clip_high``; liger's is ``epsilon_high`` itself (absolute).
  liger's loss_type="cispo" divides the masked token sum by the batch's token count: ``token_mean``.
- sapo: ``sapo_tau_pos`` / ``sapo_tau_neg`` are liger's ``sapo_temperature_pos`` / ``_neg``; liger's
  loss_type="sapo" averages each sample over its tokens, then over the batch: ``sample_mean``.
- vespo: ``vespo_k_pos`` ... ``vespo_lambda_neg`` are liger's parameters of the same names; loss_type="vespo"
  is ``token_mean``.
- GSPO: ``ratio_level=sequence`` with ``eps_clip`` / ``eps_clip_high`` is liger's
  ``importance_sampling_level="sequence"`` with ``epsilon_low`` / ``epsilon_high``; loss_type="grpo" is
  ``sample_mean``, loss_type="dapo" is ``token_mean``.
KL is off (beta=0). Run with ``-s`` for the largest relative errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

from rl_loss import LossConfig, ReducerFactory, RelabelNotice, StepBatch, policy_loss

B, T, H, V = 4, 6, 8, 16
MASK_LENGTHS = (6, 3, 5, 0)  # the last sample is fully masked: it adds no token but still counts in N
ADVANTAGES = (1.0, -0.7, 0.4, -1.2)
MAX_ERROR: dict[str, float] = {}
# liger works in float32 (its log-softmax, ratios and loss); the reference in float64
VALUE_RTOL = 1e-5
GRAD_RTOL = 1e-5

CASES = {
    # name: (our LossConfig fields, liger constructor arguments)
    "cispo-token_mean": (
        dict(surrogate="cispo", aggregation="token_mean", eps_clip_high=0.15),
        dict(loss_type="cispo", epsilon_high=1.15),
    ),
    "sapo-sample_mean": (
        dict(surrogate="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05),
        dict(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    ),
    "sapo-sample_mean-steep": (
        dict(surrogate="sapo", sapo_tau_pos=2.0, sapo_tau_neg=6.0),
        dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=6.0),
    ),
    "vespo-token_mean": (  # liger's vespo divides by the batch's tokens like dapo: token_mean
        dict(surrogate="vespo", aggregation="token_mean", vespo_k_pos=2.0, vespo_lambda_pos=3.0),
        dict(loss_type="vespo", vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0),
    ),
    "gspo-sample_mean": (
        dict(ratio_level="sequence", eps_clip=0.02, eps_clip_high=0.03),
        dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.02, epsilon_high=0.03),
    ),
    "gspo-token_mean": (
        dict(ratio_level="sequence", aggregation="token_mean", eps_clip=0.02, eps_clip_high=0.03),
        dict(loss_type="dapo", importance_sampling_level="sequence", epsilon_low=0.02, epsilon_high=0.03),
    ),
}


def batch(seed: int):
    """float32 hidden states, LM-head weight, token ids, mask, advantages and old log-probs (ratios ~ 0.7-1.5)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.arange(T) < torch.tensor(MASK_LENGTHS)[:, None]).to(torch.float32)
    advantages = torch.tensor(ADVANTAGES)
    with torch.no_grad():
        current = logprobs_of(hidden.double(), weight.double(), ids)
    old = (current + 0.8 * torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.4).float()
    return hidden, weight, ids, mask, advantages, old


def logprobs_of(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def ours(fields: dict, hidden, weight, ids, mask, advantages, old):
    """rl-loss in float64: (loss, grad hidden, grad weight, pg_clipfrac)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        config = LossConfig(**fields)
    hidden64 = hidden.double().requires_grad_(True)
    weight64 = weight.double().requires_grad_(True)
    step = StepBatch(response_lengths=[T] * B, total_lengths=[T + 1] * B, loss_masks=mask.double().reshape(-1))
    factory = ReducerFactory(config)
    logp = logprobs_of(hidden64, weight64, ids).reshape(-1)
    loss, metrics = policy_loss(
        logp,
        old.double().reshape(-1),
        advantages.double().repeat_interleave(T),
        factory.pg_reducer(step),
        factory.metric_reducer(step),
        config,
    )
    loss.backward()
    return loss.detach(), hidden64.grad, weight64.grad, float(metrics["pg_clipfrac"])


def liger(arguments: dict, hidden, weight, ids, mask, advantages, old):
    """liger-kernel: (loss, grad hidden, grad weight)."""
    module = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, **arguments)
    hidden32 = hidden.clone().requires_grad_(True)
    weight32 = weight.clone().requires_grad_(True)
    loss, _ = module(hidden32, weight32, ids, mask, advantages, old_per_token_logps=old)
    loss.backward()
    return loss.detach(), hidden32.grad, weight32.grad


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_surrogate_matches_liger_value_and_gradient(case, seed):
    fields, arguments = CASES[case]
    data = batch(seed)
    loss, grad_hidden, grad_weight, clipfrac = ours(fields, *data)
    ref_loss, ref_hidden, ref_weight = liger(arguments, *data)
    errors = {
        "value": relative(ref_loss, loss),
        "grad_hidden": relative(ref_hidden, grad_hidden),
        "grad_weight": relative(ref_weight, grad_weight),
    }
    for key, value in errors.items():
        MAX_ERROR[f"{case}:{key}"] = max(MAX_ERROR.get(f"{case}:{key}", 0.0), value)
    assert errors["value"] <= VALUE_RTOL, (case, float(loss), float(ref_loss))
    assert errors["grad_hidden"] <= GRAD_RTOL and errors["grad_weight"] <= GRAD_RTOL, errors
    if not case.startswith(("sapo", "vespo")):  # the clip / truncation path is exercised (sapo, vespo: no clip)
        assert clipfrac > 0


def test_cispo_cap_is_one_plus_eps_clip_high_in_liger_terms():
    # the same cap spelt both ways agrees; liger with epsilon_high = eps_clip_high (0.15, a cap below every
    # ratio) does not: the mapping is not the identity
    data = batch(0)
    loss, *_ = ours(CASES["cispo-token_mean"][0], *data)
    wrong, *_ = liger(dict(loss_type="cispo", epsilon_high=0.15), *data)
    assert relative(wrong, loss) > 1e-2


def test_liger_parity_summary_reports_largest_relative_errors(report_summary):
    if not MAX_ERROR:
        pytest.skip("the parity tests of this module did not run in this session")
    report_summary("[liger parity] max relative error (float32 liger vs float64 rl-loss): "
                   + ", ".join(f"{k}={v:.2g}" for k, v in sorted(MAX_ERROR.items())))
