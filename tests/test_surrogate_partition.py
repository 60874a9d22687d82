"""Partition invariance of every surrogate (docs/exactness.md, docs/objectives.md), and GSPO's sequence ratio exact under CP.

The random steps and partitions (micro-batches x DP ranks x CP 1-8 x thd/bshd) are those of
``tests/test_partition_invariance.py``. Each (micro-batch, DP rank, CP rank) piece runs
:func:`rl_loss.policy_loss` on its local tokens; for the sequence ratio the CP ranks of a micro-batch
first compute their per-sample partials and the all-reduce is simulated by adding the other ranks'
partials to a rank's own (differentiably, so the gradient crosses ranks as a real autograd all-reduce
would). The sum of the pieces, and its gradient, is compared with the step objective computed from the
whole step: per-token losses written out per sample from docs/objectives.md, aggregated by docs/aggregation.md's formulas.

Run with ``-s`` for the example counts and the largest relative errors.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_loss import AGGREGATIONS, EmptyStepWarning, LossConfig, ReducerFactory, RelabelNotice, policy_loss
from tests.test_partition_invariance import (
    FORMATS,
    TOLERANCE,
    Case,
    Seen,
    gradient_error,
    local_index,
    objective_error,
    partitioned_steps,
    reference_objective,
)

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

# surrogate variant -> LossConfig fields. GSPO's ranges are narrow so that sequence ratios of random
# log-ratios in [-0.5, 0.5] (their mean shrinks with length) still clip.
VARIANTS = {
    "ppo_clip": dict(eps_clip_high=0.28, eps_clip_c=3.0),
    "cispo": dict(surrogate="cispo", eps_clip_high=0.28),
    "sapo": dict(surrogate="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05),
    "gspo": dict(ratio_level="sequence", eps_clip=0.05, eps_clip_high=0.08, eps_clip_c=3.0),
}
SURROGATE_SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
GSPO_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

NEW_SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

SEEN = Seen()  # this module's record


def config_for(variant: str, mode: str, case: Case) -> LossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        divisor = case.divisor if mode == "constant" else None
        return LossConfig(aggregation=mode, divisor=divisor, **VARIANTS[variant])


def inputs(case: Case, signed_advantages: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step-ordered float64 (logp, logp_old, advantages): log-ratios in [-0.5, 0.5], one advantage per sample."""
    gen = torch.Generator().manual_seed(case.seed)
    tokens = sum(case.response_lengths)
    old = -0.1 - 2.9 * torch.rand(tokens, generator=gen, dtype=torch.float64)
    logp = old + torch.rand(tokens, generator=gen, dtype=torch.float64) - 0.5
    per_sample = 0.2 + 1.8 * torch.rand(case.num_samples, generator=gen, dtype=torch.float64)
    if signed_advantages:
        per_sample = per_sample * torch.where(torch.rand(case.num_samples, generator=gen) < 0.5, -1.0, 1.0).double()
    advantages = torch.repeat_interleave(per_sample, torch.tensor(case.response_lengths))
    return logp, old, advantages


def reference_per_token_loss(case: Case, logp, old, adv, config: LossConfig) -> torch.Tensor:
    """The per-token loss of docs/objectives.md, written out sample by sample."""
    losses, offset = [], 0
    for r, mask in zip(case.response_lengths, case.masks, strict=True):
        lp, lo, a = logp[offset : offset + r], old[offset : offset + r], adv[offset : offset + r]
        offset += r
        if config.ratio_level == "sequence":
            m = torch.tensor(mask, dtype=lp.dtype)
            ratio = torch.exp(((m * (lp - lo)).sum() / max(sum(mask), 1)).clamp(-20, 20)).expand(r)
        else:
            ratio = torch.exp((lp - lo).clamp(-20, 20))
        if config.surrogate == "cispo":
            loss = -ratio.detach().clamp(max=1 + config.clip_high) * a * lp
        elif config.surrogate == "sapo":
            tau_pos, tau_neg = (torch.tensor(t, dtype=lp.dtype) for t in (config.tau_pos, config.tau_neg))
            tau = torch.where(a > 0, tau_pos, tau_neg)
            loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
        else:
            loss = torch.maximum(-ratio * a, -ratio.clamp(1 - config.clip_low, 1 + config.clip_high) * a)
            loss = torch.where(a < 0, torch.minimum(loss, -config.eps_clip_c * a), loss)
        losses.append(loss)
    return torch.cat(losses)


def partitioned_loss(case: Case, config: LossConfig, logp, old, adv) -> torch.Tensor:
    """Sum over micro-batches, DP and CP ranks of policy_loss's partials, the CP all-reduce simulated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyStepWarning)
        return _partitioned_loss(case, config, logp, old, adv)


def _partitioned_loss(case: Case, config: LossConfig, logp, old, adv) -> torch.Tensor:
    step = case.step()
    factory = ReducerFactory(config)
    total = logp.new_zeros(())
    for cell, max_seq_len in zip(case.cells, case.max_seq_lens, strict=True):
        layout = dict(sample_indices=None if case.whole_step_as_none else cell, cp_size=case.cp_size,
                      qkv_format=case.qkv_format, max_seq_len=max_seq_len)
        ranks = []
        for cp_rank in range(case.cp_size):
            pg = factory.pg_reducer(step, cp_rank=cp_rank, **layout)
            metric = factory.metric_reducer(step, cp_rank=cp_rank, **layout)
            index = local_index(case, cell, cp_rank, max_seq_len)
            assert torch.equal(pg.token_index, index)
            ranks.append((pg, metric, index))
        partials = [pg.sample_partial_means(logp[i] - old[i]) for pg, _, i in ranks]
        for r, (pg, metric, index) in enumerate(ranks):
            others = sum((p for k, p in enumerate(partials) if k != r), torch.zeros_like(partials[r]))
            loss, _ = policy_loss(logp[index], old[index], adv[index], pg, metric, config,
                                  cp_all_reduce=lambda own, others=others: own + others)
            total = total + loss
    return total


def check_objective(case: Case, config: LossConfig, mode: str) -> dict[str, float]:
    logp, old, adv = inputs(case, signed_advantages=False)
    want = reference_objective(reference_per_token_loss(case, logp, old, adv, config), case, mode)
    errors = {}
    for dtype in (torch.float64, torch.float32):
        got = partitioned_loss(case, config, logp.to(dtype), old.to(dtype), adv.to(dtype))
        assert got.dtype == dtype
        errors[f"objective_{dtype}"] = objective_error(got, want)
        assert errors[f"objective_{dtype}"] <= TOLERANCE[dtype], (dtype, float(got), float(want))
    return errors


def check_gradient(case: Case, config: LossConfig, mode: str) -> dict[str, float]:
    logp, old, adv = inputs(case, signed_advantages=True)
    leaf64 = logp.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(
        reference_objective(reference_per_token_loss(case, leaf64, old, adv, config), case, mode), leaf64
    )
    errors = {}
    for dtype in (torch.float64, torch.float32):
        leaf = logp.to(dtype).requires_grad_(True)
        (grad,) = torch.autograd.grad(partitioned_loss(case, config, leaf, old.to(dtype), adv.to(dtype)), leaf)
        errors[f"gradient_{dtype}"] = gradient_error(grad, want)
        assert errors[f"gradient_{dtype}"] <= TOLERANCE[dtype], dtype
    return errors


# --- every surrogate x every aggregation mode ------------------------------------------------------------------


@pytest.mark.parametrize("qkv_format", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@SURROGATE_SETTINGS
@given(data=st.data())
def test_surrogate_partials_sum_to_the_step_loss_in_every_mode(variant, qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    mode = data.draw(st.sampled_from(AGGREGATIONS), label="aggregation")
    errors = check_objective(case, config_for(variant, mode, case), mode)
    SEEN.record(f"objective[{variant}-{qkv_format}]", {f"{variant}_{k}": v for k, v in errors.items()})


@pytest.mark.parametrize("qkv_format", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@SURROGATE_SETTINGS
@given(data=st.data())
def test_surrogate_partial_gradients_sum_to_the_step_gradient_in_every_mode(variant, qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    mode = data.draw(st.sampled_from(AGGREGATIONS), label="aggregation")
    errors = check_gradient(case, config_for(variant, mode, case), mode)
    SEEN.record(f"gradient[{variant}-{qkv_format}]", {f"{variant}_{k}": v for k, v in errors.items()})


# --- GSPO under CP 1-8, more examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_format", FORMATS)
@GSPO_SETTINGS
@given(data=st.data())
def test_gspo_sequence_ratio_is_exact_under_every_partition(qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    errors = check_objective(case, config_for("gspo", "sample_mean", case), "sample_mean")
    SEEN.record(f"gspo_cp_objective[{qkv_format}]", {f"gspo_cp_{k}": v for k, v in errors.items()})


@pytest.mark.parametrize("qkv_format", FORMATS)
@GSPO_SETTINGS
@given(data=st.data())
def test_gspo_gradient_crosses_cp_ranks_exactly(qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    errors = check_gradient(case, config_for("gspo", "sample_mean", case), "sample_mean")
    SEEN.record(f"gspo_cp_gradient[{qkv_format}]", {f"gspo_cp_{k}": v for k, v in errors.items()})


# --- the 2026 surrogates and GSPO-token (docs/objectives-2026.md) ----------------------------------------------
# Each reduces per sequence over every CP rank (GMPO's clipped log-ratios, VESPO's log-ratio sum, GSPO-token's
# detached mean) or masks tokens (DPPO). Ranges are chosen so that the clips, masks and gamma weights bind on
# the random log-ratios in [-0.5, 0.5] of inputs().

NEW_VARIANTS = {
    "gmpo": dict(surrogate="gmpo", eps_clip=0.1, eps_clip_high=0.15),
    "vespo": dict(surrogate="vespo", vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0),
    "dppo_tv": dict(surrogate="dppo_tv", dppo_delta=0.05, dppo_delta_high=0.08, dppo_ratio_cap=1.3),
    "dppo_kl": dict(surrogate="dppo_kl", dppo_delta=0.01, dppo_delta_high=0.02),
    "gspo_token": dict(ratio_level="sequence_token", eps_clip=0.05, eps_clip_high=0.08, eps_clip_c=3.0),
}


def new_config_for(variant: str, mode: str, case: Case) -> LossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        divisor = case.divisor if mode == "constant" else None
        return LossConfig(aggregation=mode, divisor=divisor, **NEW_VARIANTS[variant])


def new_reference_per_token_loss(case: Case, logp, old, adv, config: LossConfig) -> torch.Tensor:
    """The per-token loss of docs/objectives-2026.md, written out sample by sample from the formulas."""
    losses, offset = [], 0
    for r, mask in zip(case.response_lengths, case.masks, strict=True):
        lp, lo, a = logp[offset : offset + r], old[offset : offset + r], adv[offset : offset + r]
        offset += r
        m = torch.tensor(mask, dtype=lp.dtype)
        count = max(sum(mask), 1)
        if config.surrogate == "gmpo":  # g = exp(mean of the pessimistically log-clipped ratios)
            d = lp - lo
            c = d.clamp(-config.clip_low, config.clip_high)
            d_pess = torch.where(a > 0, torch.minimum(d, c), torch.maximum(d, c))
            loss = -torch.exp(((m * d_pess).sum() / count).clamp(-20, 20)) * a
        elif config.surrogate == "vespo":  # -sg(e^lam w^k e^-lam w) A logp, w = exp(sum of log-ratios)
            log_w = (m * (lp - lo).detach().clamp(-20, 20)).sum().clamp(math.log(1e-8), 20)
            k_pos, lam_pos, k_neg, lam_neg = config.vespo_shape
            k = torch.where(a >= 0, k_pos, k_neg).to(lp.dtype)
            lam = torch.where(a >= 0, lam_pos, lam_neg).to(lp.dtype)
            loss = -(lam.exp() * torch.exp(log_w) ** k * torch.exp(-lam * torch.exp(log_w))) * a * lp
        elif config.surrogate.startswith("dppo"):  # -A sg(min(r, C)) logp, 0 past the trust region
            p, p_old = lp.detach().exp(), lo.exp()
            low, high = config.dppo_thresholds
            if config.surrogate == "dppo_tv":
                valid = torch.where(a > 0, p - p_old <= high, p - p_old >= -low)
            else:
                kl = p_old * (lo - lp.detach()) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
                valid = torch.where(a > 0, (kl <= high) | (p <= p_old), (kl <= low) | (p >= p_old))
            cap = float("inf") if config.dppo_ratio_cap is None else config.dppo_ratio_cap
            loss = -a * (lp - lo).detach().exp().clamp(max=cap) * lp * valid.to(lp.dtype)
        else:  # GSPO-token: value s_i, gradient s_i * dlogp_t, then PPO's clip and dual clip
            s = torch.exp(((m * (lp - lo)).sum() / count).clamp(-20, 20)).detach() * torch.exp(lp - lp.detach())
            loss = torch.maximum(-s * a, -s.clamp(1 - config.clip_low, 1 + config.clip_high) * a)
            loss = torch.where(a < 0, torch.minimum(loss, -config.eps_clip_c * a), loss)
        losses.append(loss)
    return torch.cat(losses)


def all_reduced_partitioned_loss(case: Case, config: LossConfig, logp, old, adv) -> torch.Tensor:
    """Sum over micro-batches, DP and CP ranks of policy_loss's partials, with a simulated CP all-reduce.

    Whatever a surrogate all-reduces, each CP rank's partial is first recorded (a pass whose losses are
    discarded), then every rank runs with an all-reduce returning its own partial plus the other ranks'
    recorded ones, differentiably, as a real autograd all-reduce would.
    """
    step = case.step()
    factory = ReducerFactory(config)
    total = logp.new_zeros(())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyStepWarning)
        for cell, max_seq_len in zip(case.cells, case.max_seq_lens, strict=True):
            layout = dict(sample_indices=None if case.whole_step_as_none else cell, cp_size=case.cp_size,
                          qkv_format=case.qkv_format, max_seq_len=max_seq_len)
            ranks = [(factory.pg_reducer(step, cp_rank=k, **layout), factory.metric_reducer(step, cp_rank=k, **layout))
                     for k in range(case.cp_size)]
            recorded: list[torch.Tensor | None] = [None] * case.cp_size

            def record(own, k, recorded=recorded):
                recorded[k] = own
                return own

            for k, (pg, metric) in enumerate(ranks):
                i = pg.token_index
                policy_loss(logp[i], old[i], adv[i], pg, metric, config, cp_all_reduce=lambda own, k=k: record(own, k))
            for k, (pg, metric) in enumerate(ranks):
                i = pg.token_index
                others = [p for j, p in enumerate(recorded) if j != k and p is not None]

                def reduce(own, others=others):
                    return own + sum(others, torch.zeros_like(own))

                loss, _ = policy_loss(logp[i], old[i], adv[i], pg, metric, config, cp_all_reduce=reduce)
                total = total + loss
    return total


def check_new_variant(case: Case, config: LossConfig, mode: str) -> dict[str, float]:
    # Advantages of both signs (every branch), so the objective can cancel to near 0: its error is taken
    # relative to its size without cancellation, the same aggregation of |l| (exactly 0 stays required).
    logp, old, adv = inputs(case, signed_advantages=True)
    leaf64 = logp.clone().requires_grad_(True)
    per_token = new_reference_per_token_loss(case, leaf64, old, adv, config)
    want = reference_objective(per_token, case, mode)
    size = float(reference_objective(per_token.detach().abs(), case, mode))
    (want_grad,) = torch.autograd.grad(want, leaf64)
    errors = {}
    for dtype in (torch.float64, torch.float32):
        leaf = logp.to(dtype).requires_grad_(True)
        got = all_reduced_partitioned_loss(case, config, leaf, old.to(dtype), adv.to(dtype))
        (grad,) = torch.autograd.grad(got, leaf)
        diff = abs(float(got.detach()) - float(want.detach()))
        errors[f"objective_{dtype}"] = diff / size if size else objective_error(got, want)
        errors[f"gradient_{dtype}"] = gradient_error(grad, want_grad)
        assert errors[f"objective_{dtype}"] <= TOLERANCE[dtype], (dtype, float(got), float(want))
        assert errors[f"gradient_{dtype}"] <= TOLERANCE[dtype], dtype
    return errors


@pytest.mark.parametrize("qkv_format", FORMATS)
@pytest.mark.parametrize("variant", list(NEW_VARIANTS))
@NEW_SETTINGS
@given(data=st.data())
def test_2026_surrogate_partials_and_gradients_sum_to_the_step_in_every_mode(variant, qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    mode = data.draw(st.sampled_from(AGGREGATIONS), label="aggregation")
    errors = check_new_variant(case, new_config_for(variant, mode, case), mode)
    SEEN.record(f"step[{variant}-{qkv_format}]", {f"{variant}_{k}": v for k, v in errors.items()})


def test_property_summary_reports_examples_and_largest_errors(report_summary):
    """Prints the example counts and the largest relative errors of this file's properties."""
    if not SEEN.examples:
        pytest.skip("the property tests of this module did not run in this session")
    for key, value in SEEN.max_error.items():
        assert value <= TOLERANCE[torch.float32 if "float32" in key else torch.float64], key
    report_summary(SEEN.summary("surrogate partition"))
