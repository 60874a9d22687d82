"""Bad inputs raise ValueError naming the argument and the value given (docs/aggregation.md, docs/cp-layout.md, docs/api.md)."""

from __future__ import annotations

import math

import pytest
import torch

from rl_loss import LossConfig, ReducerFactory, StepBatch, local_response_ranges


def two_sample_step(group_index=None, trajectory_index=None):
    # sample 0: R = 3, T = 5, mask [1, 1, 0];  sample 1: R = 2, T = 4, mask [1, 1]
    return StepBatch(
        response_lengths=[3, 2],
        total_lengths=[5, 4],
        loss_masks=[torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0])],
        group_index=group_index,
        trajectory_index=trajectory_index,
    )


# --- StepBatch metadata ---------------------------------------------------------------------------------


def test_mask_length_different_from_response_length_names_sample_and_lengths():
    with pytest.raises(ValueError, match=r"loss_masks\[1\].*response_lengths\[1\]=3.*\(2,\)"):
        StepBatch(response_lengths=[2, 3], total_lengths=[4, 5], loss_masks=[torch.ones(2), torch.ones(2)])


def test_flat_mask_of_wrong_total_length_names_expected_and_given_shape():
    with pytest.raises(ValueError, match=r"loss_masks.*sum\(response_lengths\)=5.*\(4,\)"):
        StepBatch(response_lengths=[2, 3], total_lengths=[4, 5], loss_masks=torch.ones(4))


def test_response_length_longer_than_total_length_is_rejected_by_step():
    with pytest.raises(ValueError, match=r"total_lengths\[0\].*response_lengths\[0\]=5.*got 4"):
        StepBatch(response_lengths=[5], total_lengths=[4], loss_masks=[torch.ones(5)])


def test_response_length_equal_to_total_length_is_rejected_by_step():
    # no prompt token: the first response token would have no logit scoring it
    with pytest.raises(ValueError, match=r"total_lengths\[0\].*response_lengths\[0\]=3.*got 3"):
        StepBatch(response_lengths=[3], total_lengths=[3], loss_masks=[torch.ones(3)])


def test_response_length_below_one_is_rejected_by_step():
    with pytest.raises(ValueError, match=r"response_lengths\[1\] must be >= 1 \(got 0\)"):
        StepBatch(response_lengths=[2, 0], total_lengths=[4, 3], loss_masks=[torch.ones(2), torch.ones(0)])


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0])
def test_mask_value_outside_zero_one_names_the_token_and_value(bad):
    with pytest.raises(ValueError, match=rf"loss_masks\[1\]\[1\] must be 0 or 1 \(got {bad}\)"):
        StepBatch(response_lengths=[2, 2], total_lengths=[3, 3], loss_masks=[torch.ones(2), torch.tensor([1.0, bad])])


def test_prompt_mean_without_group_index_names_group_index():
    factory = ReducerFactory(LossConfig(aggregation="prompt_mean"))
    with pytest.raises(ValueError, match=r"group_index.*prompt_mean.*got group_index=None"):
        factory.pg_reducer(two_sample_step(group_index=None))


def test_group_index_of_wrong_length_names_counts():
    with pytest.raises(ValueError, match=r"group_index has 3 entries.*2 samples"):
        two_sample_step(group_index=[0, 0, 1])


def test_trajectory_mean_without_trajectory_index_names_trajectory_index():
    factory = ReducerFactory(LossConfig(aggregation="trajectory_mean"))
    with pytest.raises(ValueError, match=r"trajectory_index.*trajectory_mean.*got trajectory_index=None"):
        factory.pg_reducer(two_sample_step(group_index=[0, 0], trajectory_index=None))


def test_trajectory_index_of_wrong_length_names_counts():
    with pytest.raises(ValueError, match=r"trajectory_index has 1 entries.*2 samples"):
        two_sample_step(trajectory_index=[0])


def test_trajectory_index_of_floats_names_the_argument():
    with pytest.raises(ValueError, match=r"trajectory_index must be a 1-D sequence of integers"):
        two_sample_step(trajectory_index=[0.0, 1.0])


def test_trajectory_spanning_two_prompt_groups_is_rejected_naming_samples():
    # ids restarted per prompt group: trajectory 0 would merge sample 0 (group 5) and sample 1 (group 6)
    with pytest.raises(
        ValueError, match=r"trajectory_index: trajectory 0 spans prompt groups 5 \(sample 0\) and 6 \(sample 1\)"
    ):
        two_sample_step(group_index=[5, 6], trajectory_index=[0, 0])


def test_trajectories_within_prompt_groups_are_accepted():
    step = two_sample_step(group_index=[5, 5], trajectory_index=[3, 3])
    assert step.num_trajectories == 1 and step.num_groups == 1


# --- local_response_ranges lengths ------------------------------------------------------------------------


def test_ranges_reject_response_length_longer_than_total_length():
    with pytest.raises(ValueError, match=r"total_length must exceed response_length=6.*got 5"):
        local_response_ranges(total_length=5, response_length=6)


def test_ranges_reject_response_length_equal_to_total_length():
    with pytest.raises(ValueError, match=r"total_length must exceed response_length=5.*got 5"):
        local_response_ranges(total_length=5, response_length=5)


def test_ranges_reject_response_length_below_one():
    with pytest.raises(ValueError, match=r"response_length must be an integer >= 1 \(got 0\)"):
        local_response_ranges(total_length=5, response_length=0)


# --- sample_indices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2, -1])
def test_sample_index_out_of_range_names_position_and_value(bad):
    with pytest.raises(ValueError, match=rf"sample_indices\[1\]={bad} is out of range for a step of 2 samples"):
        ReducerFactory().pg_reducer(two_sample_step(), sample_indices=[0, bad])


def test_repeated_sample_index_names_the_sample():
    with pytest.raises(ValueError, match=r"sample_indices repeats sample 1"):
        ReducerFactory().pg_reducer(two_sample_step(), sample_indices=[1, 0, 1])


# --- local values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [4, 6])
def test_local_values_of_wrong_length_name_expected_and_given_length(length):
    reducer = ReducerFactory().pg_reducer(two_sample_step())
    with pytest.raises(ValueError, match=rf"local_values.*5 response tokens.*\({length},\)"):
        reducer(torch.zeros(length))


def test_local_values_not_one_dimensional_are_rejected():
    reducer = ReducerFactory().pg_reducer(two_sample_step())
    with pytest.raises(ValueError, match=r"local_values.*5 response tokens.*\(1, 5\)"):
        reducer(torch.zeros(1, 5))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_at_active_token_names_sample_and_token(bad):
    # the micro-batch holds sample 1 only: its local token 1 is response token 1 of step sample 1 (active)
    reducer = ReducerFactory().pg_reducer(two_sample_step(), sample_indices=[1])
    with pytest.raises(ValueError, match=rf"local_values\[1\] \(sample 1, response token 1\) is {bad}"):
        reducer(torch.tensor([0.5, bad], dtype=torch.float64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_at_masked_token_is_ignored_with_finite_gradient(bad):
    # sample 0 token 2 is masked: sample_mean = (1/2) * ((1 + 2) / 2 + (3 + 4) / 2) = (1.5 + 3.5) / 2 = 2.5
    reducer = ReducerFactory().pg_reducer(two_sample_step())
    values = torch.tensor([1.0, 2.0, bad, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    objective = reducer(values)
    objective.backward()
    assert float(objective.detach()) == pytest.approx(2.5, rel=1e-12)
    # dJ/dl = w: 1/(2*2) on each active token of both samples, 0 on the masked one
    assert values.grad.tolist() == pytest.approx([0.25, 0.25, 0.0, 0.25, 0.25], rel=1e-12)


# --- CP arguments --------------------------------------------------------------------------------------


def test_bshd_with_context_parallel_and_no_max_seq_len_names_both():
    with pytest.raises(ValueError, match=r"max_seq_len is required for qkv_format='bshd'.*got max_seq_len=None with cp_size=2"):
        ReducerFactory().pg_reducer(two_sample_step(), cp_rank=0, cp_size=2, qkv_format="bshd")


def test_ranges_bshd_with_context_parallel_and_no_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match=r"max_seq_len is required.*cp_size=2"):
        local_response_ranges(total_length=5, response_length=3, cp_rank=0, cp_size=2, qkv_format="bshd")


def test_max_seq_len_shorter_than_a_sample_names_both_lengths():
    # sample 0 has T = 5
    with pytest.raises(ValueError, match=r"max_seq_len=4 is shorter than a sample of total_length=5"):
        ReducerFactory().pg_reducer(two_sample_step(), cp_rank=0, cp_size=2, qkv_format="bshd", max_seq_len=4)


def test_ranges_max_seq_len_shorter_than_the_sample_names_both_lengths():
    with pytest.raises(ValueError, match=r"max_seq_len=4 is shorter than a sample of total_length=5"):
        local_response_ranges(5, 3, cp_rank=0, cp_size=2, qkv_format="bshd", max_seq_len=4)


def test_max_seq_len_with_thd_is_rejected_naming_the_value():
    with pytest.raises(ValueError, match=r"max_seq_len applies to qkv_format='bshd' only.*got max_seq_len=16 with thd"):
        ReducerFactory().pg_reducer(two_sample_step(), cp_rank=0, cp_size=2, qkv_format="thd", max_seq_len=16)


def test_ranges_max_seq_len_with_thd_is_rejected_naming_the_value():
    with pytest.raises(ValueError, match=r"got max_seq_len=12 with thd"):
        local_response_ranges(5, 3, cp_rank=0, cp_size=2, qkv_format="thd", max_seq_len=12)


@pytest.mark.parametrize("bad", [2, -1])
def test_cp_rank_out_of_range_names_rank_and_size(bad):
    with pytest.raises(ValueError, match=rf"cp_rank must be an integer in \[0, cp_size=2\) \(got {bad}\)"):
        ReducerFactory().pg_reducer(two_sample_step(), cp_rank=bad, cp_size=2)


def test_ranges_cp_rank_out_of_range_names_rank_and_size():
    with pytest.raises(ValueError, match=r"cp_rank .*cp_size=4.*got 4"):
        local_response_ranges(5, 3, cp_rank=4, cp_size=4)


def test_cp_size_below_one_names_the_value():
    with pytest.raises(ValueError, match=r"cp_size must be an integer >= 1 \(got 0\)"):
        ReducerFactory().pg_reducer(two_sample_step(), cp_rank=0, cp_size=0)


def test_unknown_qkv_format_names_the_value():
    with pytest.raises(ValueError, match=r"qkv_format must be one of thd, bshd \(got 'sbhd'\)"):
        ReducerFactory().pg_reducer(two_sample_step(), qkv_format="sbhd")
