"""TRL's generation batches as optimizer steps (rl_loss.integrations.trl_steps), without trl: hand-built batches."""

from __future__ import annotations

import pytest
import torch

from rl_loss import LossConfig, ReducerFactory
from rl_loss.integrations.trl_steps import ROW_KEY, GenerationSteps, placeholder_step, slice_metadata


def batch(masks: list[list[int]], rows: list[int], prompt_len: int = 3) -> dict[str, torch.Tensor]:
    """A TRL micro-batch as _compute_loss sees it (only the keys the step mapping reads)."""
    mask = torch.tensor(masks)
    return {"completion_mask": mask, "prompt_mask": torch.ones(mask.shape[0], prompt_len, dtype=torch.long),
            ROW_KEY: torch.tensor(rows)}


def gathered(per_process: list[list[dict[str, torch.Tensor]]], width: int) -> torch.Tensor:
    """What the all-gather gives: every process's slice_metadata, stacked (P, S, B, width + 3)."""
    return torch.stack([slice_metadata(slices, width) for slices in per_process])


def test_a_step_holds_its_slices_of_every_process_in_slice_process_row_order():
    # 2 processes x 4 slices of 2 rows, GA 2: slices 0-1 are one step, 2-3 the next. Widths tell rows apart.
    per_process = [
        [batch([[1] * w] * 2, [10 * p + 2 * k, 10 * p + 2 * k + 1]) for k, w in enumerate((1, 2, 3, 4))]
        for p in range(2)
    ]
    steps = GenerationSteps(gathered(per_process, width=4), process_index=1, grad_accum=2, num_generations=2)
    step = steps.step(1)
    assert steps.first_slice(1) == 0 and steps.first_slice(3) == 2
    # (slice 0: process 0, process 1), (slice 1: process 0, process 1), 2 rows each
    assert step.response_lengths_t.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert step.group_ids is not None and step.num_groups == 4  # rows 0-3 and 10-13 in pairs
    assert steps.micro_batch_samples(1) == [6, 7] and steps.micro_batch_samples(2) == [2, 3]
    assert [steps.is_last_micro_step(k) for k in range(4)] == [False, True, False, True]
    assert steps.step(0) is step and steps.step(2).response_lengths_t.tolist() == [3] * 4 + [4] * 4


def test_prompt_mean_counts_a_group_over_every_process():
    # one prompt's 4 completions, rows 0-1 on process 0 and rows 2-3 on process 1, GA 1
    per_process = [[batch([[1, 1, 0], [1, 0, 0]], [0, 1])], [batch([[1, 1, 1], [0, 0, 0]], [2, 3])]]
    steps = GenerationSteps(gathered(per_process, width=3), process_index=0, grad_accum=1, num_generations=4)
    weights = ReducerFactory(LossConfig(aggregation="prompt_mean")).token_weights(steps.step(0))
    # P = 1 group of 2 + 1 + 3 + 0 = 6 tokens: every masked token weighs 1/6
    sixth = 1 / 6
    assert [w.tolist() for w in weights] == [[sixth, sixth, 0], [sixth, 0, 0], [sixth, sixth, sixth], [0, 0, 0]]


def test_placeholders_count_in_n_and_add_no_token():
    step = placeholder_step(slice_metadata([batch([[1, 1, 0], [1, 0, 0]], [0, 1])], width=3)[0], num_samples=8)
    assert step.num_samples == 8 and step.masked_tokens() == 3
    weights = ReducerFactory(LossConfig(aggregation="sample_mean")).token_weights(step)
    # sample_mean: 1 / (N |o_i|) with N = 8: 1/16 for the 2-token row, 1/8 for the 1-token row
    assert weights[0].tolist() == [1 / 16, 1 / 16, 0] and weights[1].tolist() == [1 / 8, 0, 0]
    assert all(w.tolist() == [0] for w in weights[2:])


def test_a_micro_batch_larger_than_its_step_is_an_error():
    rows = slice_metadata([batch([[1], [1], [1]], [0, 1, 2])], width=1)[0]
    with pytest.raises(ValueError, match="3 rows does not fit a step of 2 samples"):
        placeholder_step(rows, num_samples=2)


def test_a_completion_wider_than_the_exchange_width_is_named():
    with pytest.raises(ValueError, match="completion_ids has 4 columns, more than max_completion_length=3"):
        slice_metadata([batch([[1, 1, 1, 1]], [0])], width=3)
