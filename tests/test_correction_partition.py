"""Partition invariance of the corrections (docs/corrections.md): OPSM, rollout correction, the KL term with
kl_aggregation=pg and clip-cov, in every aggregation mode, over micro-batches x DP x CP 1-8 x thd/bshd.

The random steps and partitions are those of ``tests/test_partition_invariance.py``. The per-sample statistics
(OPSM's mean KL, sequence TIS, seq_* rejection) need the CP all-reduce: each (micro-batch, CP group) runs
:func:`rl_loss.policy_loss` twice per rank, first recording every rank's partials call by call, then replaying
them so that call k on rank r returns the sum of call k's partials over the group (what a real all-reduce
returns). The reference computes each statistic over the whole sample and the objective by docs/aggregation.md's
formulas. float64: the corrections threshold statistics, so a float32 run could flip a decision at a bound
that the float64 reference does not (the float32 exactness of the reduction is covered elsewhere).

Run with ``-s`` for the example counts and the largest relative errors.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_loss import (
    AGGREGATIONS,
    EmptyStepWarning,
    LossConfig,
    ReducerFactory,
    RelabelNotice,
    covariance_selection,
    policy_loss,
)
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

VARIANTS = {
    "opsm": dict(off_policy_mask_delta=0.01),
    "rollout_sequence": dict(rollout_correction=dict(is_level="sequence", is_threshold=1.5, rs="seq_mean_k1",
                                                     rs_threshold_high=1.1)),
    "rollout_token": dict(rollout_correction=dict(is_level="token", is_threshold=1.2, rs="token_k3",
                                                  rs_threshold_high=0.02)),
    "kl_pg": dict(kl_coef=0.1, kl_aggregation="pg", kl_clamp=0.05),
    "clip_cov": dict(cov_penalty="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=0.0),
}
CORRECTION_SETTINGS = settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
SEEN = Seen()


def config_for(variant: str, mode: str, case: Case) -> LossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        return LossConfig(aggregation=mode, divisor=case.divisor if mode == "constant" else None, **VARIANTS[variant])


def inputs(case: Case) -> dict[str, torch.Tensor]:
    """Step-ordered float64 inputs: log-ratios in [-0.5, 0.5], engine drift in [-0.3, 0.3], advantages of both signs."""
    gen = torch.Generator().manual_seed(case.seed)
    tokens = sum(case.response_lengths)
    old = -0.1 - 2.9 * torch.rand(tokens, generator=gen, dtype=torch.float64)
    logp = old + torch.rand(tokens, generator=gen, dtype=torch.float64) - 0.5
    rollout = old + 0.6 * torch.rand(tokens, generator=gen, dtype=torch.float64) - 0.3
    ref = logp + 2 * torch.rand(tokens, generator=gen, dtype=torch.float64) - 1
    per_sample = (0.2 + 1.8 * torch.rand(case.num_samples, generator=gen, dtype=torch.float64))
    per_sample = per_sample * torch.where(torch.rand(case.num_samples, generator=gen) < 0.5, -1.0, 1.0).double()
    adv = torch.repeat_interleave(per_sample, torch.tensor(case.response_lengths))
    return dict(logp=logp, old=old, rollout=rollout, ref=ref, adv=adv)


def reference_per_token(case: Case, config: LossConfig, x: dict, selection: torch.Tensor) -> torch.Tensor:
    """The corrected per-token pg loss (plus the KL term for kl_pg), written out sample by sample."""
    out, offset = [], 0
    rc = config.rollout_correction
    for r, mask in zip(case.response_lengths, case.masks, strict=True):
        s = slice(offset, offset + r)
        offset += r
        lp, lo, a, m = x["logp"][s], x["old"][s], x["adv"][s], torch.tensor(mask, dtype=torch.float64)
        count = max(sum(mask), 1)
        ratio = torch.exp(lp - lo)
        loss = torch.maximum(-ratio * a, -ratio.clamp(0.8, 1.2) * a)  # ppo_clip, eps 0.2
        loss = loss * (1 - selection[s])
        lr = lo - x["rollout"][s]
        if rc.is_level == "token":
            loss = loss * torch.exp(lr).clamp(max=rc.is_threshold)
        if rc.is_level == "sequence":
            loss = loss * torch.exp((m * lr).sum()).clamp(max=rc.is_threshold)
        if rc.rs == "token_k3":
            loss = loss * ((torch.exp(lr) - 1 - lr) <= rc.rs_threshold_high).double()
        if rc.rs == "seq_mean_k1":
            geo = (m * -lr).sum() / count
            loss = loss * float(math.log(rc.ratio_low) <= geo <= math.log(rc.rs_threshold_high))
        if config.off_policy_mask_delta is not None:
            kl = (m * (x["rollout"][s] - lp.detach())).sum() / count
            loss = loss * float(not (a[0] < 0 and kl > config.off_policy_mask_delta))
        if config.kl_coef > 0:
            d = lp - x["ref"][s]
            loss = loss + config.kl_coef * (torch.exp(-d) - 1 + d).clamp(-config.kl_clamp, config.kl_clamp)
        out.append(loss)
    return torch.cat(out)


def partitioned_loss(case: Case, config: LossConfig, x: dict, selection: torch.Tensor) -> torch.Tensor:
    step = case.step()
    factory = ReducerFactory(config)
    wants_rollout = config.rollout_correction.enabled or config.off_policy_mask_delta is not None
    total = x["logp"].new_zeros(())
    for cell, max_seq_len in zip(case.cells, case.max_seq_lens, strict=True):
        layout = dict(sample_indices=None if case.whole_step_as_none else cell, cp_size=case.cp_size,
                      qkv_format=case.qkv_format, max_seq_len=max_seq_len)
        ranks = []
        for cp_rank in range(case.cp_size):
            pg = factory.pg_reducer(step, cp_rank=cp_rank, **layout)
            ranks.append((pg, factory.metric_reducer(step, cp_rank=cp_rank, **layout),
                          local_index(case, cell, cp_rank, max_seq_len)))

        def run(pg, metric, i, all_reduce):
            kwargs = dict(ref_logprobs=x["ref"][i] if config.kl_coef > 0 else None,
                          rollout_logprobs=x["rollout"][i] if wants_rollout else None,
                          cov_selection=selection[i] if config.cov_penalty != "none" else None)
            return policy_loss(x["logp"][i], x["old"][i], x["adv"][i], pg, metric, config,
                               cp_all_reduce=all_reduce, **kwargs)[0]

        recorded: list[list[torch.Tensor]] = [[] for _ in ranks]
        for r, (pg, metric, i) in enumerate(ranks):
            run(pg, metric, i, lambda t, own=recorded[r]: own.append(t.detach()) or t)
        for r, (pg, metric, i) in enumerate(ranks):
            others = [calls for q, calls in enumerate(recorded) if q != r]
            counter = iter(range(len(recorded[r])))

            def replay(t, others=others, counter=counter):
                k = next(counter)  # call k of this rank meets call k of every other rank of the group
                return t + sum((calls[k] for calls in others), torch.zeros_like(t))

            total = total + run(pg, metric, i, replay)
    return total


def check(variant: str, case: Case, mode: str) -> dict[str, float]:
    config = config_for(variant, mode, case)
    x = inputs(case)
    selection = covariance_selection(config, case.step(), x["logp"], x["old"], x["adv"],
                                     generator=torch.Generator().manual_seed(case.seed))
    leaf = x["logp"].clone().requires_grad_(True)
    want = reference_objective(reference_per_token(case, config, {**x, "logp": leaf}, selection), case, mode)
    (want_grad,) = torch.autograd.grad(want, leaf)
    leaf2 = x["logp"].clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyStepWarning)
        got = partitioned_loss(case, config, {**x, "logp": leaf2}, selection)
    (grad,) = torch.autograd.grad(got, leaf2) if got.requires_grad else (torch.zeros_like(leaf2),)
    errors = {"objective": objective_error(got.detach(), want.detach()), "gradient": gradient_error(grad, want_grad)}
    assert errors["objective"] <= TOLERANCE[torch.float64], (float(got), float(want))
    assert errors["gradient"] <= TOLERANCE[torch.float64]
    return errors


@pytest.mark.parametrize("qkv_format", FORMATS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@CORRECTION_SETTINGS
@given(data=st.data())
def test_correction_partials_and_gradients_sum_to_the_step_in_every_mode(variant, qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    mode = data.draw(st.sampled_from(AGGREGATIONS), label="aggregation")
    errors = check(variant, case, mode)
    SEEN.record(f"{variant}-{qkv_format}", {f"{variant}_{k}": v for k, v in errors.items()})


def test_correction_property_summary_reports_examples_and_largest_errors(capsys):
    """Prints the example counts and the largest relative errors of this file's properties."""
    if not SEEN.examples:
        pytest.skip("the property tests of this module did not run in this session")
    with capsys.disabled():
        print(SEEN.summary("correction partition"))
