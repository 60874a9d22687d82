"""The reducer of one rank's share of a micro-batch: its slice of the step weights, found from the CP layout.

A :class:`TokenReducer` holds the weights of the tokens a (micro-batch, DP rank, CP rank) piece holds, in
the order of its local values (docs/cp-layout.md: per sample its CP pieces, samples in the micro-batch's order), and
reduces those values with one dot product. :func:`local_reducer` cuts that slice from the step's weights;
:class:`rl_loss.ReducerFactory` builds the weights (:mod:`rl_loss.aggregation`) and calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rl_loss.inputs import accumulation_dtype, float_tensor, integer_vector
from rl_loss.layout import check_cp_args, local_token_index
from rl_loss.step import StepBatch


class TokenReducer:
    """Reduces one rank's local per-token values of one micro-batch to its partial of the step objective.

    Built by :meth:`ReducerFactory.pg_reducer` / :meth:`ReducerFactory.metric_reducer`; calling it is a
    single dot product with the rank's slice of the step weights (cast once per dtype and device).

    Args:
        local_weights: the rank's weights, one per local value (float64).
        local_index: position of each local value in the step's flat response-token order.
        step: the step the weights belong to.
        check_finite: name the token of a non-finite value with non-zero weight instead of returning NaN.
        samples: the micro-batch's sample numbers in local order (``None``: every sample of the step).
        cp_size: size of the CP group whose ranks share these samples' tokens.
        local_counts: how many local values each of those samples has (derived from ``local_index`` if omitted).
    """

    def __init__(
        self,
        local_weights: Tensor,
        local_index: Tensor,
        step: StepBatch,
        check_finite: bool = True,
        *,
        samples: Tensor | None = None,
        cp_size: int = 1,
        local_counts: Tensor | None = None,
    ):
        self._weights64 = local_weights
        self._index = local_index
        self._step = step
        self._check_finite = check_finite
        self._samples = samples
        self._cp_size = cp_size
        self._local_counts = local_counts
        self._cast: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._sample_slots: Tensor | None = None
        self._mean_inputs: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    @property
    def num_local_tokens(self) -> int:
        """How many local values the reducer expects (the rank's response tokens of its samples)."""
        return self._weights64.numel()

    @property
    def token_index(self) -> Tensor:
        """Positions of the local values in the step's flat response-token order (int64).

        ``per_token_step_tensor[reducer.token_index]`` gives this rank's local values of any per-token
        quantity laid out in step order (old log-probs, advantages), ready for the reducer.
        """
        return self._index

    @property
    def cp_size(self) -> int:
        """Size of the CP group the local values are one rank's share of (1 = whole sequences)."""
        return self._cp_size

    @property
    def sample_indices(self) -> Tensor:
        """The micro-batch's samples (their numbers in the step, int64), in local order.

        Every CP rank of a micro-batch lists the same samples, including those of which it holds no token,
        so per-sample tensors (:meth:`sample_partial_means`) line up across the CP group.
        """
        if self._samples is None:
            return torch.arange(self._step.num_samples)
        return self._samples

    @property
    def local_sample_index(self) -> Tensor:
        """For each local value, the position of its sample in :attr:`sample_indices` (int64, cached).

        ``per_sample_tensor[reducer.local_sample_index]`` spreads one value per sample of the micro-batch
        over that sample's local tokens (e.g. GSPO's sequence ratio).
        """
        if self._sample_slots is None:
            counts = self._counts()
            slots = torch.arange(counts.numel())
            self._sample_slots = torch.repeat_interleave(slots, counts, output_size=self.num_local_tokens)
        return self._sample_slots

    @property
    def sample_token_counts(self) -> Tensor:
        """|o_i| of each micro-batch sample (its loss-mask tokens on every CP rank, float64), in :attr:`sample_indices` order."""
        return self._step.sample_tokens().index_select(0, self.sample_indices)

    def sample_partial_means(self, local_values: Tensor) -> Tensor:
        """This rank's partial of every micro-batch sample's mean over its loss-mask tokens (differentiable).

        Entry k is ``sum_{local t of sample i} m[i,t] * v[t] / max(|o_i|, 1)`` for ``i = sample_indices[k]``,
        with the step's masks before rejection sampling; summed over the CP ranks it is sample i's masked
        token mean. Non-finite values at masked tokens are ignored.

        Raises:
            ValueError: for values of the wrong shape, or a non-finite value at a loss-mask token.
        """
        self._check_local_values(local_values)
        local_values = local_values.to(accumulation_dtype(local_values.dtype))
        mask, inv_count, counts = self._mean_inputs_for(local_values.dtype, local_values.device)
        if not counts.numel():  # an empty micro-batch
            return local_values.new_zeros(0)
        # the local values are grouped by sample (each sample's CP pieces in a row): one segment sum per sample
        sums = torch.segment_reduce(local_values * mask, "sum", lengths=counts)
        if self._check_finite and not bool(torch.isfinite(sums.detach().sum())):
            active = mask != 0
            self._raise_if_nonfinite(local_values, active)
            terms = torch.where(active, local_values, torch.zeros_like(local_values)) * mask
            sums = torch.segment_reduce(terms, "sum", lengths=counts)
        return sums * inv_count

    def _mean_inputs_for(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(local mask, 1 / max(|o_i|, 1) and local value count per micro-batch sample), cast once per dtype/device."""
        key = (dtype, device)
        if key not in self._mean_inputs:
            mask = self._step.mask_flat.index_select(0, self._index)
            inv_count = 1.0 / self._step.sample_tokens().clamp_min(1).index_select(0, self.sample_indices)
            self._mean_inputs[key] = (
                mask.to(device=device, dtype=dtype),
                inv_count.to(device=device, dtype=dtype),
                self._counts().to(device),
            )
        return self._mean_inputs[key]

    def _counts(self) -> Tensor:
        """How many local values each micro-batch sample has (in :attr:`sample_indices` order)."""
        if self._local_counts is None:  # a reducer built by hand: count each sample's local values from the index
            ends = torch.cumsum(self._step.response_lengths_t, 0)
            owner = torch.searchsorted(ends, self._index, right=True)
            self._local_counts = torch.bincount(owner, minlength=self._step.num_samples)[self.sample_indices]
        return self._local_counts

    def weights(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """The local token weights, cast to ``dtype`` on ``device`` (cached)."""
        key = (dtype, torch.device(device))
        if key not in self._cast:
            self._cast[key] = self._weights64.to(device=device, dtype=dtype)
        return self._cast[key]

    def token_count(self) -> int:
        """Masked tokens among the local values (each token counted once across CP ranks)."""
        return int(self._step.mask_flat[self._index].sum())

    def __call__(self, local_values: Tensor) -> Tensor:
        """Partial objective ``sum_k w[k] * local_values[k]`` (differentiable in ``local_values``).

        The sum runs in at least float32, pairwise (see :func:`_weighted_sum`): float16 / bfloat16 values give
        a float32 partial (a float16 sum of millions of tokens drifts by percents; see docs/trust-library.md).

        Raises:
            TypeError: if ``local_values`` is not a tensor of floating-point values (integer or boolean
                values would be reduced in integer arithmetic).
            ValueError: if ``local_values`` is a meta tensor, is not 1-D of the rank's local length, or holds
                a non-finite value at a token with non-zero weight. Non-finite values at masked tokens are ignored.
        """
        self._check_local_values(local_values)
        weights = self.weights(accumulation_dtype(local_values.dtype), local_values.device)
        partial = _weighted_sum(local_values, weights)
        if self._check_finite and not bool(torch.isfinite(partial)):
            partial = self._reduce_nonfinite(local_values, weights)
        return partial

    def _check_local_values(self, local_values: Tensor) -> None:
        float_tensor("local_values", local_values)
        if local_values.dim() != 1 or local_values.numel() != self.num_local_tokens:
            raise ValueError(
                f"local_values must be a 1-D tensor of this rank's {self.num_local_tokens} response tokens "
                f"(its samples' CP pieces concatenated, docs/cp-layout.md) (got shape {tuple(local_values.shape)})"
            )

    def _reduce_nonfinite(self, local_values: Tensor, weights: Tensor) -> Tensor:
        # Slow path, taken only when the fast sum is not finite: masked positions may legitimately hold
        # garbage (padding, -inf log-probs); an active one may not.
        active = weights != 0
        self._raise_if_nonfinite(local_values, active)
        return _weighted_sum(torch.where(active, local_values, torch.zeros_like(local_values)), weights)

    def _raise_if_nonfinite(self, local_values: Tensor, active: Tensor) -> None:
        bad = torch.nonzero(active & ~torch.isfinite(local_values.detach()))
        if bad.numel():
            k = int(bad[0])
            flat = int(self._index[k])
            i = int(torch.searchsorted(torch.cumsum(self._step.response_lengths_t, 0), flat, right=True))
            t = flat - int(self._step.response_offsets[i])
            raise ValueError(
                f"local_values[{k}] (sample {i}, response token {t}) is {float(local_values[k])} at a token "
                f"with non-zero loss weight; {int(bad.numel())} such value(s) in this micro-batch"
            )


def _weighted_sum(values: Tensor, weights: Tensor) -> Tensor:
    """``sum_k w[k] * v[k]`` with ``weights`` in the accumulation dtype (at least float32): a product, then
    torch's pairwise (cascade) sum.

    Not a dot product: a float32 BLAS dot on CPU accumulates in a few running sums and drifts (1e7 tokens of
    token_mean ones give 1.002), where the pairwise sum gives 1 to float32's precision; float16 / bfloat16
    values are summed in float32, since their own sums stall (0.954 at 2e6 tokens). A float64 sum of float32
    values would be exact too, but costs a widened copy of the values: twice a bare masked sum (make bench).
    """
    return (values.to(weights.dtype) * weights).sum()


def local_reducer(
    step_weights: Tensor,
    step: StepBatch,
    sample_indices: Sequence[int] | None,
    cp_rank: int,
    cp_size: int,
    qkv_format: str,
    max_seq_len: int | None,
    check_finite: bool = True,
) -> TokenReducer:
    """The reducer of the samples ``sample_indices`` as CP rank ``cp_rank`` holds them, over ``step_weights``.

    ``step_weights`` are the step's per-token weights in its flat order; the arguments are those of
    :meth:`rl_loss.ReducerFactory.pg_reducer`.
    """
    check_cp_args(cp_rank, cp_size, qkv_format, max_seq_len)
    samples = _check_sample_indices(sample_indices, step.num_samples)
    if qkv_format == "bshd" and max_seq_len is not None:
        chosen = step.total_lengths_t if samples is None else step.total_lengths_t[samples]
        longest = int(chosen.max()) if chosen.numel() else 0  # an empty micro-batch has no sample to fit
        if longest > max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} is shorter than a sample of total_length={longest}")
    if cp_size == 1 and (samples is None or _is_run(samples)):
        # the whole step, or consecutive samples without CP: the local weights are one slice (a view)
        if samples is None:
            start, end = 0, step.num_response_tokens
        elif not samples.numel():
            start, end = 0, 0
        else:
            start = int(step.response_offsets[samples[0]])
            end = int(step.response_offsets[samples[-1]] + step.response_lengths_t[samples[-1]])
        counts = step.response_lengths_t if samples is None else step.response_lengths_t[samples]
        return TokenReducer(step_weights[start:end], torch.arange(start, end), step, check_finite,
                            samples=samples, local_counts=counts)
    pick = (lambda t: t) if samples is None else (lambda t: t[samples])
    index, counts = local_token_index(
        pick(step.total_lengths_t),
        pick(step.response_lengths_t),
        pick(step.response_offsets),
        cp_rank,
        cp_size,
        qkv_format,
        max_seq_len,
        with_counts=True,
    )
    return TokenReducer(step_weights.index_select(0, index), index, step, check_finite,
                        samples=samples, cp_size=cp_size, local_counts=counts)


def _is_run(samples: Tensor) -> bool:
    """Are the sample numbers consecutive and ascending (a micro-batch cut from the step in order)?"""
    return samples.numel() < 2 or bool((samples[1:] - samples[:-1] == 1).all())


def _check_sample_indices(sample_indices: Sequence[int] | None, num_samples: int) -> Tensor | None:
    """The sample numbers as int64; booleans, floats and generators are refused (never read as numbers)."""
    if sample_indices is None:
        return None
    samples = integer_vector("sample_indices", sample_indices, what="sample numbers")
    out = torch.nonzero((samples < 0) | (samples >= num_samples))
    if out.numel():
        raise ValueError(
            f"sample_indices[{int(out[0])}]={int(samples[out[0]])} is out of range for a step of {num_samples} samples"
        )
    if torch.unique(samples).numel() != samples.numel():
        values, counts = torch.unique(samples, return_counts=True)
        raise ValueError(
            f"sample_indices repeats sample {int(values[counts > 1][0])}: each sample may be reduced once per step"
        )
    return samples
