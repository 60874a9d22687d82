"""Peer parity of the aggregation modes: rl-loss against liger-kernel's installed ``LigerFusedLinearGRPOLoss``.

liger-kernel implements TRL's GRPO ``loss_type`` normalisations (grpo, bnpo, dr_grpo, dapo, ...) on top of a
fused lm-head. Both sides here start from the same leaves — hidden states ``h`` (B, W, H) and an lm-head
weight ``U`` (V, H), float64 — and the same tokens, loss masks, advantages and old log-probs:

- liger (``compiled=False``, CPU) computes its log-probs in float32 internally, its PPO clip and its
  ``loss_type`` normalisation, and returns the loss and the gradients of ``h`` and ``U``;
- rl-loss computes float64 log-probs ``log_softmax(h U^T)[token]``, the per-token loss with
  :func:`rl_loss.policy_loss` and the configured :class:`~rl_loss.StepBatch` reducers, and autograd gives
  the gradients of ``h`` and ``U``.

TRL's gradient-accumulation convention is reproduced on the liger side: a step of N samples is split into
GA micro-batches of N / GA samples (``per_device_train_batch_size``), each liger loss is divided by GA
(grpo, bnpo, dr_grpo: ``GRPOTrainer._compute_loss``), and dapo gets ``num_items_in_batch`` = the step's
token count (TRL with ``steps_per_generation == gradient_accumulation_steps`` and one process).

Errors: the value error is ``|ours - liger| / sum_{i,t} |w l|`` (the objective's size without sign
cancellation: advantages of both signs can make the objective itself nearly 0); the gradient error is the
largest absolute difference over the largest absolute entry of our gradient, for ``h`` and ``U`` each.
Run with ``-s`` to print the largest errors seen.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

from rl_loss import EmptyStepWarning, LossConfig, ReducerFactory, StepBatch, clipped_pg_loss, policy_loss

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

# liger's log-probs are float32: ~1e-7 relative per token; the objective and its gradient sum many of them
TOLERANCE = 1e-5
MAX_COMPLETION_LENGTH = 16  # TRL's max_completion_length: the padded width W never exceeds it
PARITY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MAX_ERROR: dict[str, float] = {}


# --- one step of samples, as both sides see it ---------------------------------------------------------


@dataclass
class Batch:
    """N samples of a step: response lengths R_i, padded width W = max R_i, and the leaves h, U."""

    lengths: list[int]
    masks: torch.Tensor  # (N, W) 0/1 loss masks, 0 past R_i (padding)
    tokens: torch.Tensor  # (N, W) response token ids
    hidden: torch.Tensor  # (N, W, H) float64 leaf
    weight: torch.Tensor  # (V, H) float64 leaf
    old_logprobs: torch.Tensor  # (N, W) float64, from a perturbed lm-head (ratios spread past the clip)
    advantages: torch.Tensor  # (N,) float64, both signs

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    def step(self) -> StepBatch:
        return StepBatch(
            response_lengths=self.lengths,
            total_lengths=[r + 3 for r in self.lengths],
            loss_masks=[self.masks[i, :r] for i, r in enumerate(self.lengths)],
        )

    def flat(self, per_token: torch.Tensor) -> torch.Tensor:
        """(N, W) -> the step's flat order: sample by sample, its R_i response tokens."""
        return torch.cat([per_token[i, :r] for i, r in enumerate(self.lengths)])

    def rows(self, start: int, end: int) -> Batch:
        """Samples [start, end) as a batch of their own (views: gradients reach this batch's leaves)."""
        width = max(self.lengths[start:end])
        return Batch(
            self.lengths[start:end], self.masks[start:end, :width], self.tokens[start:end, :width],
            self.hidden[start:end, :width], self.weight, self.old_logprobs[start:end, :width], self.advantages[start:end],
        )  # fmt: skip


def make_batch(seed: int, num_samples: int, max_len: int, vocab: int = 13, width: int = 8,
               lengths: list[int] | None = None) -> Batch:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, max_len + 1, (num_samples,), generator=gen).tolist()
    padded = max(lengths)
    position = torch.arange(padded).expand(num_samples, padded)
    inside = position < torch.tensor(lengths).unsqueeze(1)
    masks = (inside & (torch.rand(num_samples, padded, generator=gen) < 0.75)).double()
    if num_samples > 2:
        masks[1] = 0.0  # a fully masked sample: no token, still one of the N samples
        masks[2] = inside[2].double()  # every response token active
    tokens = torch.randint(0, vocab, (num_samples, padded), generator=gen)
    hidden = (0.7 * torch.randn(num_samples, padded, width, generator=gen, dtype=torch.float64)).requires_grad_()
    weight = (0.7 * torch.randn(vocab, width, generator=gen, dtype=torch.float64)).requires_grad_()
    old_weight = weight.detach() + 0.15 * torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    old_logprobs = token_logprobs(hidden.detach(), old_weight, tokens)
    advantages = torch.randn(num_samples, generator=gen, dtype=torch.float64)
    return Batch(lengths, masks, tokens, hidden, weight, old_logprobs, advantages)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# --- the two sides ------------------------------------------------------------------------------------------


def liger_step(batch: Batch, loss_type: str, accumulation: int, eps_low: float, eps_high: float, chunk_size: int,
               num_items_in_batch: int | None = None) -> torch.Tensor:  # fmt: skip
    """liger's loss of a step, summed over TRL-style micro-batches (/ GA except dapo, see the module doc)."""
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=False, use_ref_model=False, chunk_size=chunk_size, epsilon_low=eps_low,
        epsilon_high=eps_high, loss_type=loss_type, max_completion_length=MAX_COMPLETION_LENGTH,
    )  # fmt: skip
    per_micro = batch.num_samples // accumulation
    total = batch.hidden.new_zeros(())
    for start in range(0, batch.num_samples, per_micro):
        rows = slice(start, start + per_micro)
        loss, _ = loss_fn(
            batch.hidden[rows], batch.weight, batch.tokens[rows], batch.masks[rows], batch.advantages[rows],
            old_per_token_logps=batch.old_logprobs[rows], num_items_in_batch=num_items_in_batch,
        )  # fmt: skip
        total = total + (loss if loss_type == "dapo" else loss / accumulation)
    return total


def our_step(batch: Batch, config: LossConfig, accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rl-loss's step objective (summed partials of the same micro-batches) and its size sum |w l|."""
    factory = ReducerFactory(config)
    step = batch.step()
    logprobs = batch.flat(token_logprobs(batch.hidden, batch.weight, batch.tokens))
    old = batch.flat(batch.old_logprobs)
    advantages = torch.repeat_interleave(batch.advantages, torch.tensor(batch.lengths))
    per_micro = batch.num_samples // accumulation
    total = batch.hidden.new_zeros(())
    size = 0.0
    for start in range(0, batch.num_samples, per_micro):
        samples = list(range(start, start + per_micro))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyStepWarning)  # a draw may mask every token: both give 0
            pg = factory.pg_reducer(step, samples)
        metric = factory.metric_reducer(step, samples)
        index = pg.token_index
        loss, metrics = policy_loss(logprobs[index], old[index], advantages[index], pg, metric, config)
        total = total + loss
        per_token, _, _ = clipped_pg_loss(logprobs[index].detach(), old[index], advantages[index],
                                          config.clip_low, config.clip_high)  # fmt: skip
        size += float(pg(per_token.abs()))
    return total, torch.tensor(size)


def compare(batch: Batch, ours: torch.Tensor, size: torch.Tensor, theirs: torch.Tensor, label: str) -> dict:
    ours_grads = torch.autograd.grad(ours, (batch.hidden, batch.weight))
    their_grads = torch.autograd.grad(theirs, (batch.hidden, batch.weight))
    errors = {"value": abs(float(ours.detach()) - float(theirs.detach())) / max(float(size), 1e-300)}
    for name, a, b in zip(("grad_h", "grad_U"), ours_grads, their_grads, strict=True):
        scale = float(a.abs().max())
        errors[name] = float((a - b).abs().max()) / scale if scale else float((a - b).abs().max())
    for key, value in errors.items():
        MAX_ERROR[f"{label}/{key}"] = max(MAX_ERROR.get(f"{label}/{key}", 0.0), value)
    return errors


@st.composite
def parity_cases(draw):
    num_samples = draw(st.integers(1, 8), label="N")
    accumulation = draw(st.sampled_from([d for d in range(1, num_samples + 1) if num_samples % d == 0]), label="GA")
    max_len = draw(st.integers(1, 12), label="max R_i")
    eps_low = draw(st.sampled_from([0.1, 0.2]), label="epsilon_low")
    eps_high = draw(st.sampled_from([0.2, 0.28]), label="epsilon_high")
    chunk_size = draw(st.sampled_from([1, 2, 8]), label="liger chunk_size")
    seed = draw(st.integers(0, 2**31 - 1))
    return make_batch(seed, num_samples, max_len), accumulation, eps_low, eps_high, chunk_size


def assert_parity(errors: dict, case: str) -> None:
    for key, value in errors.items():
        assert value <= TOLERANCE, (case, key, value)


# --- the parity rows ------------------------------------------------------------------------------------------


@PARITY_SETTINGS
@given(case=parity_cases())
def test_trl_grpo_is_sample_mean(case):
    # TRL/liger grpo: per micro-batch, the mean over its samples of each sample's token mean, / GA
    batch, accumulation, eps_low, eps_high, chunk = case
    config = LossConfig(aggregation="sample_mean", eps_clip=eps_low, eps_clip_high=eps_high)
    ours, size = our_step(batch, config, accumulation)
    theirs = liger_step(batch, "grpo", accumulation, eps_low, eps_high, chunk)
    assert_parity(compare(batch, ours, size, theirs, "grpo=sample_mean"), "grpo")


@PARITY_SETTINGS
@given(case=parity_cases())
def test_trl_dr_grpo_is_constant_with_max_completion_length(case):
    # TRL/liger dr_grpo: masked sum / (micro-batch samples * max_completion_length), / GA
    batch, accumulation, eps_low, eps_high, chunk = case
    config = LossConfig(aggregation="constant", divisor=MAX_COMPLETION_LENGTH, eps_clip=eps_low, eps_clip_high=eps_high)
    ours, size = our_step(batch, config, accumulation)
    theirs = liger_step(batch, "dr_grpo", accumulation, eps_low, eps_high, chunk)
    assert_parity(compare(batch, ours, size, theirs, "dr_grpo=constant"), "dr_grpo")


@PARITY_SETTINGS
@given(case=parity_cases())
def test_trl_dapo_is_token_mean(case):
    # TRL/liger dapo: masked sum / num_items_in_batch (the step's tokens), no GA division
    batch, accumulation, eps_low, eps_high, chunk = case
    config = LossConfig(aggregation="token_mean", eps_clip=eps_low, eps_clip_high=eps_high)
    ours, size = our_step(batch, config, accumulation)
    step_tokens = int(batch.masks.sum())
    theirs = liger_step(batch, "dapo", accumulation, eps_low, eps_high, chunk, num_items_in_batch=step_tokens)
    assert_parity(compare(batch, ours, size, theirs, "dapo=token_mean"), "dapo")


@PARITY_SETTINGS
@given(case=parity_cases())
def test_trl_bnpo_in_one_micro_batch_is_token_mean(case):
    # TRL/liger bnpo: the micro-batch's own token mean; with the whole step in one micro-batch, token_mean
    batch, _, eps_low, eps_high, chunk = case
    config = LossConfig(aggregation="token_mean", eps_clip=eps_low, eps_clip_high=eps_high)
    ours, size = our_step(batch, config, accumulation=1)
    theirs = liger_step(batch, "bnpo", 1, eps_low, eps_high, chunk)
    assert_parity(compare(batch, ours, size, theirs, "bnpo(GA=1)=token_mean"), "bnpo")


def test_trl_bnpo_over_micro_batches_is_a_per_micro_batch_token_mean_not_a_step_mode():
    # bnpo divides each micro-batch by its own token count. Micro-batches {0, 1} with 2 + 1 = 3 active tokens
    # and {2, 3} with 4 + 5 = 9: under bnpo a token of the first weighs 1 / (2 * 3) = 1/6, of the second
    # 1 / (2 * 9) = 1/18; under token_mean every token weighs 1/12. liger equals token_mean taken over each
    # micro-batch as if it were a step (/ GA), and differs from the step's token_mean.
    batch = make_batch(seed=3, num_samples=4, max_len=0, lengths=[3, 2, 6, 5])
    batch.masks.zero_()
    for i, active in enumerate((2, 1, 4, 5)):
        batch.masks[i, :active] = 1.0
    config = LossConfig(aggregation="token_mean")
    theirs = liger_step(batch, "bnpo", 2, 0.2, 0.2, 1)
    per_micro = [our_step(batch.rows(s, s + 2), config, accumulation=1) for s in (0, 2)]
    as_steps = sum(value for value, _ in per_micro) / 2
    size = sum(float(size) for _, size in per_micro) / 2
    assert_parity(compare(batch, as_steps, torch.tensor(size), theirs, "bnpo(GA=2)=token_mean per micro-batch"), "bnpo")
    step_value, step_size = our_step(batch, config, accumulation=2)
    assert abs(float(step_value.detach()) - float(theirs.detach())) / float(step_size) > 1e-2


def test_parity_summary_reports_largest_errors(report_summary):
    """Prints the largest errors seen by this file's parity properties."""
    if not MAX_ERROR:
        pytest.skip("the parity tests of this module did not run in this session")
    assert max(MAX_ERROR.values()) <= TOLERANCE
    report_summary("[peer parity vs liger-kernel] max error: " + ", ".join(f"{k}={v:.2g}" for k, v in sorted(MAX_ERROR.items())))
