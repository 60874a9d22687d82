"""The embedded toy environment: task rewards, rollouts, and context-parallel exactness of the policy."""

from __future__ import annotations

import math

import pytest
import torch

from launchers.backends.toy import (
    DigitSumTask,
    ModelConfig,
    ToyPolicy,
    cp_batch,
    generate,
    local_logprobs,
    run_simulated_cp,
)
from launchers.backends.toy.rollout import sample_rollout
from launchers.backends.toy.task import BOS_ID, EOS_ID, SEP_ID
from rl_loss import LossConfig, ReducerFactory, StepBatch, local_response_ranges

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

TASK = DigitSumTask()


def _model(dtype: torch.dtype = torch.float32, seed: int = 0, **sizes) -> ToyPolicy:
    torch.manual_seed(seed)
    # a larger init than training uses, so attention weights are far from uniform and a wrong
    # mask or a misplaced key shows in the numbers
    config = ModelConfig.for_task(TASK, **{"d_model": 32, "n_layers": 2, "n_heads": 4, "init_std": 0.3, **sizes})
    return ToyPolicy(config).to(dtype)


# ---------------------------------------------------------------------------------------------- task


def test_prompt_encoding_round_trips():
    assert TASK.encode_prompt(7) == [BOS_ID, 0, 7, SEP_ID]
    assert TASK.encode_prompt(40) == [BOS_ID, 4, 0, SEP_ID]
    assert TASK.target_of(TASK.encode_prompt(37)) == 37
    assert len(TASK.encode_prompt(3)) == TASK.max_prompt_len


@pytest.mark.parametrize(
    ("target", "response", "expected"),
    [
        (7, [3, 4, EOS_ID], 1.0),  # exact: full closeness + bonus
        (7, [3, EOS_ID], 0.75 * math.exp(-4 / 5)),  # 4 short
        (7, [9, EOS_ID], 0.75 * math.exp(-2 / 5)),  # 2 over
        (7, [EOS_ID], 0.75 * math.exp(-7 / 5)),  # empty answer
        (25, [9, 9, 7, EOS_ID], 1.0),
        (25, [9] * 12, 0.0),  # truncated: no EOS
        (25, [9, 9, 7], 0.0),  # no EOS
        (25, [9, BOS_ID, 7, EOS_ID], 0.0),  # a non-digit before EOS
    ],
)
def test_reward_hand_checked(target, response, expected):
    assert TASK.reward(TASK.encode_prompt(target), response) == pytest.approx(expected, abs=1e-12)


def test_reward_in_unit_interval_and_scale_parameters():
    task = DigitSumTask(scale=10.0, exact_bonus=0.0)
    assert task.reward(task.encode_prompt(20), [9, EOS_ID]) == pytest.approx(math.exp(-1.1))
    prompt = TASK.encode_prompt(30)
    for digits in ([], [1], [9, 9, 9], [9] * 11):
        assert 0.0 <= TASK.reward(prompt, [*digits, EOS_ID]) <= 1.0
    assert "digit-sum" in TASK.describe()


def test_sample_prompts_deterministic_and_in_range():
    a = TASK.sample_prompts(64, torch.Generator().manual_seed(3))
    b = TASK.sample_prompts(64, torch.Generator().manual_seed(3))
    c = TASK.sample_prompts(64, torch.Generator().manual_seed(4))
    assert a == b and a != c
    targets = [TASK.target_of(p) for p in a]
    assert all(TASK.target_min <= t <= TASK.target_max for t in targets)
    assert len(set(targets)) > 10


@pytest.mark.parametrize(
    "kwargs", [{"max_response_len": 1}, {"target_min": 0}, {"target_max": 100}, {"scale": 0.0}, {"exact_bonus": 1.5}]
)
def test_invalid_task_rejected(kwargs):
    with pytest.raises(ValueError):
        DigitSumTask(**kwargs)


# ------------------------------------------------------------------------------------------- rollout


def test_rollout_deterministic_for_a_seed():
    model = _model()
    a = sample_rollout(model, TASK, 8, 4, torch.Generator().manual_seed(11))
    b = sample_rollout(model, TASK, 8, 4, torch.Generator().manual_seed(11))
    c = sample_rollout(model, TASK, 8, 4, torch.Generator().manual_seed(12))
    assert a.prompts == b.prompts and a.responses == b.responses
    assert all(torch.equal(x, y) for x, y in zip(a.rollout_logprobs, b.rollout_logprobs, strict=True))
    assert torch.equal(a.rewards, b.rewards)
    assert a.responses != c.responses


def test_responses_end_with_eos_or_hit_max_length():
    task = DigitSumTask(max_response_len=6)
    model = _model(init_std=0.02)  # near-uniform policy: both endings occur
    rollout = sample_rollout(model, task, 16, 8, torch.Generator().manual_seed(0))
    lengths = rollout.response_lengths
    assert all(1 <= r <= 6 for r in lengths)
    for resp in rollout.responses:
        assert resp[-1] == EOS_ID or len(resp) == 6
        assert EOS_ID not in resp[:-1]  # nothing is generated after EOS
    assert any(r[-1] == EOS_ID for r in rollout.responses) and any(r[-1] != EOS_ID for r in rollout.responses)
    assert len(set(lengths)) > 2  # lengths vary, so the aggregation modes differ
    assert rollout.group_index == [g for g in range(16) for _ in range(8)]
    assert rollout.total_lengths == [len(p) + r for p, r in zip(rollout.prompts, lengths, strict=True)]
    assert all(
        torch.equal(m, torch.ones(r, dtype=torch.float64)) for m, r in zip(rollout.loss_masks, lengths, strict=True)
    )
    assert all(
        lp.shape == (r,) and bool((lp <= 0).all()) for lp, r in zip(rollout.rollout_logprobs, lengths, strict=True)
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_match_training_logprobs(temperature):
    """The KV-cached decode scores tokens exactly as the full-sequence training path does."""
    model = _model(torch.float64)
    prompts = TASK.sample_prompts(6, torch.Generator().manual_seed(5))
    rollout = generate(model, prompts, 4, TASK.max_response_len, torch.Generator().manual_seed(5), temperature)
    with torch.no_grad():
        logprobs, _ = local_logprobs(model, rollout.sequences, rollout.response_lengths, temperature=temperature)
    torch.testing.assert_close(logprobs, torch.cat(rollout.rollout_logprobs), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ context parallel


def _random_batch(seed: int = 0, n: int = 7) -> tuple[list[list[int]], list[int]]:
    """Samples with varied T_i and R_i, including a one-token prompt and a one-token response."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 1), (17, 16), (9, 1), (13, 5)] + [
        (t, int(torch.randint(1, t, (1,), generator=g))) for t in torch.randint(2, 18, (n - 4,), generator=g).tolist()
    ]
    sequences = []
    for total, resp in shapes:
        prompt = torch.randint(0, TASK.vocab_size, (total - resp,), generator=g).tolist()
        response = torch.randint(0, TASK.num_actions, (resp,), generator=g).tolist()
        sequences.append(prompt + response)
    return sequences, [r for _, r in shapes]


def _flat_index(sequences, response_lengths, cp_rank, cp_size, fmt, max_seq_len) -> list[int]:
    """Where each of a rank's local values sits in the step's flat order, from rl_loss's layout."""
    index, offset = [], 0
    for seq, r in zip(sequences, response_lengths, strict=True):
        for a, b in local_response_ranges(len(seq), r, cp_rank, cp_size, fmt, max_seq_len):
            index.extend(range(offset + a, offset + b))
        offset += r
    return index


@pytest.mark.parametrize("fmt", ["thd", "bshd"])
@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_cp_logprobs_and_grads_equal_non_cp(fmt, cp_size):
    model = _model(torch.float64)
    sequences, resp_lens = _random_batch()
    max_seq_len = max(len(s) for s in sequences) + 1 if fmt == "bshd" else None  # +1: a padded column
    step = StepBatch(
        resp_lens, [len(s) for s in sequences], [torch.ones(r) for r in resp_lens], list(range(len(resp_lens)))
    )
    factory = ReducerFactory(LossConfig(aggregation="token_mean"))
    coef = torch.linspace(-1.0, 2.0, sum(resp_lens), dtype=torch.float64)  # token-specific, so order matters

    model.zero_grad()
    ref_lp, ref_ent = local_logprobs(model, sequences, resp_lens)
    ref_loss = factory.pg_reducer(step)(ref_lp * coef) + factory.metric_reducer(step)(ref_ent)
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()

    def rank_fn(rank, exchange):
        lp, ent = local_logprobs(model, sequences, resp_lens, rank, cp_size, fmt, max_seq_len, exchange)
        idx = _flat_index(sequences, resp_lens, rank, cp_size, fmt, max_seq_len)
        pg = factory.pg_reducer(step, cp_rank=rank, cp_size=cp_size, qkv_format=fmt, max_seq_len=max_seq_len)
        metric = factory.metric_reducer(step, cp_rank=rank, cp_size=cp_size, qkv_format=fmt, max_seq_len=max_seq_len)
        return lp, ent, idx, pg(lp * coef[idx]) + metric(ent)

    results = run_simulated_cp(cp_size, rank_fn)
    lp, ent = torch.full_like(ref_lp, float("nan")), torch.full_like(ref_ent, float("nan"))
    for rank_lp, rank_ent, idx, _ in results:
        lp[idx], ent[idx] = rank_lp.detach(), rank_ent.detach()
    torch.testing.assert_close(lp, ref_lp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-12, atol=1e-12)

    total = sum(r[3] for r in results)
    torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-12, atol=0)
    total.backward()
    for p, ref in zip(model.parameters(), ref_grads, strict=True):
        assert float((p.grad - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


@pytest.mark.parametrize(("fmt", "cp_size"), [("thd", 3), ("bshd", 4)])
def test_cp_batch_scores_exactly_the_ranks_response_tokens(fmt, cp_size):
    sequences, resp_lens = _random_batch(seed=1)
    max_seq_len = max(len(s) for s in sequences) if fmt == "bshd" else None
    for rank in range(cp_size):
        batch = cp_batch(sequences, resp_lens, rank, cp_size, fmt, max_seq_len)
        for i, (seq, r) in enumerate(zip(sequences, resp_lens, strict=True)):
            ranges = local_response_ranges(len(seq), r, rank, cp_size, fmt, max_seq_len)
            expected = [seq[len(seq) - r + j] for a, b in ranges for j in range(a, b)]
            assert batch.labels[i][batch.score_mask[i]].tolist() == expected


def test_simulated_cp_propagates_errors_and_requires_exchange():
    model = _model(torch.float64)
    sequences, resp_lens = _random_batch()
    with pytest.raises(ValueError, match="kv_exchange"):
        local_logprobs(model, sequences, resp_lens, 0, 2, "thd")

    def fn(rank, exchange):
        if rank == 1:
            raise RuntimeError("rank 1 failed")
        return local_logprobs(model, sequences, resp_lens, rank, 2, "thd", None, exchange)

    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_simulated_cp(2, fn)
