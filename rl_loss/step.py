"""StepBatch: the metadata of one optimizer step that every aggregation denominator comes from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rl_loss.inputs import describe, integer_vector, refuse_iterators, refuse_meta


def _as_lengths(name: str, values: Sequence[int] | Tensor) -> Tensor:
    return integer_vector(name, values)


def _is_one_flat_mask(masks: Any) -> bool:
    """Not a tensor and not a sequence of per-sample masks: an array, a string (refused later), or a list of numbers."""
    if isinstance(masks, Tensor):
        return False
    if not isinstance(masks, Sequence) or isinstance(masks, (str, bytes)):
        return True
    return bool(masks) and not isinstance(masks[0], Tensor) and not hasattr(masks[0], "__len__")


def _as_mask(name: str, mask: Any) -> Tensor:
    """One mask as a tensor: a tensor as given, a list / tuple / array of 0/1 numbers converted (exact)."""
    if isinstance(mask, Tensor):
        refuse_meta(name, mask)
        return mask.detach()
    refuse_iterators(name, mask)
    if isinstance(mask, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D tensor or list of 0/1 values (got {describe(mask)})")
    try:
        return torch.as_tensor(mask, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise TypeError(f"{name} must be a 1-D tensor or list of 0/1 values (got {describe(mask)})") from None


@dataclass(eq=False)
class StepBatch:
    """The samples of one optimizer step, as the loss aggregation needs them.

    Args:
        response_lengths: R_i, response tokens of each sample (>= 1).
        total_lengths: T_i, prompt plus response tokens of each sample (> R_i: every sample has a prompt).
        loss_masks: per sample a 1-D tensor of length R_i with values in {0, 1}, or one flat tensor
            of length sum(R_i) (samples concatenated). These are the masks **before** rejection sampling
            or truncation edits: every denominator (|o_i|, group totals, T) is counted from them.
        group_index: prompt group of each sample (samples of one prompt share it); any hashable ints.
            ``None`` is allowed unless aggregation is prompt_mean.
        trajectory_index: agent trajectory of each sample (the segments or turns of one trajectory
            share it); any ints, unique across the step (not restarted per prompt group). ``None`` is
            allowed unless aggregation is trajectory_mean. With group_index given too, every
            trajectory must lie within one prompt group.

    One StepBatch is one optimizer step, and it must hold **whole** prompt groups (prompt_mean) and
    whole trajectories (trajectory_mean): their denominators are counted over the samples given here,
    so a group or trajectory split over two steps would be averaged twice, each half on its own.

    Raises:
        ValueError: naming the argument and value for inconsistent lengths, masks, groups or trajectories.
    """

    response_lengths: Sequence[int] | Tensor
    total_lengths: Sequence[int] | Tensor
    loss_masks: Sequence[Tensor] | Tensor
    group_index: Sequence[int] | Tensor | None = None
    trajectory_index: Sequence[int] | Tensor | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.response_lengths_t = _as_lengths("response_lengths", self.response_lengths)
        self.total_lengths_t = _as_lengths("total_lengths", self.total_lengths)
        n = self.response_lengths_t.numel()
        if self.total_lengths_t.numel() != n:
            raise ValueError(
                f"total_lengths has {self.total_lengths_t.numel()} entries but response_lengths has {n}; "
                "give one of each per sample"
            )
        if n == 0:
            raise ValueError("response_lengths is empty: a step needs at least one sample")
        bad = torch.nonzero(self.response_lengths_t < 1)
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"response_lengths[{i}] must be >= 1 (got {int(self.response_lengths_t[i])})")
        bad = torch.nonzero(self.total_lengths_t <= self.response_lengths_t)
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"total_lengths[{i}] must exceed response_lengths[{i}]={int(self.response_lengths_t[i])} "
                f"(every sample has at least one prompt token) (got {int(self.total_lengths_t[i])})"
            )
        self.mask_flat = self._flatten_masks()
        self.response_offsets = torch.cumsum(self.response_lengths_t, 0) - self.response_lengths_t
        self.group_ids, self.num_groups = self._dense_ids("group_index", self.group_index)
        self.trajectory_ids, self.num_trajectories = self._dense_ids("trajectory_index", self.trajectory_index)
        self._check_trajectories_within_groups()

    @property
    def num_samples(self) -> int:
        """N, the number of samples in the step."""
        return self.response_lengths_t.numel()

    @property
    def num_response_tokens(self) -> int:
        """sum_i R_i, the length of the step's flat per-token order (masked tokens included)."""
        return self.mask_flat.numel()

    def masked_tokens(self) -> int:
        """T = sum_{i,t} m[i, t], the step's tokens counted by the loss masks (cached)."""
        if "masked_tokens" not in self._cache:
            self._cache["masked_tokens"] = int(self.mask_flat.sum())
        return self._cache["masked_tokens"]

    def sample_tokens(self) -> Tensor:
        """|o_i| = sum_t m[i, t] per sample, float64 (cached)."""
        if "sample_tokens" not in self._cache:
            # segment sums from one running sum (exact for integer counts < 2**53), not a per-token index_add_
            running = torch.cumsum(self.mask_flat, 0)
            at_ends = running[torch.cumsum(self.response_lengths_t, 0) - 1]
            self._cache["sample_tokens"] = torch.diff(at_ends, prepend=at_ends.new_zeros(1))
        return self._cache["sample_tokens"]

    def _flatten_masks(self) -> Tensor:
        masks = self.loss_masks
        refuse_iterators("loss_masks", masks)
        if _is_one_flat_mask(masks):  # an array, or a flat list of 0/1 numbers: converted exactly
            masks = _as_mask("loss_masks", masks)
        if isinstance(masks, Tensor):
            refuse_meta("loss_masks", masks)
            if masks.dim() != 1 or masks.numel() != int(self.response_lengths_t.sum()):
                raise ValueError(
                    f"loss_masks as one tensor must be 1-D of length sum(response_lengths)="
                    f"{int(self.response_lengths_t.sum())} (got shape {tuple(masks.shape)})"
                )
            flat = masks
        else:
            if len(masks) != self.num_samples:
                raise ValueError(
                    f"loss_masks has {len(masks)} entries but there are {self.num_samples} samples; give one per sample"
                )
            masks = [_as_mask(f"loss_masks[{i}]", m) for i, m in enumerate(masks)]
            mask_lengths = torch.tensor([m.numel() if m.dim() == 1 else -1 for m in masks], dtype=torch.long)
            bad = torch.nonzero(mask_lengths != self.response_lengths_t)
            if bad.numel():
                i = int(bad[0])
                raise ValueError(
                    f"loss_masks[{i}] must be 1-D of length response_lengths[{i}]={int(self.response_lengths_t[i])} "
                    f"(got shape {tuple(masks[i].shape)})"
                )
            try:
                flat = torch.cat(list(masks))
            except RuntimeError:  # masks on several devices
                flat = torch.cat([m.detach().cpu() for m in masks])
        if flat.dtype.is_complex:
            raise TypeError(f"loss_masks must hold 0/1 values (got {describe(flat)})")
        # a copy the step owns: rejection sampling applied in place to the caller's mask later must not
        # change the denominators (they come from the masks before such edits)
        flat = flat.detach().to(device="cpu", copy=True)
        # m * (m - 1) == 0 exactly iff m is 0 or 1 (NaN propagates through amax): one reduction in the
        # mask's own dtype; the element-wise search below runs only to name a bad entry
        if flat.dtype == torch.bool or not flat.numel() or float(flat.mul(flat - 1).abs_().amax()) == 0:
            return flat.to(torch.float64)
        flat = flat.to(torch.float64)
        bad = torch.nonzero((flat != 0) & (flat != 1))
        if bad.numel():
            pos = int(bad[0])
            i = int(torch.searchsorted(torch.cumsum(self.response_lengths_t, 0), pos, right=True))
            t = pos - int(torch.cumsum(self.response_lengths_t, 0)[i] - self.response_lengths_t[i])
            raise ValueError(f"loss_masks[{i}][{t}] must be 0 or 1 (got {float(flat[pos])})")
        return flat

    def _dense_ids(self, name: str, values: Sequence[int] | Tensor | None) -> tuple[Tensor | None, int]:
        """Ids of ``name`` renumbered 0..K-1 (in sorted order of the given ids), and K."""
        if values is None:
            return None, 0
        ids = _as_lengths(name, values)
        if ids.numel() != self.num_samples:
            raise ValueError(
                f"{name} has {ids.numel()} entries but there are {self.num_samples} samples; give one per sample"
            )
        unique, dense = torch.unique(ids, return_inverse=True)
        return dense, unique.numel()

    def _check_trajectories_within_groups(self) -> None:
        # A trajectory is rolled out from one prompt. Ids restarted in every prompt group (0, 1, ... per
        # group) would silently merge trajectories of different prompts into one averaging unit.
        if self.group_ids is None or self.trajectory_ids is None:
            return
        lowest = torch.full((self.num_trajectories,), self.num_groups, dtype=torch.long)
        lowest.scatter_reduce_(0, self.trajectory_ids, self.group_ids, reduce="amin")
        highest = torch.full((self.num_trajectories,), -1, dtype=torch.long)
        highest.scatter_reduce_(0, self.trajectory_ids, self.group_ids, reduce="amax")
        mixed = torch.nonzero((lowest != highest)[self.trajectory_ids])
        if mixed.numel():
            first = int(mixed[0])  # the first sample of the first mixed trajectory
            same = self.trajectory_ids == self.trajectory_ids[first]
            other = int(torch.nonzero(same & (self.group_ids != self.group_ids[first]))[0])
            q = int(_as_lengths("trajectory_index", self.trajectory_index)[first])
            groups = _as_lengths("group_index", self.group_index)
            raise ValueError(
                f"trajectory_index: trajectory {q} spans prompt groups {int(groups[first])} (sample {first}) and "
                f"{int(groups[other])} (sample {other}); a trajectory comes from one prompt, so number trajectories "
                "uniquely across the step (e.g. the sample's rollout index), not restarting in each group"
            )
