"""Synthetic steps for the benchmarks, and the per-sample Python-loop reducer they are compared with.

Everything here is re-derived from docs/aggregation.md and docs/cp-layout.md without the library's vectorized code paths (CP
pieces come from the public ``local_response_ranges``, one sample at a time; the per-sample scales
c_i from the table of §2), so a benchmark run also cross-checks the library's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl_loss import local_response_ranges


@dataclass
class Workload:
    """One optimizer step of ``num_samples`` samples and ``tokens`` response tokens in all.

    The trainer-side inputs of :class:`rl_loss.StepBatch` (Python lists and one flat float32 mask),
    plus per-sample masks as separate tensors for the list-of-tensors path.
    """

    response_lengths: list[int]
    total_lengths: list[int]
    group_index: list[int]
    trajectory_index: list[int]
    mask_flat: Tensor  # float32, length sum R_i
    mask_list: list[Tensor]  # separate tensors, one per sample
    divisor: float  # L for constant: the longest response of the step

    @property
    def num_samples(self) -> int:
        return len(self.response_lengths)

    @property
    def tokens(self) -> int:
        return int(self.mask_flat.numel())


def make_workload(tokens: int, num_samples: int, *, group_size: int = 8, seed: int = 0) -> Workload:
    """A step with varied response lengths (0.5x to 1.5x the mean) summing to exactly ``tokens``.

    Masks: a quarter of the samples truncated (tail masked), 2% of the other tokens masked (rejection
    sampling), and sample 1 fully masked (an empty sample still counts as one of the N samples).
    Prompt groups of ``group_size`` consecutive samples; agent trajectories of two consecutive samples
    (segments) inside each group; prompts of 16 to 512 tokens.
    """
    if tokens < num_samples:
        raise ValueError(f"--tokens={tokens} must be at least the number of samples ({num_samples})")
    gen = torch.Generator().manual_seed(seed)
    share = torch.rand(num_samples, generator=gen, dtype=torch.float64) + 0.5
    lengths = torch.floor(share / share.sum() * (tokens - num_samples)).to(torch.long) + 1
    remainder = tokens - int(lengths.sum())
    lengths[:remainder] += 1
    assert int(lengths.sum()) == tokens
    prompts = torch.randint(16, 513, (num_samples,), generator=gen)

    sample_of = torch.repeat_interleave(torch.arange(num_samples), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(tokens) - offsets[sample_of]
    keep = (lengths.to(torch.float64) * (0.5 + 0.5 * torch.rand(num_samples, generator=gen, dtype=torch.float64))).to(
        torch.long
    )
    truncated = torch.rand(num_samples, generator=gen) < 0.25
    cut = torch.where(truncated, keep.clamp_min(1), lengths)
    mask = (position < cut[sample_of]) & (torch.rand(tokens, generator=gen) >= 0.02)
    if num_samples > 1:
        mask[sample_of == 1] = False
    mask_flat = mask.to(torch.float32)
    mask_list = [m.clone() for m in torch.split(mask_flat, lengths.tolist())]
    return Workload(
        response_lengths=lengths.tolist(),
        total_lengths=(lengths + prompts).tolist(),
        group_index=[i // group_size for i in range(num_samples)],
        trajectory_index=[(i // group_size) * group_size + (i % group_size) // 2 for i in range(num_samples)],
        mask_flat=mask_flat,
        mask_list=mask_list,
        divisor=float(lengths.max()),
    )


def sample_scales(work: Workload, aggregation: str) -> Tensor:
    """c_i of docs/aggregation.md (float64), computed per sample from the masks, independently of the library."""
    n = work.num_samples
    counts = torch.stack([m.sum() for m in work.mask_list]).to(torch.float64)
    if aggregation == "sample_mean":
        return 1.0 / (n * counts.clamp_min(1))
    if aggregation == "token_mean":
        return torch.full((n,), 1.0 / max(float(counts.sum()), 1.0), dtype=torch.float64)
    if aggregation == "constant":
        return torch.full((n,), 1.0 / (n * work.divisor), dtype=torch.float64)
    if aggregation in ("prompt_mean", "trajectory_mean"):
        units_of = work.group_index if aggregation == "prompt_mean" else work.trajectory_index
        units: dict[int, float] = {}
        for u, c in zip(units_of, counts.tolist(), strict=True):
            units[u] = units.get(u, 0.0) + c
        return torch.tensor([1.0 / (len(units) * max(units[u], 1.0)) for u in units_of], dtype=torch.float64)
    raise ValueError(f"unknown aggregation {aggregation!r}")


@dataclass
class LocalLayout:
    """What CP rank ``cp_rank`` of ``cp_size`` holds of every sample (docs/cp-layout.md, thd)."""

    lengths: list[int]  # local values per sample (its pieces concatenated)
    index: Tensor  # flat positions in the step's token order, in local order
    mask: Tensor  # the local slice of the flat mask (float32)

    @property
    def tokens(self) -> int:
        return int(self.index.numel())


def local_layout(work: Workload, cp_rank: int, cp_size: int) -> LocalLayout:
    """Per-sample CP pieces from the public ``local_response_ranges``, one sample at a time."""
    if cp_size == 1:
        return LocalLayout(list(work.response_lengths), torch.arange(work.tokens), work.mask_flat)
    lengths: list[int] = []
    pieces: list[Tensor] = []
    offset = 0
    for total, response in zip(work.total_lengths, work.response_lengths, strict=True):
        ranges = local_response_ranges(total, response, cp_rank=cp_rank, cp_size=cp_size, qkv_format="thd")
        lengths.append(sum(b - a for a, b in ranges))
        pieces.extend(torch.arange(offset + a, offset + b) for a, b in ranges)
        offset += response
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return LocalLayout(lengths, index, work.mask_flat[index])


class LoopReducer:
    """The usual Megatron-RL-style reducer: split the packed values per sample, masked sum per sample,
    scale by the sample's denominator, stack, sum (for sample_mean: masked mean per sample, then the mean).

    The per-sample denominators (step-level counts; under CP they need the global counts) are computed
    once per micro-batch outside the timed call, which favours the loop.
    """

    def __init__(self, layout: LocalLayout, scales: Tensor, dtype: torch.dtype = torch.float32):
        self.lengths = layout.lengths
        self.mask = layout.mask.to(dtype)
        self.scales = scales.to(dtype)

    def __call__(self, values: Tensor) -> Tensor:
        pieces = zip(torch.split(values, self.lengths), torch.split(self.mask, self.lengths), strict=True)
        sums = [(v * m).sum() for v, m in pieces]
        return (torch.stack(sums) * self.scales).sum()
