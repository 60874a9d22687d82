"""TRL's generation batches as rl-loss optimizer steps: which samples share a step's denominators.

How TRL 1.16's ``GRPOTrainer`` feeds its loss (``trl/trainer/grpo_trainer.py``):

- ``_get_train_sampler`` / ``get_train_dataloader``: each process loads a *generation batch* of
  ``per_device_train_batch_size * steps_per_generation`` rows, every prompt repeated
  ``num_generations`` times in a row. Over all processes that is ``generation_batch_size`` rows and
  process ``p`` holds rows ``[p * n, (p + 1) * n)`` of it, so global row ``j`` is a completion of
  prompt group ``j // num_generations`` -- the convention TRL's own advantages are computed with
  (``rewards.view(-1, num_generations)`` and ``process_slice`` in ``_generate_and_score_completions``).
- ``_prepare_inputs``: every ``steps_per_generation * num_iterations`` micro-steps it generates and
  scores the local generation batch, shuffles its rows, and splits it into ``steps_per_generation``
  micro-batches ("slices") of ``per_device_train_batch_size`` rows; micro-step ``m`` (``self._step``)
  trains on slice ``m % steps_per_generation``.
- The Hugging Face Trainer makes one optimizer step of ``gradient_accumulation_steps`` (GA)
  consecutive micro-steps; every epoch is a whole number of generation cycles.

With ``steps_per_generation`` a multiple of GA, the optimizer step of micro-step ``m`` therefore holds
slices ``[k0, k0 + GA)`` of the current generation on **every** process,
``k0 = (m % steps_per_generation) // GA * GA``. :class:`GenerationSteps` keeps, for the current
generation, every process's per-row loss masks (one all-gather per generation, which is at most one
per optimizer step) and builds one :class:`~rl_loss.StepBatch` per optimizer step from them, samples
ordered (slice, process, row): the micro-batch of one process is then a run of consecutive samples,
reduced from a slice of the step's weights.

Otherwise (e.g. GA > steps_per_generation) a step mixes generation batches and its later micro-batches
are not generated yet when the first is trained. Modes whose weight of a sample needs only N and the
sample's own tokens (:data:`LOCAL_MODES`: sample_mean, constant) are still exact: :func:`placeholder_step`
is the step as seen from one micro-batch, its rows followed by fully masked placeholders for the other
N - B samples (they add no token and only count in N, docs/aggregation.md). The other modes are rejected then.

This module only follows TRL's contract; it imports neither trl nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from rl_loss.step import StepBatch

ROW_KEY = "rl_loss_row"
"""Key added to TRL's batches: each row's index in the global generation batch (it survives TRL's shuffle)."""

_META_COLUMNS = 3  # after the padded mask: completion width, prompt length, global row

LOCAL_MODES: tuple[str, ...] = ("sample_mean", "constant")
"""Modes whose weight of a sample needs only N and the sample's own tokens, not the other samples' masks."""


def loss_mask(inputs: Mapping[str, Tensor]) -> Tensor:
    """TRL's loss mask of a batch: ``completion_mask``, times ``tool_mask`` when tools ran (B x C)."""
    mask = inputs["completion_mask"]
    return mask if inputs.get("tool_mask") is None else mask * inputs["tool_mask"]


def generation_rows(num_rows: int, process_index: int, device: torch.device | str | None = None) -> Tensor:
    """Global row indices of one process's generation batch: ``p * n + [0, n)``."""
    return torch.arange(num_rows, device=device) + process_index * num_rows


def slice_metadata(slices: Sequence[Mapping[str, Tensor]], width: int) -> Tensor:
    """Per-row step metadata of a process's buffered slices, int32 of shape ``(S, B, width + 3)``.

    Each row holds its loss mask padded to ``width``, then its completion width C (the batch's padded
    completion length, the row's response length R_i), its prompt length, and its global row.

    Raises:
        ValueError: when a completion is wider than ``width`` (all processes must agree on it).
    """
    parts = []
    for inputs in slices:
        mask = loss_mask(inputs)
        rows, completion_width = mask.shape
        if completion_width > width:
            raise ValueError(
                f"completion_ids has {completion_width} columns, more than max_completion_length={width}: the "
                "step metadata is exchanged at that width; raise max_completion_length"
            )
        meta = torch.zeros(rows, width + _META_COLUMNS, dtype=torch.int32, device=mask.device)
        meta[:, :completion_width] = mask
        meta[:, width] = completion_width
        meta[:, width + 1] = inputs["prompt_mask"].sum(dim=1)
        meta[:, width + 2] = inputs[ROW_KEY]
        parts.append(meta)
    return torch.stack(parts)


def step_batch(rows: Tensor, num_generations: int) -> StepBatch:
    """The :class:`~rl_loss.StepBatch` of metadata rows ``(N, width + 3)`` in step order.

    R_i is the row's completion width (its padded tokens are masked out), T_i adds the prompt length,
    and the prompt group is the global row divided by ``num_generations``.
    """
    rows = rows.detach().to("cpu", torch.long)
    width = rows.shape[1] - _META_COLUMNS
    lengths = rows[:, width]
    held = torch.arange(width) < lengths[:, None]
    return StepBatch(
        response_lengths=lengths,
        total_lengths=lengths + rows[:, width + 1].clamp_min(1),
        loss_masks=rows[:, :width][held],
        group_index=rows[:, width + 2] // num_generations,
    )


def placeholder_step(rows: Tensor, num_samples: int) -> StepBatch:
    """A step of ``num_samples`` samples seen from one micro-batch: its metadata ``rows`` (B, width + 3)
    first, then fully masked one-token placeholders for the other samples (exact for :data:`LOCAL_MODES`).

    Raises:
        ValueError: when the micro-batch has more rows than the step has samples.
    """
    rows = rows.detach().to("cpu", torch.long)
    width = rows.shape[1] - _META_COLUMNS
    others = num_samples - rows.shape[0]
    if others < 0:
        raise ValueError(f"a micro-batch of {rows.shape[0]} rows does not fit a step of {num_samples} samples")
    lengths = rows[:, width]
    held = torch.arange(width) < lengths[:, None]
    return StepBatch(
        response_lengths=torch.cat([lengths, torch.ones(others, dtype=torch.long)]),
        total_lengths=torch.cat([lengths + rows[:, width + 1].clamp_min(1), torch.full((others,), 2)]),
        loss_masks=torch.cat([rows[:, :width][held], torch.zeros(others, dtype=torch.long)]),
    )


class GenerationSteps:
    """The optimizer steps of one generation cycle, built lazily from every process's metadata.

    Args:
        gathered: :func:`slice_metadata` of every process, stacked ``(P, S, B, width + 3)``.
        process_index: this process's index ``p``.
        grad_accum: micro-steps per optimizer step (GA); it divides S, the slices per generation.
        num_generations: completions per prompt (TRL's ``num_generations``).
    """

    def __init__(self, gathered: Tensor, process_index: int, grad_accum: int, num_generations: int):
        if gathered.dim() != 4 or gathered.shape[1] % grad_accum:
            raise ValueError(
                f"gathered metadata must be (processes, slices, rows, columns) with slices a multiple of "
                f"gradient_accumulation_steps={grad_accum} (got shape {tuple(gathered.shape)})"
            )
        self.num_processes, self.num_slices, self.batch_size, _ = gathered.shape
        self._gathered = gathered.detach().cpu()
        self.process_index = process_index
        self.grad_accum = grad_accum
        self.num_generations = num_generations
        self._steps: dict[int, StepBatch] = {}

    @classmethod
    def from_buffer(
        cls,
        slices: Sequence[Mapping[str, Tensor]],
        width: int,
        gather: Callable[[Tensor], Tensor],
        process_index: int,
        grad_accum: int,
        num_generations: int,
    ) -> GenerationSteps:
        """Exchange the metadata of this process's buffered ``slices`` (one ``gather`` call) and wrap it."""
        local = slice_metadata(slices, width)
        gathered = gather(local)  # concatenated along dim 0 over processes
        return cls(gathered.reshape(-1, *local.shape), process_index, grad_accum, num_generations)

    def first_slice(self, slice_index: int) -> int:
        """k0, the first slice of the optimizer step that trains on ``slice_index``."""
        return slice_index // self.grad_accum * self.grad_accum

    def step(self, slice_index: int) -> StepBatch:
        """The StepBatch of the optimizer step holding ``slice_index`` (all its slices, all processes)."""
        first = self.first_slice(slice_index)
        if first not in self._steps:
            rows = self._gathered[:, first : first + self.grad_accum].transpose(0, 1)
            self._steps[first] = step_batch(rows.reshape(-1, rows.shape[-1]), self.num_generations)
        return self._steps[first]

    def micro_batch_samples(self, slice_index: int) -> list[int]:
        """This process's samples of ``slice_index`` in its step's order (a run of B consecutive samples)."""
        start = ((slice_index - self.first_slice(slice_index)) * self.num_processes + self.process_index) * self.batch_size
        return list(range(start, start + self.batch_size))

    def is_last_micro_step(self, slice_index: int) -> bool:
        """Does ``slice_index`` end its optimizer step?"""
        return slice_index - self.first_slice(slice_index) == self.grad_accum - 1
