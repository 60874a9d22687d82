"""Group-relative advantages (docs/objectives.md), with expected numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_loss import group_advantages

EPS = 1e-6


def test_grpo_divides_by_unbiased_group_std_plus_eps():
    # rewards [1, 2, 3, 6]: mean 3, centred [-2, -1, 0, 3], sum of squares 14
    # unbiased std = sqrt(14 / 3) (the biased one would be sqrt(14 / 4))
    std = math.sqrt(14 / 3)
    got = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64), [0, 0, 0, 0], "grpo", EPS)
    assert got.tolist() == pytest.approx([c / (std + EPS) for c in (-2.0, -1.0, 0.0, 3.0)], rel=1e-12)


def test_drgrpo_subtracts_group_mean_without_std_division():
    # rewards [1, 2, 3, 6]: mean 3 -> [-2, -1, 0, 3]
    got = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64), [0, 0, 0, 0], "drgrpo")
    assert got.tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0], rel=1e-12)


def test_statistics_are_taken_per_group_over_interleaved_members():
    # group 5 = positions 0, 2, 4, rewards [1, 2, 3]: mean 2, centred [-1, 0, 1], unbiased std sqrt(2/2) = 1
    # group 9 = positions 1, 3, 5, rewards [10, 20, 30]: mean 20, centred [-10, 0, 10], std sqrt(200/2) = 10
    rewards = torch.tensor([1.0, 10.0, 2.0, 20.0, 3.0, 30.0], dtype=torch.float64)
    got = group_advantages(rewards, [5, 9, 5, 9, 5, 9], "grpo", EPS)
    expected = [-1 / (1 + EPS), -10 / (10 + EPS), 0.0, 0.0, 1 / (1 + EPS), 10 / (10 + EPS)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_group_mean_uses_the_whole_group_not_a_slice_of_it():
    # group {1, 2, 3, 6} held as two micro-batches [1, 6] and [2, 3]: each member is centred on the
    # whole-group mean 3 (a slice mean would be 3.5 resp. 2.5) -> drgrpo [-2, 3, -1, 0]
    rewards = torch.tensor([1.0, 6.0, 2.0, 3.0], dtype=torch.float64)
    got = group_advantages(rewards, [0, 0, 0, 0], "drgrpo")
    assert got.tolist() == pytest.approx([-2.0, 3.0, -1.0, 0.0], rel=1e-12)


def test_single_sample_group_gets_zero_advantage():
    # a group of one: centred reward 0, std taken as 0 -> 0 / (0 + eps) = 0, never NaN
    got = group_advantages(torch.tensor([4.0, 1.0, 3.0], dtype=torch.float64), [0, 1, 1], "grpo", EPS)
    assert got[0].item() == 0.0


def test_identical_rewards_give_zero_advantage():
    # centred [0, 0, 0], std 0 -> 0 / eps = 0
    got = group_advantages(torch.tensor([0.7, 0.7, 0.7]), [2, 2, 2], "grpo", EPS)
    assert got.tolist() == [0.0, 0.0, 0.0]


def test_grpo_batch_std_divides_group_centred_rewards_by_their_batch_std():
    # group 0 = [1, 3]: mean 2, centred [-1, 1];  group 1 = [0, 4, 8]: mean 4, centred [-4, 0, 4]
    # centred over the batch: [-1, 1, -4, 0, 4], sum of squares 1 + 1 + 16 + 0 + 16 = 34, N = 5
    # unbiased batch std = sqrt(34 / 4) = sqrt(8.5)  (the biased one would be sqrt(34 / 5))
    std_b = math.sqrt(8.5)
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0, 8.0], dtype=torch.float64)
    got = group_advantages(rewards, [0, 0, 1, 1, 1], "grpo_batch_std", EPS)
    assert got.tolist() == pytest.approx([c / (std_b + EPS) for c in (-1.0, 1.0, -4.0, 0.0, 4.0)], rel=1e-12)


def test_grpo_batch_std_is_one_scale_for_every_group():
    # the same rollout as above under grpo divides each group by its own std: group 0 by sqrt(2), group 1 by 4;
    # under grpo_batch_std both groups share sqrt(8.5), so A_i / (r_i - mean_g) is one constant
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0, 8.0], dtype=torch.float64)
    got = group_advantages(rewards, [0, 0, 1, 1, 1], "grpo_batch_std", EPS)
    centred = torch.tensor([-1.0, 1.0, -4.0, 4.0], dtype=torch.float64)
    scales = got[[0, 1, 2, 4]] / centred
    assert torch.allclose(scales, scales[0].expand(4), rtol=1e-12)
    assert float(scales[0]) == pytest.approx(1 / (math.sqrt(8.5) + EPS), rel=1e-12)


def test_grpo_batch_std_of_a_single_sample_is_zero_not_nan():
    # one sample: centred 0, batch std taken as 0 -> 0 / eps = 0
    got = group_advantages(torch.tensor([5.0], dtype=torch.float64), [0], "grpo_batch_std", EPS)
    assert got.tolist() == [0.0]


def test_advantages_keep_the_rewards_dtype():
    assert group_advantages(torch.tensor([1.0, 2.0], dtype=torch.float32), [0, 0]).dtype == torch.float32


def test_unknown_estimator_is_rejected_naming_it():
    with pytest.raises(ValueError, match=r"estimator must be one of grpo, drgrpo, grpo_batch_std \(got 'ppo'\)"):
        group_advantages(torch.tensor([1.0, 2.0]), [0, 0], "ppo")


def test_non_finite_reward_is_rejected():
    with pytest.raises(ValueError, match=r"rewards must be finite"):
        group_advantages(torch.tensor([1.0, math.nan]), [0, 0])


def test_group_index_of_wrong_length_is_rejected_naming_counts():
    with pytest.raises(ValueError, match=r"one entry per reward \(3\) \(got 2\)"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), [0, 0])


@st.composite
def rollouts(draw):
    n = draw(st.integers(1, 16))
    # quarter-integer rewards (0/1-like, as verifiers give): a group's std is 0 exactly or well above eps
    rewards = [k / 4 for k in draw(st.lists(st.integers(-8, 8), min_size=n, max_size=n))]
    groups = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    order = draw(st.permutations(range(n)))
    return rewards, groups, order, draw(st.sampled_from(["grpo", "drgrpo"]))


@settings(max_examples=100, deadline=None)
@given(rollout=rollouts())
def test_advantage_of_a_sample_depends_only_on_its_whole_group(rollout):
    # reordering the rollout (as micro-batching / DP / CP sharding does) permutes the advantages, and each
    # one equals the advantage computed from its group's rewards alone
    rewards, groups, order, estimator = rollout
    r = torch.tensor(rewards, dtype=torch.float64)
    full = group_advantages(r, groups, estimator, EPS)
    permuted = group_advantages(r[list(order)], [groups[i] for i in order], estimator, EPS)
    assert torch.allclose(permuted, full[list(order)], rtol=1e-12, atol=1e-12)
    for g in set(groups):
        members = [i for i in range(len(groups)) if groups[i] == g]
        alone = group_advantages(r[members], [g] * len(members), estimator, EPS)
        assert torch.allclose(alone, full[members], rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(rollout=rollouts())
def test_grpo_batch_std_permutes_with_the_rollout(rollout):
    # the batch std is a statistic of the whole rollout: any reordering of it permutes the advantages
    rewards, groups, order, _ = rollout
    r = torch.tensor(rewards, dtype=torch.float64)
    full = group_advantages(r, groups, "grpo_batch_std", EPS)
    permuted = group_advantages(r[list(order)], [groups[i] for i in order], "grpo_batch_std", EPS)
    assert torch.allclose(permuted, full[list(order)], rtol=1e-12, atol=1e-12)
