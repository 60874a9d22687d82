"""Group-relative advantages (docs/objectives.md), computed from the whole rollout's rewards.

Statistics are taken over every sample of a prompt group, whatever micro-batch, DP rank or CP rank
later holds each sample: callers pass the rewards of the full rollout, never a slice of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from rl_loss.inputs import describe, integer_vector, refuse_iterators, refuse_meta

ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "drgrpo", "grpo_batch_std")


def group_advantages(
    rewards: Tensor, group_index: Sequence[int] | Tensor, estimator: str = "grpo", eps: float = 1e-6
) -> Tensor:
    """Per-sample advantages relative to the sample's prompt group.

    grpo (DeepSeekMath):  A_i = (r_i - mean_g) / (std_g + eps), std_g the unbiased group std
    (0 for a group of one sample).
    drgrpo (Dr.GRPO):     A_i = r_i - mean_g (no std division: it up-weights near-solved prompts).
    grpo_batch_std (ScaleRL, arXiv:2510.13786): A_i = (r_i - mean_g(i)) / (std_B + eps), std_B the
    unbiased std of the centred rewards c_j = r_j - mean_g(j) over all N samples passed:
    std_B = sqrt(sum_j c_j^2 / (N - 1)) (their mean is 0; 0 for N = 1). Pass the whole rollout batch.

    Args:
        rewards: 1-D tensor (or sequence) of one reward per sample of the rollout; integer or boolean
            rewards (0/1 verifiers) are read as numbers.
        group_index: prompt group of each sample (integers; floats and booleans are refused).
        estimator: ``"grpo"``, ``"drgrpo"`` or ``"grpo_batch_std"``.
        eps: added to the std (grpo and grpo_batch_std).

    Returns:
        1-D tensor of advantages: the dtype of floating ``rewards``, else torch's default float dtype
        (integer rewards never give integer advantages).

    Raises:
        TypeError / ValueError: naming the argument, for rewards or ids of the wrong kind or shape.
    """
    if not isinstance(estimator, str) or estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)} (got {describe(estimator)})")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (got {describe(eps)}); e.g. 1e-6")
    rewards = _as_rewards(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, one per sample (got shape {tuple(rewards.shape)})")
    groups = integer_vector("group_index", group_index)
    if groups.shape != rewards.shape:
        raise ValueError(f"group_index must have one entry per reward ({rewards.numel()}) (got {groups.numel()})")
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.get_default_dtype()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite (got NaN or inf)")
    _, dense = torch.unique(groups, return_inverse=True)
    num_groups = int(dense.max()) + 1 if dense.numel() else 0
    r = rewards.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, dense, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, dense, r) / count
    centred = r - mean[dense]
    if estimator == "drgrpo":
        return centred.to(out_dtype)
    if estimator == "grpo_batch_std":
        batch_std = ((centred * centred).sum() / max(r.numel() - 1, 1)).sqrt()
        return (centred / (batch_std + eps)).to(out_dtype)
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, dense, centred * centred)
    std = (sq / (count - 1).clamp_min(1)).sqrt()
    return (centred / (std[dense] + eps)).to(out_dtype)


def _as_rewards(rewards: Tensor | Sequence[float]) -> Tensor:
    """Rewards as a tensor; a list is converted (exact), integers and booleans are numbers too."""
    refuse_iterators("rewards", rewards)
    if not isinstance(rewards, Tensor):
        if isinstance(rewards, (str, bytes)):
            raise TypeError(f"rewards must be a 1-D tensor of numbers (got {describe(rewards)})")
        try:
            rewards = torch.as_tensor(rewards)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"rewards must be a 1-D tensor of numbers (got {describe(rewards)})") from None
    refuse_meta("rewards", rewards)
    if rewards.dtype.is_complex:
        raise TypeError(f"rewards must be real numbers (got {describe(rewards)})")
    return rewards
