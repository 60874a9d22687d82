"""Aggregation modes as step-level per-token weights, and the factory of the reducers that apply them.

Every mode is a per-token weight ``w[i, t] = m[i, t] * c_i`` with ``c_i`` depending only on step-level
counts, so the step objective is ``J = sum_{i,t} w[i, t] * l[i, t]``. The weights are built once per
step from metadata (:meth:`ReducerFactory.step_weights`); a micro-batch / DP rank / CP rank then reduces
its local values with one dot product against its slice of them. Summing the partials over any
partition of the step gives J exactly, with no collective inside the reducer (docs/aggregation.md, docs/exactness.md). The
reducer and the slicing of a rank's weights live in :mod:`rl_loss.reducer` (``TokenReducer`` is
importable from here too).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rl_loss.config import AGGREGATIONS, MAX_DIVISOR, LossConfig
from rl_loss.custom_reducer import custom_weights_of, load_custom_reducer
from rl_loss.inputs import describe
from rl_loss.reducer import TokenReducer, local_reducer
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
    """Per-token weights of ``step`` for a built-in aggregation mode (vectorized, no per-sample loop).

    Raises:
        TypeError / ValueError: for a step that is not a StepBatch, an unknown mode, or (constant) a divisor
            that is not a token count in [1, 2**31].
    """
    _require_step(step)
    if not isinstance(aggregation, str) or aggregation not in SAMPLE_SCALES:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)} (got {describe(aggregation)})")
    if aggregation == "constant":
        _check_divisor(divisor)
    scale = SAMPLE_SCALES[aggregation](step, divisor)
    if scale.numel() and scale.stride(0) == 0:  # one scale for every sample (token_mean, constant)
        weights = step.mask_flat * scale[0]
    else:
        weights = torch.repeat_interleave(scale, step.response_lengths_t, output_size=step.num_response_tokens)
        weights.mul_(step.mask_flat)
    return _finish_weights(step, weights)


def _require_step(step: StepBatch) -> None:
    if not isinstance(step, StepBatch):
        raise TypeError(f"step must be a StepBatch (got {describe(step)}); build one with StepBatch(...)")


def _check_divisor(divisor: float | None) -> None:
    # a token count: 1e-300 would give inf weights (NaN losses), 1e300 zero weights (a silent no-op)
    ok = isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and 1 <= divisor <= MAX_DIVISOR
    if not ok:
        raise ValueError(
            f"divisor must be a token count in [1, 2**31] with aggregation=constant (got {describe(divisor)}); "
            "pass the generation budget, e.g. the rollout's max response length"
        )


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


class ReducerFactory:
    """Builds step weights and per-micro-batch reducers for one loss configuration.

    Args:
        config: the validated :class:`~rl_loss.LossConfig` (default: sample_mean).
        check_finite: check each partial for NaN/inf and name the offending token (one scalar check).
    """

    def __init__(self, config: LossConfig | None = None, *, check_finite: bool = True):
        self.config = config if config is not None else LossConfig()
        self.check_finite = check_finite
        if not isinstance(self.config, LossConfig):
            raise TypeError(f"config must be a LossConfig (got {describe(self.config)}); build one with LossConfig(...)")
        path = self.config.custom_pg_reducer
        self._custom = load_custom_reducer(path) if path else None  # imports it: this builds a run

    @property
    def aggregation(self) -> str:
        """The aggregation mode of pg_loss (``custom`` when a custom pg reducer is configured)."""
        return "custom" if self._custom is not None else self.config.aggregation

    def step_weights(self, step: StepBatch) -> StepWeights:
        """pg_loss weights of ``step``, built once per step and cached on it."""
        _require_step(step)
        key = ("pg", self.aggregation, self.config.divisor, self.config.custom_pg_reducer)
        if key not in step._cache:
            if self._custom is not None:
                step._cache[key] = _finish_weights(step, _custom_weights(self._custom, step))
            else:
                step._cache[key] = build_step_weights(step, self.config.aggregation, self.config.divisor)
        return step._cache[key]

    def metric_weights(self, step: StepBatch) -> StepWeights:
        """Diagnostic weights of ``step``: always sample_mean, so runs with different modes compare."""
        _require_step(step)
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
        weights = self.step_weights(step).weights
        layout = (sample_indices, cp_rank, cp_size, qkv_format, max_seq_len)
        return local_reducer(weights, step, *layout, check_finite=self.check_finite)

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
        weights = self.metric_weights(step).weights
        layout = (sample_indices, cp_rank, cp_size, qkv_format, max_seq_len)
        return local_reducer(weights, step, *layout, check_finite=self.check_finite)


def _custom_weights(fn: TokenWeightFn, step: StepBatch) -> Tensor:
    try:
        return custom_weights_of(fn(step), step)
    except (TypeError, ValueError) as err:
        raise type(err)(f"custom_pg_reducer {err}") from None
