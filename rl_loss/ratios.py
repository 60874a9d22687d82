"""Importance ratios and the per-sample reductions the surrogates share (docs/objectives.md).

The per-token ratio, and the per-sample means over a sample's loss-mask tokens that the sequence-level
surrogates need (GSPO, GSPO-token, GMPO, VESPO): a CP rank holds only some of a sample's tokens, so it
sums its own and one caller-supplied all-reduce over the CP group adds the ranks' partials, once per
micro-batch (docs/cp-layout.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rl_loss.aggregation import TokenReducer
from rl_loss.inputs import describe

LOG_RATIO_LIMIT = 20.0
"""Log-ratios are clamped to [-20, 20] before exp, so a ratio is always finite."""

CpAllReduce = Callable[[Tensor], Tensor]
"""An autograd-aware sum over the CP group: returns the group's sum, and its backward all-reduces the gradient."""


def importance_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """Per-token ratio r = exp(clamp(logp - logp_old, -20, 20)) (no gradient where the clamp binds)."""
    return torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def sample_means(
    values: Tensor, pg_reducer: TokenReducer, cp_all_reduce: CpAllReduce | None, what: str
) -> Tensor:
    """Each micro-batch sample's mean of ``values`` over its loss-mask tokens on every CP rank, one per sample.

    mean_i = sum_t m[i,t] * v[i,t] / max(|o_i|, 1), with m and |o_i| from the step's masks before rejection
    sampling: this rank's partial (:meth:`~rl_loss.TokenReducer.sample_partial_means`), summed over the CP
    group by ``cp_all_reduce`` (called exactly once; its gradient flows back to every rank's tokens).

    Raises:
        ValueError: naming ``what`` when the reducer is one of several CP ranks and no ``cp_all_reduce`` is given,
            or when ``cp_all_reduce`` returns anything but a float tensor of the shape it was given.
    """
    if cp_all_reduce is None and pg_reducer.cp_size > 1:
        raise ValueError(
            f"cp_all_reduce is required for {what} under context parallelism (got None with "
            f"cp_size={pg_reducer.cp_size}): each sample's sum spans CP ranks; pass an autograd-aware "
            "all-reduce over the CP group, e.g. lambda t: torch.distributed.nn.functional.all_reduce(t, group=cp_group)"
        )
    partial = pg_reducer.sample_partial_means(values)
    if cp_all_reduce is None:
        return partial
    reduced = cp_all_reduce(partial)
    if not (isinstance(reduced, Tensor) and reduced.shape == partial.shape and reduced.dtype.is_floating_point):
        raise ValueError(
            f"cp_all_reduce must return a float tensor of the shape it was given, {tuple(partial.shape)} (one "
            f"partial per sample of the micro-batch) (got {describe(reduced)}); return the all-reduced sum"
        )
    return reduced


def per_token(per_sample: Tensor, pg_reducer: TokenReducer) -> Tensor:
    """One value per sample of the micro-batch spread over that sample's local tokens."""
    return per_sample.index_select(0, pg_reducer.local_sample_index.to(per_sample.device))
