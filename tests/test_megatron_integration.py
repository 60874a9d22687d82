"""The Megatron loss funcs give the gradient of the step objective J under megatron-core's contract (docs/exactness.md).

The CPU tests drive :func:`megatron_loss_func` the way megatron-core 0.16.1 does: one micro-batch at a
time on every (DP rank, CP rank), each rank with its own replica of the parameters, then

1. the schedule's scaling of the returned tuple, either replicated from
   ``megatron/core/pipeline_parallel/schedules.py:256-269`` (``forward_step_calc_loss``) or by calling
   that real function;
2. ``backward()`` on each scaled micro-batch loss (gradients accumulate over micro-batches);
3. DDP's reduction: pre-scale by ``1 / |DP x CP|`` (1 with ``calculate_per_token_loss``) and sum over the
   DP x CP ranks (``distributed/distributed_data_parallel.py:254-288``,
   ``distributed/param_and_grad_buffer.py:388-396``);
4. with ``calculate_per_token_loss``, division by the token count summed over micro-batches and
   all-reduced over DP x CP, when it is > 0 (``schedules.py:649,672``, ``finalize_model_grads.py:484-497``).

The result, and its gradient, is compared with J computed here from the docs/aggregation.md table (float64,
rel. 1e-12), with each rank's local values cut by an independent implementation of the docs/cp-layout.md layout.
The CUDA test runs megatron-core's real schedule, DDP and ``finalize_model_grads`` on one GPU.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from rl_loss import EmptyStepWarning, LossConfig, ReducerFactory, StepBatch
from rl_loss.integrations.megatron import check_megatron_config, megatron_loss_func, megatron_policy_loss_func

MODES = ("sample_mean", "prompt_mean", "token_mean", "constant")
FORMATS = ("thd", "bshd")
DIVISOR = 9.5  # L of the constant mode
REL = 1e-12  # float64 (docs/exactness.md)
FEATURES = 3  # parameters of the toy per-token loss

pytestmark = pytest.mark.filterwarnings("ignore:Apex is not installed:UserWarning")  # importing megatron-core on CPU

# (DP size, CP size, micro-batches per DP rank)
LAYOUTS = [(1, 1, 1), (1, 1, 4), (2, 1, 3), (3, 1, 1), (1, 2, 2), (2, 3, 2), (1, 4, 3), (2, 8, 1), (4, 2, 2)]


def layout_id(layout: tuple[int, int, int]) -> str:
    dp, cp, nmb = layout
    return f"dp{dp}-cp{cp}-mb{nmb}"


def factory_for(mode: str, **fields) -> ReducerFactory:
    return ReducerFactory(LossConfig(aggregation=mode, divisor=DIVISOR if mode == "constant" else None, **fields))


# --- a random step and its reference objective (docs/aggregation.md) ---------------------------------------------


@dataclass
class Step:
    response_lengths: list[int]
    total_lengths: list[int]
    masks: list[list[int]]
    groups: list[int]
    features: list[Tensor]  # per sample (R_i, FEATURES), float64

    @property
    def num_samples(self) -> int:
        return len(self.response_lengths)

    def batch(self) -> StepBatch:
        return StepBatch(
            response_lengths=self.response_lengths,
            total_lengths=self.total_lengths,
            loss_masks=[torch.tensor(m, dtype=torch.float32) for m in self.masks],
            group_index=self.groups,
        )


def random_step(seed: int, num_samples: int = 14, all_masked: bool = False) -> Step:
    gen = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:  # inclusive
        return int(torch.randint(low, high + 1, (), generator=gen))

    response_lengths = [randint(1, 12) for _ in range(num_samples)]
    total_lengths = [r + randint(1, 6) for r in response_lengths]
    masks = [(torch.rand(r, generator=gen) < 0.7).int().tolist() for r in response_lengths]
    masks[3] = [0] * response_lengths[3]  # a fully masked sample: still one of the N samples
    masks[5] = [1] * response_lengths[5]
    if all_masked:
        masks = [[0] * r for r in response_lengths]
    groups = sorted(randint(0, 4) for _ in range(num_samples))
    features = [torch.randn(r, FEATURES, generator=gen, dtype=torch.float64) for r in response_lengths]
    return Step(response_lengths, total_lengths, masks, groups, features)


def toy_token_loss(features: Tensor, theta: Tensor) -> Tensor:
    """A non-linear per-token loss l(theta) so the gradient mixes tokens: tanh(f.theta) + 0.3 (f.theta)^2."""
    z = features @ theta
    return torch.tanh(z) + 0.3 * z * z


def step_objective(losses: list[Tensor], masks: list[list[int]], groups: list[int], mode: str) -> Tensor:
    """J of docs/aggregation.md, written out per sample and per group (no library code)."""
    n = len(losses)
    sums = [(loss * torch.tensor(m, dtype=loss.dtype)).sum() for loss, m in zip(losses, masks, strict=True)]
    counts = [sum(m) for m in masks]
    if mode == "sample_mean":
        return sum(s / max(c, 1) for s, c in zip(sums, counts, strict=True)) / n
    if mode == "token_mean":
        return sum(sums) / max(sum(counts), 1)
    if mode == "constant":
        return sum(sums) / (n * DIVISOR)
    if mode == "prompt_mean":
        group_ids = sorted(set(groups))
        total = 0
        for g in group_ids:
            members = [i for i in range(n) if groups[i] == g]
            total = total + sum(sums[i] for i in members) / max(sum(counts[i] for i in members), 1)
        return total / len(group_ids)
    raise AssertionError(mode)


# --- the CP layout of docs/cp-layout.md, written out ---------------------------------------------------------------


def held_response_indices(total: int, response: int, cp_rank: int, cp_size: int, width: int) -> list[int]:
    """Response indices held by a CP rank: chunks r and 2cp-1-r of size ceil(width / 2cp); logit p scores token p+1."""
    chunk = math.ceil(width / (2 * cp_size))
    first_scored = total - response - 1  # the logit at P_i - 1 scores response token 0
    held: list[int] = []
    for a, b in (
        (cp_rank * chunk, (cp_rank + 1) * chunk),
        ((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk),
    ):
        held.extend(p - first_scored for p in range(max(a, first_scored), min(b, total - 1)))
    return held


@dataclass
class MicroBatch:
    dp_rank: int
    index: int  # micro-batch number on its DP rank
    samples: list[int]
    bshd_width: int  # padded width: the longest sample, rounded up to a multiple of 2 * cp


def partition(step: Step, dp: int, cp: int, nmb: int, seed: int) -> list[MicroBatch]:
    """Shuffle the samples and cut them into dp * nmb non-empty micro-batches of random sizes."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(step.num_samples, generator=gen).tolist()
    cells = dp * nmb
    cuts = sorted(torch.randperm(step.num_samples - 1, generator=gen)[: cells - 1].add(1).tolist())
    pieces = [order[a:b] for a, b in zip([0, *cuts], [*cuts, step.num_samples], strict=True)]
    micro_batches = []
    for cell, samples in enumerate(pieces):
        longest = max(step.total_lengths[i] for i in samples)
        width = math.ceil(longest / (2 * cp)) * 2 * cp
        micro_batches.append(MicroBatch(cell // nmb, cell % nmb, samples, width))
    return micro_batches


def local(
    per_sample: Mapping[int, Tensor] | list[Tensor], step: Step, mb: MicroBatch, cp_rank: int, cp: int, fmt: str
) -> Tensor:
    """A CP rank's local values of a micro-batch: per sample (in micro-batch order) its held tokens."""
    pieces = []
    for i in mb.samples:
        width = step.total_lengths[i] if fmt == "thd" else mb.bshd_width
        idx = held_response_indices(step.total_lengths[i], step.response_lengths[i], cp_rank, cp, width)
        pieces.append(per_sample[i][torch.tensor(idx, dtype=torch.long)])
    return torch.cat(pieces)


def placement(mb: MicroBatch, cp_rank: int, cp: int, fmt: str) -> dict:
    return {
        "sample_indices": mb.samples,
        "cp_rank": cp_rank,
        "cp_size": cp,
        "qkv_format": fmt,
        "max_seq_len": mb.bshd_width if fmt == "bshd" else None,
    }


# --- megatron-core's arithmetic ----------------------------------------------------------------------------

Schedule = Callable[..., tuple[Tensor, Tensor, dict]]


def schedule_replica(loss_func, output_tensor, *, calculate_per_token_loss, cp_group_size, num_microbatches):
    """forward_step_calc_loss on the last stage, megatron-core 0.16.1 schedules.py:251-269, written out."""
    num_tokens = torch.tensor(0, dtype=torch.int)
    outputs = loss_func(output_tensor)
    if len(outputs) == 3:
        output_tensor, num_tokens, loss_reduced = outputs
        if not calculate_per_token_loss:
            output_tensor /= torch.clamp(num_tokens, min=1)
            output_tensor /= num_microbatches
    else:
        output_tensor, loss_reduced = outputs
        output_tensor *= cp_group_size
        output_tensor /= num_microbatches
    return output_tensor, num_tokens, loss_reduced


@cache
def megatron_transformer_config(calculate_per_token_loss: bool):
    return new_transformer_config(calculate_per_token_loss)


def agreeing_config(factory: ReducerFactory):
    """Megatron's TransformerConfig with the calculate_per_token_loss the loss config asks for."""
    return megatron_transformer_config(factory.config.calculate_per_token_loss)


def new_transformer_config(calculate_per_token_loss: bool):
    """The smallest TransformerConfig; only calculate_per_token_loss (and the defaults) matter here."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # megatron-core's deprecation notes about unrelated defaults
        return TransformerConfig(
            num_layers=1, hidden_size=8, num_attention_heads=1, calculate_per_token_loss=calculate_per_token_loss
        )


def schedule_megatron_core(loss_func, output_tensor, *, calculate_per_token_loss, cp_group_size, num_microbatches):
    """megatron-core's own forward_step_calc_loss, with cp_group_size and is_last_stage given (no process groups)."""
    schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")
    store: list = []
    output_tensor, num_tokens = schedules.forward_step_calc_loss(
        torch.nn.Identity(),
        output_tensor,
        loss_func,
        megatron_transformer_config(calculate_per_token_loss),
        None,  # vp_stage
        False,  # collect_non_loss_data
        num_microbatches,
        store,
        cp_group_size=cp_group_size,
        is_last_stage=True,
    )
    return output_tensor, num_tokens, store[0]


SCHEDULES = {"replica": schedule_replica, "megatron-core": schedule_megatron_core}


def megatron_lm_report(reports_per_rank: list[list[dict[str, Tensor]]], key: str) -> float:
    """Megatron-LM's train_step reduction of 2-element values: sum over micro-batches, all-reduce over DP x CP, [0]/[1]."""
    total = sum(torch.vstack([r[key].view(-1) for r in reports]).sum(dim=0) for reports in reports_per_rank)
    return float(total[0] / total[1])


@dataclass
class Result:
    value: Tensor  # the quantity whose gradient the reduced gradient is
    grad: Tensor
    num_tokens: int  # summed over micro-batches and DP x CP ranks
    reports: list[list[dict[str, Tensor]]]  # per rank, per micro-batch


def run_megatron(
    step: Step,
    theta: Tensor,
    layout: tuple[int, int, int],
    fmt: str,
    calculate_per_token_loss: bool,
    schedule: Schedule,
    build_loss_func: Callable[[MicroBatch, int], Callable],
    model_output: Callable[[Tensor, MicroBatch, int], Tensor],
    seed: int,
) -> Result:
    """Every (DP rank, CP rank) runs its micro-batches through the schedule; then DDP and finalize_model_grads."""
    dp, cp, nmb = layout
    micro_batches = partition(step, dp, cp, nmb, seed)
    grads, values, tokens, reports = [], [], [], []
    for dp_rank in range(dp):
        for cp_rank in range(cp):
            replica = theta.detach().clone().requires_grad_(True)
            rank_value, rank_tokens, rank_reports = torch.zeros((), dtype=torch.float64), 0, []
            for mb in (m for m in micro_batches if m.dp_rank == dp_rank):
                output, num_tokens, report = schedule(
                    build_loss_func(mb, cp_rank),
                    model_output(replica, mb, cp_rank),
                    calculate_per_token_loss=calculate_per_token_loss,
                    cp_group_size=cp,
                    num_microbatches=nmb,
                )
                output.backward()  # schedules.py backward_step: gradients accumulate over micro-batches
                rank_value = rank_value + output.detach()
                rank_tokens += int(num_tokens)
                rank_reports.append(report)
            grads.append(replica.grad if replica.grad is not None else torch.zeros_like(theta))
            values.append(rank_value)
            tokens.append(rank_tokens)
            reports.append(rank_reports)
    # DDP: gradient_scaling_factor 1/|DP x CP| (1 with calculate_per_token_loss), then SUM over DP x CP
    scaling = 1.0 if calculate_per_token_loss else 1.0 / (dp * cp)
    grad = sum(g * scaling for g in grads)
    value = sum(v * scaling for v in values)
    total_tokens = sum(tokens)  # finalize_model_grads: all_reduce(num_tokens, dp_cp_group)
    if calculate_per_token_loss and total_tokens > 0:
        grad, value = grad / total_tokens, value / total_tokens
    return Result(value, grad, total_tokens, reports)


def assert_close(actual: Tensor, expected: Tensor, rel: float = REL) -> None:
    err = float(torch.linalg.vector_norm((actual - expected).reshape(-1)))
    scale = float(torch.linalg.vector_norm(expected.reshape(-1)))
    assert err <= rel * scale, f"relative error {err / max(scale, 1e-300):.3g} > {rel} ({actual} vs {expected})"


def reference_objective(step: Step, theta: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    theta = theta.detach().clone().requires_grad_(True)
    objective = step_objective([toy_token_loss(f, theta) for f in step.features], step.masks, step.groups, mode)
    (grad,) = torch.autograd.grad(objective, theta) if objective.requires_grad else (torch.zeros_like(theta),)
    return objective.detach(), grad


# --- the per-token loss func: every mode, layout and format -----------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("mode", MODES)
def test_megatron_gradient_is_grad_of_step_objective(mode, layout, fmt, schedule):
    seed = 1000 + LAYOUTS.index(layout)
    step = random_step(seed)
    batch = step.batch()
    factory = factory_for(mode)
    dp, cp, nmb = layout
    theta = torch.randn(FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def build(mb, cp_rank):
        return megatron_loss_func(
            factory, batch, num_microbatches=nmb, dp_cp_size=dp * cp, megatron_config=agreeing_config(factory),
            **placement(mb, cp_rank, cp, fmt),
        )

    def output(replica, mb, cp_rank):
        losses = {i: toy_token_loss(step.features[i], replica) for i in mb.samples}
        return local(losses, step, mb, cp_rank, cp, fmt)

    per_token = factory.config.calculate_per_token_loss
    assert per_token == (mode == "token_mean")
    result = run_megatron(step, theta, layout, fmt, per_token, SCHEDULES[schedule], build, output, seed)

    expected, expected_grad = reference_objective(step, theta, mode)
    assert_close(result.value, expected)
    assert_close(result.grad, expected_grad)
    # with the flag every masked token is counted once over micro-batches x DP x CP; without it, 1 per call
    assert result.num_tokens == (sum(map(sum, step.masks)) if per_token else dp * cp * nmb)
    assert megatron_lm_report(result.reports, "pg_loss") == pytest.approx(float(expected), rel=REL)


@pytest.mark.parametrize("mode", ["sample_mean", "token_mean"])
def test_all_masked_step_gives_zero_loss_and_zero_gradient(mode):
    step = random_step(7, all_masked=True)
    with pytest.warns(EmptyStepWarning):
        batch = step.batch()
        factory = factory_for(mode)
        factory.step_weights(batch)
    dp, cp, nmb = layout = (2, 2, 2)
    theta = torch.randn(FEATURES, dtype=torch.float64)

    def build(mb, cp_rank):
        return megatron_loss_func(
            factory, batch, num_microbatches=nmb, dp_cp_size=dp * cp, megatron_config=agreeing_config(factory),
            **placement(mb, cp_rank, cp, "thd"),
        )

    def output(replica, mb, cp_rank):
        return local({i: toy_token_loss(step.features[i], replica) for i in mb.samples}, step, mb, cp_rank, cp, "thd")

    per_token = factory.config.calculate_per_token_loss
    result = run_megatron(step, theta, layout, "thd", per_token, schedule_replica, build, output, seed=7)
    assert float(result.value) == 0.0
    assert torch.equal(result.grad, torch.zeros_like(theta))
    assert result.num_tokens == (0 if per_token else dp * cp * nmb)
    assert megatron_lm_report(result.reports, "pg_loss") == 0.0


# --- the policy loss func: PPO clip, TIS, RS, KL and entropy through the same contract ----------------------

KL_COEF, ENTROPY_COEF = 0.05, 0.01


@dataclass
class PolicyInputs:
    old_logprobs: list[Tensor]
    advantages: list[Tensor]
    ref_logprobs: list[Tensor]
    tis: list[Tensor]
    rs: list[Tensor]


def policy_inputs(step: Step, theta: Tensor, seed: int) -> PolicyInputs:
    gen = torch.Generator().manual_seed(seed)
    logprobs = [toy_logprobs(f, theta).detach() for f in step.features]

    def noise(x: Tensor, scale: float) -> Tensor:
        return scale * torch.randn(x.shape, generator=gen, dtype=x.dtype)

    advantage = torch.randn(step.num_samples, generator=gen, dtype=torch.float64)
    return PolicyInputs(
        old_logprobs=[lp + noise(lp, 0.3) for lp in logprobs],
        advantages=[advantage[i].expand(r).clone() for i, r in enumerate(step.response_lengths)],
        ref_logprobs=[lp + noise(lp, 0.2) for lp in logprobs],
        tis=[0.5 + torch.rand(r, generator=gen, dtype=torch.float64) for r in step.response_lengths],
        rs=[(torch.rand(r, generator=gen) < 0.85).to(torch.float64) for r in step.response_lengths],
    )


def toy_logprobs(features: Tensor, theta: Tensor) -> Tensor:
    return -torch.nn.functional.softplus(features @ theta)


def toy_entropy(features: Tensor, theta: Tensor) -> Tensor:
    return 1.0 + 0.5 * torch.tanh(features @ theta)


def reference_policy_objective(
    step: Step, theta: Tensor, inputs: PolicyInputs, mode: str, pg_units: list[int] | None = None
) -> dict[str, Tensor]:
    """docs/objectives.md per token, docs/aggregation.md aggregation: pg in the mode, KL (k3) and entropy in sample_mean.

    ``pg_units`` replaces the prompt groups in pg_loss's aggregation (trajectory_mean is prompt_mean's
    formula over trajectories, docs/aggregation.md).
    """
    eps_low, eps_high = 0.2, 0.28
    pg, kl, entropy, ppo_kl = [], [], [], []
    for i, f in enumerate(step.features):
        logp = toy_logprobs(f, theta)
        ratio = torch.exp((logp - inputs.old_logprobs[i]).clamp(-20, 20))
        a = inputs.advantages[i]
        token_loss = torch.maximum(-ratio * a, -ratio.clamp(1 - eps_low, 1 + eps_high) * a)
        pg.append(token_loss * inputs.tis[i] * inputs.rs[i])  # RS edits the numerator only (docs/aggregation.md)
        d = logp - inputs.ref_logprobs[i]
        kl.append(torch.exp(-d) - 1 + d)
        entropy.append(toy_entropy(f, theta))
        ppo_kl.append((inputs.old_logprobs[i] - logp).detach())
    terms = {
        "pg_loss": step_objective(pg, step.masks, step.groups if pg_units is None else pg_units, mode),
        "kl_loss": step_objective(kl, step.masks, step.groups, "sample_mean"),
        "entropy": step_objective(entropy, step.masks, step.groups, "sample_mean"),
        "ppo_kl": step_objective(ppo_kl, step.masks, step.groups, "sample_mean"),
    }
    terms["loss"] = terms["pg_loss"] + KL_COEF * terms["kl_loss"] - ENTROPY_COEF * terms["entropy"]
    return terms


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", [(1, 1, 2), (2, 3, 2), (3, 2, 1)], ids=layout_id)
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_func_gradient_is_grad_of_full_loss(mode, layout, fmt):
    seed = 2000 + 10 * MODES.index(mode)
    step = random_step(seed)
    batch = step.batch()
    factory = factory_for(mode, eps_clip=0.2, eps_clip_high=0.28, kl_coef=KL_COEF, entropy_coef=ENTROPY_COEF)
    dp, cp, nmb = layout
    theta = torch.randn(FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    inputs = policy_inputs(step, theta, seed)

    def build(mb, cp_rank):
        def cut(values):
            return local(values, step, mb, cp_rank, cp, fmt)

        return megatron_policy_loss_func(
            factory,
            batch,
            old_logprobs=cut(inputs.old_logprobs),
            advantages=cut(inputs.advantages),
            ref_logprobs=cut(inputs.ref_logprobs),
            tis_weights=cut(inputs.tis),
            rs_mask=cut(inputs.rs),
            num_microbatches=nmb,
            dp_cp_size=dp * cp,
            megatron_config=agreeing_config(factory),
            logprobs_from_output=lambda out: (out[0], out[1]),
            **placement(mb, cp_rank, cp, fmt),
        )

    def output(replica, mb, cp_rank):
        logp = local({i: toy_logprobs(step.features[i], replica) for i in mb.samples}, step, mb, cp_rank, cp, fmt)
        entropy = local({i: toy_entropy(step.features[i], replica) for i in mb.samples}, step, mb, cp_rank, cp, fmt)
        return torch.stack([logp, entropy])

    per_token = factory.config.calculate_per_token_loss
    result = run_megatron(step, theta, layout, fmt, per_token, schedule_replica, build, output, seed)

    replica = theta.detach().clone().requires_grad_(True)
    expected = reference_policy_objective(step, replica, inputs, mode)
    (expected_grad,) = torch.autograd.grad(expected["loss"], replica)
    assert_close(result.value, expected["loss"].detach())
    assert_close(result.grad, expected_grad)
    for key in ("pg_loss", "kl_loss", "entropy", "ppo_kl"):
        assert megatron_lm_report(result.reports, key) == pytest.approx(float(expected[key].detach()), rel=1e-10), key


# --- the contract's details --------------------------------------------------------------------------------


def test_loss_func_returns_megatrons_three_tuple():
    step = random_step(3)
    batch = step.batch()
    values = torch.ones(sum(step.response_lengths[:2]), dtype=torch.float64, requires_grad=True)
    for mode in ("sample_mean", "token_mean"):
        factory = factory_for(mode)
        loss_func = megatron_loss_func(
            factory, batch, sample_indices=[0, 1], num_microbatches=3, dp_cp_size=4,
            megatron_config=agreeing_config(factory),
        )
        loss, num_tokens, report = loss_func(values)
        assert loss.dim() == 0 and loss.requires_grad
        assert num_tokens.dtype == torch.int and num_tokens.dim() == 0
        # token_mean: (masked sum, masked count); otherwise (partial * 3 * 4, 1)
        masked = sum(step.masks[0]) + sum(step.masks[1])
        assert int(num_tokens) == (masked if mode == "token_mean" else 1)
        if mode == "token_mean":
            assert float(loss.detach()) == pytest.approx(masked, rel=REL)
        assert set(report) == {"pg_loss"}
        assert report["pg_loss"].shape == (2,) and not report["pg_loss"].requires_grad
        assert float(report["pg_loss"][1]) == 1.0


def test_loss_func_accepts_a_model_output_mapper():
    step = random_step(4)
    batch = step.batch()
    n = step.response_lengths[2]
    loss_func = megatron_loss_func(
        factory_for("sample_mean"),
        batch,
        sample_indices=[2],
        num_microbatches=1,
        dp_cp_size=1,
        megatron_config=agreeing_config(factory_for("sample_mean")),
        values_from_output=lambda out: out[:, 0],
    )
    loss, _, _ = loss_func(torch.ones(n, 2, dtype=torch.float64))
    # one sample of 14 with |o| > 0 masked tokens, all values 1  ->  (1/14) * |o| / |o|
    assert float(loss) == pytest.approx(1 / 14 if sum(step.masks[2]) else 0.0, rel=REL)


def test_local_values_of_the_wrong_length_are_rejected():
    step = random_step(5)
    factory = factory_for("sample_mean")
    loss_func = megatron_loss_func(
        factory, step.batch(), sample_indices=[0], num_microbatches=1, dp_cp_size=1,
        megatron_config=agreeing_config(factory),
    )
    with pytest.raises(ValueError, match="local_values must be a 1-D tensor"):
        loss_func(torch.ones(step.response_lengths[0] + 1, dtype=torch.float64))


@pytest.mark.parametrize("field, value", [("num_microbatches", 0), ("dp_cp_size", -2), ("dp_cp_size", 2.0)])
def test_bad_sizes_are_rejected(field, value):
    sizes = {"num_microbatches": 1, "dp_cp_size": 1, field: value}
    factory = factory_for("sample_mean")
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        megatron_loss_func(factory, random_step(6).batch(), megatron_config=agreeing_config(factory), **sizes)


@pytest.mark.parametrize(
    "mode, megatron_flag, message",
    [
        ("token_mean", False, "set Megatron's calculate_per_token_loss=true"),
        ("sample_mean", True, "set Megatron's calculate_per_token_loss=false or use aggregation=token_mean"),
        ("constant", True, "got aggregation=constant"),
    ],
)
def test_megatron_flag_must_match_the_loss_config(mode, megatron_flag, message):
    factory = factory_for(mode)
    with pytest.raises(ValueError, match=message):
        check_megatron_config(factory, SimpleNamespace(calculate_per_token_loss=megatron_flag))
    with pytest.raises(ValueError, match=message):
        megatron_loss_func(
            factory,
            random_step(8).batch(),
            num_microbatches=1,
            dp_cp_size=1,
            megatron_config=SimpleNamespace(calculate_per_token_loss=megatron_flag),
        )


def test_megatron_config_without_the_flag_is_rejected():
    with pytest.raises(ValueError, match="no calculate_per_token_loss attribute"):
        check_megatron_config(factory_for("sample_mean"), object())


@pytest.mark.parametrize("build", [megatron_loss_func, megatron_policy_loss_func])
def test_megatron_config_is_a_required_argument(build):
    # without it, a disagreeing calculate_per_token_loss would train on a wrong gradient with no error
    factory, batch = factory_for("token_mean"), random_step(8).batch()
    inputs = {"old_logprobs": torch.zeros(1), "advantages": torch.zeros(1)} if build is megatron_policy_loss_func else {}
    with pytest.raises(TypeError, match="megatron_config"):
        build(factory, batch, num_microbatches=1, dp_cp_size=1, **inputs)
    with pytest.raises(ValueError, match="megatron_config has no calculate_per_token_loss attribute"):
        build(factory, batch, num_microbatches=1, dp_cp_size=1, megatron_config=None, **inputs)


@pytest.mark.parametrize("mode", MODES)
def test_matching_transformer_config_is_accepted(mode):
    pytest.importorskip("megatron.core")
    factory = factory_for(mode)
    check_megatron_config(factory, megatron_transformer_config(factory.config.calculate_per_token_loss))


def test_rl_loss_imports_without_megatron_core():
    code = (
        "import sys, rl_loss, rl_loss.integrations.megatron; "
        "assert not any(m == 'megatron' or m.startswith('megatron.') for m in sys.modules), 'megatron imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- megatron-core's real schedule, DDP and finalize_model_grads on one GPU ----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_single_gpu():
    """torch.distributed (NCCL, world size 1, TCP store on localhost) and megatron-core's parallel_state."""
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield parallel_state
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


class _TinyPolicy(torch.nn.Module):
    """A per-token loss model: tanh(features @ w), the minimum megatron-core's schedule asks of a model."""

    def __init__(self, config, features: int):
        from megatron.core.enums import ModelType

        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.proj = torch.nn.Linear(features, 1, bias=False, device="cuda", dtype=torch.float32)

    def set_input_tensor(self, input_tensor) -> None:  # no pipeline stage before this one
        pass

    def forward(self, features: Tensor) -> Tensor:
        return torch.tanh(self.proj(features)).squeeze(-1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: megatron-core's schedule allocates on CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_real_megatron_schedule_on_one_gpu_gives_grad_of_step_objective(mode, megatron_single_gpu):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    factory = factory_for(mode)
    per_token = factory.config.calculate_per_token_loss
    config = new_transformer_config(per_token)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), _TinyPolicy(config, FEATURES))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    ddp.zero_grad_buffer()

    step = random_step(11)
    batch = step.batch()
    num_microbatches = 3
    micro_batches = partition(step, 1, 1, num_microbatches, seed=11)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        features = torch.cat([step.features[i] for i in mb.samples]).to("cuda", torch.float32)
        loss_func = megatron_loss_func(
            factory,
            batch,
            sample_indices=mb.samples,
            num_microbatches=num_microbatches,
            dp_cp_size=megatron_single_gpu.get_data_parallel_world_size(with_context_parallel=True),
            cp_rank=megatron_single_gpu.get_context_parallel_rank(),
            cp_size=megatron_single_gpu.get_context_parallel_world_size(),
            megatron_config=config,
        )
        return model(features), loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[ddp],
        num_microbatches=num_microbatches,
        seq_length=max(step.total_lengths),
        micro_batch_size=1,
        forward_only=False,
    )
    grad = ddp.module.proj.weight.main_grad.detach().double().cpu().reshape(-1)

    w = ddp.module.proj.weight.detach().double().cpu().reshape(-1).requires_grad_(True)
    objective = step_objective([torch.tanh(f @ w) for f in step.features], step.masks, step.groups, mode)
    (expected_grad,) = torch.autograd.grad(objective, w)
    assert_close(grad, expected_grad, rel=1e-5)
    reduced = torch.vstack([r["pg_loss"].view(-1) for r in reports]).sum(dim=0).cpu()
    assert float(reduced[0] / reduced[1]) == pytest.approx(float(objective.detach()), rel=1e-5)


def test_no_warnings_leak_from_a_normal_step():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = random_step(9)
        factory = factory_for("prompt_mean")
        loss_func = megatron_loss_func(
            factory, step.batch(), num_microbatches=1, dp_cp_size=1, megatron_config=agreeing_config(factory)
        )
        loss_func(torch.zeros(sum(step.response_lengths), dtype=torch.float64))
