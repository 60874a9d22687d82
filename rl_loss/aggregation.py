"""Aggregation modes as step-level per-token weights, and the reducers that apply them.

Every mode is a per-token weight ``w[i, t] = m[i, t] * c_i`` with ``c_i`` depending only on step-level
counts, so the step objective is ``J = sum_{i,t} w[i, t] * l[i, t]``. The weights are built once per
step from metadata (:meth:`ReducerFactory.step_weights`); a micro-batch / DP rank / CP rank then reduces
its local values with one dot product against its slice of them. Summing the partials over any
partition of the step gives J exactly, with no collective inside the reducer (SPEC §2-§3).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rl_loss.config import LossConfig, import_callable
from rl_loss.layout import check_cp_args, local_token_index
from rl_loss.step import StepBatch

TokenWeightFn = Callable[[StepBatch], Tensor]


class EmptyStepWarning(UserWarning):
    """Every loss-mask entry of a step is 0: the step objective is 0 and its gradient is 0."""


def _sample_mean_scale(step: StepBatch, divisor: float | None) -> Tensor:
    """sample_mean (GRPO): J = (1/N) * sum_i [ sum_t m*l / max(|o_i|, 1) ]  ->  c_i = 1 / (N * max(|o_i|, 1))."""
    return 1.0 / (step.num_samples * step.sample_tokens().clamp_min(1))


def _prompt_mean_scale(step: StepBatch, divisor: float | None) -> Tensor:
    """prompt_mean (ScaleRL, DAPO paper): J = (1/P) * sum_g [ sum_{i in g} sum_t m*l / max(sum_{i in g} |o_i|, 1) ].

    ->  c_i = 1 / (P * max(G_g(i), 1)), G_g = masked tokens of group g over the whole step, P = groups.
    """
    if step.group_ids is None:
        raise ValueError(
            "group_index is required with aggregation=prompt_mean: pass the prompt group of every sample to "
            "StepBatch (got group_index=None)"
        )
    return _unit_mean_scale(step, step.group_ids, step.num_groups)


def _trajectory_mean_scale(step: StepBatch, divisor: float | None) -> Tensor:
    """trajectory_mean (agent rollouts, miles #1927): J = (1/Q) * sum_q [ sum_{i in q} sum_t m*l / max(sum_{i in q} |o_i|, 1) ].

    ->  c_i = 1 / (Q * max(G_q(i), 1)), G_q = masked tokens of trajectory q over the whole step, Q = trajectories.
    """
    if step.trajectory_ids is None:
        raise ValueError(
            "trajectory_index is required with aggregation=trajectory_mean: pass the trajectory of every sample "
            "to StepBatch, e.g. the sample's own number when each sample is a whole trajectory "
            "(got trajectory_index=None)"
        )
    return _unit_mean_scale(step, step.trajectory_ids, step.num_trajectories)


def _unit_mean_scale(step: StepBatch, unit_ids: Tensor, num_units: int) -> Tensor:
    """Per-sample 1 / (K * max(unit tokens, 1)) for samples pooled into K units (groups or trajectories)."""
    unit_tokens = torch.zeros(num_units, dtype=torch.float64)
    unit_tokens.index_add_(0, unit_ids, step.sample_tokens())
    return 1.0 / (num_units * unit_tokens.clamp_min(1))[unit_ids]


def _token_mean_scale(step: StepBatch, divisor: float | None) -> Tensor:
    """token_mean (DAPO as implemented): J = sum_i sum_t m*l / max(T, 1)  ->  c_i = 1 / max(T, 1)."""
    return torch.tensor(1.0 / max(step.masked_tokens(), 1), dtype=torch.float64).expand(step.num_samples)


def _constant_scale(step: StepBatch, divisor: float | None) -> Tensor:
    """constant (Dr.GRPO): J = sum_i sum_t m*l / (N * L)  ->  c_i = 1 / (N * L), L = the configured divisor."""
    return torch.tensor(1.0 / (step.num_samples * float(divisor)), dtype=torch.float64).expand(step.num_samples)


SAMPLE_SCALES: dict[str, Callable[[StepBatch, float | None], Tensor]] = {
    "sample_mean": _sample_mean_scale,
    "prompt_mean": _prompt_mean_scale,
    "trajectory_mean": _trajectory_mean_scale,
    "token_mean": _token_mean_scale,
    "constant": _constant_scale,
}


@dataclass(frozen=True)
class StepWeights:
    """The per-token weights of one step in its flat order (float64), and what they imply.

    Attributes:
        weights: ``w`` of every response token, samples concatenated.
        tokens: T, masked tokens of the step (from the pre-RS masks).
        empty_step: True when T == 0 (J is 0 and so is its gradient).
        loss_scale_vs_token_mean: ``sum w``, the mode's mean weight per masked token (``sum w / T``)
            relative to token_mean's ``1 / T``: 1.0 for token_mean, ``T / (N * L)`` for constant, so a
            wrong divisor shows at a glance.
    """

    weights: Tensor
    tokens: int
    empty_step: bool
    loss_scale_vs_token_mean: float

    def metrics(self) -> dict[str, float]:
        """Step-level figures for logging."""
        return {
            "tokens": self.tokens,
            "empty_step": float(self.empty_step),
            "loss_scale_vs_token_mean": self.loss_scale_vs_token_mean,
        }


def build_step_weights(step: StepBatch, aggregation: str, divisor: float | None = None) -> StepWeights:
    """Per-token weights of ``step`` for a built-in aggregation mode (vectorized, no per-sample loop)."""
    scale = SAMPLE_SCALES[aggregation](step, divisor)
    if scale.numel() and scale.stride(0) == 0:  # one scale for every sample (token_mean, constant)
        weights = step.mask_flat * scale[0]
    else:
        weights = torch.repeat_interleave(scale, step.response_lengths_t, output_size=step.num_response_tokens)
        weights.mul_(step.mask_flat)
    return _finish_weights(step, weights)


def _finish_weights(step: StepBatch, weights: Tensor) -> StepWeights:
    tokens = step.masked_tokens()
    if tokens == 0:
        warnings.warn(
            f"every loss-mask entry of the step is 0 ({step.num_samples} samples): pg_loss is 0 with zero "
            "gradient (metric empty_step=1)",
            EmptyStepWarning,
            stacklevel=3,
        )
    scale_vs_token_mean = float(weights.sum())
    return StepWeights(weights, tokens, tokens == 0, scale_vs_token_mean)


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

    def sample_partial_means(self, local_values: Tensor) -> Tensor:
        """This rank's partial of every micro-batch sample's mean over its loss-mask tokens (differentiable).

        Entry k is ``sum_{local t of sample i} m[i,t] * v[t] / max(|o_i|, 1)`` for ``i = sample_indices[k]``,
        with the step's masks before rejection sampling; summed over the CP ranks it is sample i's masked
        token mean. Non-finite values at masked tokens are ignored.

        Raises:
            ValueError: for values of the wrong shape, or a non-finite value at a loss-mask token.
        """
        self._check_local_values(local_values)
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

        Raises:
            ValueError: if ``local_values`` is not 1-D of the rank's local length, or holds a non-finite
                value at a token with non-zero weight. Non-finite values at masked tokens are ignored.
        """
        self._check_local_values(local_values)
        weights = self.weights(local_values.dtype, local_values.device)
        partial = torch.dot(local_values, weights)
        if self._check_finite and not bool(torch.isfinite(partial)):
            partial = self._reduce_nonfinite(local_values, weights)
        return partial

    def _check_local_values(self, local_values: Tensor) -> None:
        if not isinstance(local_values, Tensor) or local_values.dim() != 1 or local_values.numel() != self.num_local_tokens:
            shape = tuple(local_values.shape) if isinstance(local_values, Tensor) else type(local_values).__name__
            raise ValueError(
                f"local_values must be a 1-D tensor of this rank's {self.num_local_tokens} response tokens "
                f"(its samples' CP pieces concatenated, SPEC §4) (got {shape})"
            )

    def _reduce_nonfinite(self, local_values: Tensor, weights: Tensor) -> Tensor:
        # Slow path, taken only when the fast sum is not finite: masked positions may legitimately hold
        # garbage (padding, -inf log-probs); an active one may not.
        active = weights != 0
        self._raise_if_nonfinite(local_values, active)
        return torch.dot(torch.where(active, local_values, torch.zeros_like(local_values)), weights)

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


class ReducerFactory:
    """Builds step weights and per-micro-batch reducers for one loss configuration.

    Args:
        config: the validated :class:`~rl_loss.LossConfig` (default: sample_mean).
        check_finite: check each partial for NaN/inf and name the offending token (one scalar check).
    """

    def __init__(self, config: LossConfig | None = None, *, check_finite: bool = True):
        self.config = config if config is not None else LossConfig()
        self.check_finite = check_finite
        self._custom = import_callable(self.config.custom_pg_reducer) if self.config.custom_pg_reducer else None

    @property
    def aggregation(self) -> str:
        """The aggregation mode of pg_loss (``custom`` when a custom pg reducer is configured)."""
        return "custom" if self._custom is not None else self.config.aggregation

    def step_weights(self, step: StepBatch) -> StepWeights:
        """pg_loss weights of ``step``, built once per step and cached on it."""
        key = ("pg", self.aggregation, self.config.divisor, self.config.custom_pg_reducer)
        if key not in step._cache:
            if self._custom is not None:
                step._cache[key] = _finish_weights(step, _custom_weights(self._custom, step))
            else:
                step._cache[key] = build_step_weights(step, self.config.aggregation, self.config.divisor)
        return step._cache[key]

    def metric_weights(self, step: StepBatch) -> StepWeights:
        """Diagnostic weights of ``step``: always sample_mean, so runs with different modes compare."""
        key = ("metric", "sample_mean")
        if key not in step._cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EmptyStepWarning)  # reported once, by the pg weights
                step._cache[key] = build_step_weights(step, "sample_mean")
        return step._cache[key]

    def token_weights(self, step: StepBatch) -> list[Tensor]:
        """Per-sample pg weights: ``J = sum_i sum_t w[i][t] * l[i][t]``; each tensor has length R_i."""
        return list(torch.split(self.step_weights(step).weights, step.response_lengths_t.tolist()))

    def step_metrics(self, step: StepBatch) -> dict[str, float]:
        """``tokens``, ``empty_step`` and ``loss_scale_vs_token_mean`` of the step's pg weights."""
        return self.step_weights(step).metrics()

    def pg_reducer(
        self,
        step: StepBatch,
        sample_indices: Sequence[int] | None = None,
        cp_rank: int = 0,
        cp_size: int = 1,
        qkv_format: str = "thd",
        max_seq_len: int | None = None,
    ) -> TokenReducer:
        """Reducer of pg_loss for the samples ``sample_indices`` as held by CP rank ``cp_rank``.

        Args:
            step: the optimizer step the samples belong to (denominators are step-level).
            sample_indices: samples of this micro-batch on this DP rank; ``None`` means every sample.
            cp_rank, cp_size: position in the context-parallel group (1 = no CP).
            qkv_format: ``"thd"`` or ``"bshd"``; max_seq_len: padded width, required for bshd with CP.

        Returns:
            A :class:`TokenReducer`; summing its partials over a partition of the samples and every
            CP rank gives the step objective J.
        """
        return self._reducer(self.step_weights(step), step, sample_indices, cp_rank, cp_size, qkv_format, max_seq_len)

    def metric_reducer(
        self,
        step: StepBatch,
        sample_indices: Sequence[int] | None = None,
        cp_rank: int = 0,
        cp_size: int = 1,
        qkv_format: str = "thd",
        max_seq_len: int | None = None,
    ) -> TokenReducer:
        """Like :meth:`pg_reducer` with sample_mean weights, for every diagnostic (clipfrac, KL, entropy...)."""
        return self._reducer(self.metric_weights(step), step, sample_indices, cp_rank, cp_size, qkv_format, max_seq_len)

    def _reducer(self, weights, step, sample_indices, cp_rank, cp_size, qkv_format, max_seq_len) -> TokenReducer:
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
            return TokenReducer(weights.weights[start:end], torch.arange(start, end), step, self.check_finite,
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
        return TokenReducer(weights.weights.index_select(0, index), index, step, self.check_finite,
                            samples=samples, cp_size=cp_size, local_counts=counts)


def _is_run(samples: Tensor) -> bool:
    """Are the sample numbers consecutive and ascending (a micro-batch cut from the step in order)?"""
    return samples.numel() < 2 or bool((samples[1:] - samples[:-1] == 1).all())


def _check_sample_indices(sample_indices: Sequence[int] | None, num_samples: int) -> Tensor | None:
    if sample_indices is None:
        return None
    samples = torch.as_tensor(sample_indices, dtype=torch.long) if len(sample_indices) else torch.zeros(0, dtype=torch.long)
    if samples.dim() != 1:
        raise ValueError(f"sample_indices must be a flat sequence of sample numbers (got {sample_indices!r:.80})")
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


def _custom_weights(fn: TokenWeightFn, step: StepBatch) -> Tensor:
    weights = torch.as_tensor(fn(step), dtype=torch.float64).reshape(-1)
    if weights.numel() != step.num_response_tokens:
        raise ValueError(
            f"custom_pg_reducer returned {weights.numel()} weights; expected one per response token "
            f"({step.num_response_tokens})"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("custom_pg_reducer returned non-finite token weights")
    return weights
