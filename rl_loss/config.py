"""The loss configuration: one pydantic model, the single source of truth for its fields.

Types, bounds, defaults and the rules that tie fields together live here; the YAML presets under
``conf/loss/`` hold values only, and Hydra's ``_target_`` builds a :class:`~rl_loss.ReducerFactory`
from them through :func:`build_reducer_factory`. Rules that need other sections of a training run
(steps per rollout, the rollout's max response length) live on the launcher's root model.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

Aggregation = Literal["sample_mean", "prompt_mean", "token_mean", "constant", "trajectory_mean"]
AGGREGATIONS: tuple[str, ...] = ("sample_mean", "prompt_mean", "token_mean", "constant", "trajectory_mean")
KlEstimator = Literal["k1", "k2", "k3"]
AdvantageEstimator = Literal["grpo", "drgrpo", "grpo_batch_std"]
Surrogate = Literal["ppo_clip", "cispo", "sapo"]
SURROGATES: tuple[str, ...] = ("ppo_clip", "cispo", "sapo")
RatioLevel = Literal["token", "sequence"]

DEFAULT_EPS_CLIP = 0.2
"""Clip range used when eps_clip is unset (PPO's usual 0.2)."""
DEFAULT_SAPO_TAU_POS = 1.0
"""SAPO's temperature for positive advantages when sapo_tau_pos is unset (arXiv:2511.20347)."""
DEFAULT_SAPO_TAU_NEG = 1.05
"""SAPO's temperature for non-positive advantages when sapo_tau_neg is unset (arXiv:2511.20347)."""

FACTORY_TARGET = "rl_loss.build_reducer_factory"


class RelabelNotice(UserWarning):
    """A setting was accepted under its canonical name (e.g. the per-token flag as token_mean)."""


class DivisorBelowMaxLength(UserWarning):
    """Dr.GRPO's divisor is below the longest possible response: pg_loss can exceed token_mean's scale."""


def import_callable(path: str) -> Callable[..., Any]:
    """The callable at ``'package.module:function'`` (or ``'package.module.function'``).

    Raises:
        ValueError: naming custom_pg_reducer when the path does not import or is not callable.
    """
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not (sep and module_name and attr):
        raise ValueError(f"custom_pg_reducer: {path!r} is not an import path; use 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"custom_pg_reducer: cannot import {path!r} ({err}); use 'package.module:function'") from None
    if not callable(fn):
        raise ValueError(f"custom_pg_reducer: {path!r} is not callable (got {type(fn).__name__})")
    return fn


def _finite_positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


class LossConfig(BaseModel):
    """How the policy loss of a step is computed and aggregated (docs/aggregation.md, docs/objectives.md, docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, populate_by_name=True)

    target: Literal["rl_loss.build_reducer_factory"] = Field(FACTORY_TARGET, alias="_target_")
    """Hydra's builder of the reducer factory; always rl_loss.build_reducer_factory."""

    aggregation: Aggregation = "sample_mean"
    """How pg_loss is averaged over a step: sample_mean (GRPO) | prompt_mean (ScaleRL) | token_mean (DAPO) | constant (Dr.GRPO) | trajectory_mean (agent trajectories of several samples)."""

    divisor: float | None = None
    """L of Dr.GRPO: pg_loss = masked token sum / (N * L), N = samples per step. Only with aggregation=constant."""

    calculate_per_token_loss: bool = False
    """Megatron's flag: a legacy spelling of aggregation=token_mean (set by it; sample_mean + flag is relabelled)."""

    surrogate: Surrogate = "ppo_clip"
    """Per-token policy loss: ppo_clip (PPO's clipped ratio) | cispo (MiniMax-M1: truncated, detached IS weight on a REINFORCE term) | sapo (soft sigmoid gate)."""

    ratio_level: RatioLevel = "token"
    """Importance ratio per token, or per sequence (GSPO: exp of the sample's mean log-ratio; surrogate=ppo_clip only)."""

    eps_clip: float | None = Field(None, gt=0, lt=1)
    """ppo_clip's clip range below 1: the ratio is clipped to [1 - eps_clip, 1 + eps_clip_high]; null means 0.2."""

    eps_clip_high: float | None = Field(None, gt=0, le=10)
    """Upper clip range (DAPO's clip-higher); null means eps_clip (0.2). With cispo the IS weight is truncated at 1 + eps_clip_high."""

    eps_clip_c: float | None = Field(None, gt=1)
    """Dual-clip constant (> 1, ppo_clip only): for negative advantages the loss is capped at -eps_clip_c * A; null disables."""

    sapo_tau_pos: float | None = Field(None, gt=0, le=100)
    """SAPO's gate temperature for positive advantages (surrogate=sapo only); null means 1.0."""

    sapo_tau_neg: float | None = Field(None, gt=0, le=100)
    """SAPO's gate temperature for zero or negative advantages (surrogate=sapo only); null means 1.05."""

    kl_coef: float = Field(0.0, ge=0, le=100)
    """Weight of the KL penalty to the reference policy; 0 builds no reference model."""

    kl_estimator: KlEstimator = "k3"
    """KL estimator with d = logp - logp_ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d."""

    entropy_coef: float = Field(0.0, ge=0, le=100)
    """Weight of the entropy bonus subtracted from the loss."""

    advantage_estimator: AdvantageEstimator = "grpo"
    """grpo: (r - group mean) / (group std + eps); drgrpo: r - group mean; grpo_batch_std: (r - group mean) / (batch std + eps) (ScaleRL)."""

    advantage_eps: float = Field(1e-6, gt=0, le=1)
    """eps added to the std of the grpo and grpo_batch_std estimators."""

    custom_pg_reducer: str | None = None
    """Import path 'module:function' (or 'module.function') of a token-weight function step -> flat weights; replaces the aggregation."""

    @model_validator(mode="before")
    @classmethod
    def _per_token_flag_is_token_mean(cls, data: Any) -> Any:
        # One axis, two spellings: token_mean sets Megatron's flag, and the flag with the default mode
        # (an existing Megatron recipe) is relabelled token_mean rather than rejected.
        if not isinstance(data, dict):
            return data
        aggregation = data.get("aggregation", "sample_mean")
        if aggregation == "token_mean" and not data.get("calculate_per_token_loss"):
            data = {**data, "calculate_per_token_loss": True}
        elif (
            data.get("calculate_per_token_loss") is True
            and aggregation == "sample_mean"
            and data.get("custom_pg_reducer") is None
        ):
            warnings.warn(
                "loss.calculate_per_token_loss=true with aggregation=sample_mean: relabelled aggregation=token_mean "
                "(the flag is the legacy spelling of token_mean)",
                RelabelNotice,
                stacklevel=2,
            )
            data = {**data, "aggregation": "token_mean"}
        return data

    @model_validator(mode="after")
    def _rules(self) -> Self:
        # Every rule runs, so that one message lists every problem, one line each (like RunConfig's rules).
        problems = [message for rule in LOSS_RULES if (message := rule(self))]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _constant_needs_divisor(self) -> str | None:
        if self.aggregation == "constant" and not _finite_positive(self.divisor):
            return (
                f"divisor: must be a finite number > 0 when aggregation=constant (got {self.divisor}); "
                "set it to the generation budget, e.g. the rollout's max response length"
            )
        return None

    def _divisor_only_with_constant(self) -> str | None:
        if self.divisor is not None and self.aggregation != "constant":
            return (
                f"divisor: is only used by aggregation=constant, it would be ignored with "
                f"aggregation={self.aggregation} (got {self.divisor}); remove it or set aggregation=constant"
            )
        return None

    def _per_token_flag_keeps_mode(self) -> str | None:
        if self.calculate_per_token_loss and self.aggregation in ("constant", "prompt_mean", "trajectory_mean"):
            return (
                f"calculate_per_token_loss: Megatron would renormalise pg_loss by the token count and erase "
                f"the {self.aggregation} denominators (got true with aggregation={self.aggregation}); "
                "set calculate_per_token_loss=false"
            )
        return None

    def _custom_reducer_alone(self) -> str | None:
        if self.custom_pg_reducer is not None and self.aggregation != "sample_mean":
            return (
                f"custom_pg_reducer: a custom pg reducer replaces the aggregation, so "
                f"aggregation={self.aggregation} would be silently ignored (got {self.custom_pg_reducer!r}); "
                "leave aggregation at sample_mean or drop custom_pg_reducer"
            )
        return None

    def _custom_reducer_importable(self) -> str | None:
        if self.custom_pg_reducer is not None:
            try:
                import_callable(self.custom_pg_reducer)  # fail at validation, not at the first step
            except ValueError as err:
                return str(err)
        return None

    def _custom_reducer_without_flag(self) -> str | None:
        if self.custom_pg_reducer is not None and self.calculate_per_token_loss:
            return (
                "calculate_per_token_loss: would renormalise the custom pg reducer's weights by the token "
                f"count (got true with custom_pg_reducer={self.custom_pg_reducer!r}); set it to false"
            )
        return None

    def _sequence_ratio_needs_ppo_clip(self) -> str | None:
        if self.ratio_level == "sequence" and self.surrogate != "ppo_clip":
            return (
                f"ratio_level: the sequence ratio (GSPO) is defined for surrogate=ppo_clip only "
                f"(got sequence with surrogate={self.surrogate}); set ratio_level=token or surrogate=ppo_clip"
            )
        return None

    def _eps_clip_only_with_ppo_clip(self) -> str | None:
        if self.eps_clip is not None and self.surrogate != "ppo_clip":
            uses = "truncates the IS weight at 1 + eps_clip_high only" if self.surrogate == "cispo" else "has no clip"
            return (
                f"eps_clip: {self.surrogate} {uses}, so the lower clip range would be ignored "
                f"(got {self.eps_clip}); remove it or set surrogate=ppo_clip"
            )
        return None

    def _eps_clip_high_not_with_sapo(self) -> str | None:
        if self.eps_clip_high is not None and self.surrogate == "sapo":
            return (
                f"eps_clip_high: sapo has no clip (a soft gate with sapo_tau_pos / sapo_tau_neg), so it would be "
                f"ignored (got {self.eps_clip_high}); remove it or set surrogate=ppo_clip or cispo"
            )
        return None

    def _dual_clip_only_with_ppo_clip(self) -> str | None:
        if self.eps_clip_c is not None and self.surrogate != "ppo_clip":
            return (
                f"eps_clip_c: the dual clip belongs to ppo_clip and would be ignored with surrogate={self.surrogate} "
                f"(got {self.eps_clip_c}); remove it or set surrogate=ppo_clip"
            )
        return None

    def _sapo_temperatures_only_with_sapo(self) -> str | None:
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            value = getattr(self, name)
            if value is not None and self.surrogate != "sapo":
                return (
                    f"{name}: is only used by surrogate=sapo, it would be ignored with surrogate={self.surrogate} "
                    f"(got {value}); remove it or set surrogate=sapo"
                )
        return None

    @property
    def clip_low(self) -> float:
        """Lower clip range of ppo_clip: eps_clip, or 0.2 when unset."""
        return DEFAULT_EPS_CLIP if self.eps_clip is None else self.eps_clip

    @property
    def clip_high(self) -> float:
        """Upper clip range (ppo_clip) or IS-weight cap minus 1 (cispo): eps_clip_high, or clip_low when unset."""
        return self.clip_low if self.eps_clip_high is None else self.eps_clip_high

    @property
    def tau_pos(self) -> float:
        """SAPO's temperature for positive advantages: sapo_tau_pos, or 1.0 when unset."""
        return DEFAULT_SAPO_TAU_POS if self.sapo_tau_pos is None else self.sapo_tau_pos

    @property
    def tau_neg(self) -> float:
        """SAPO's temperature for zero or negative advantages: sapo_tau_neg, or 1.05 when unset."""
        return DEFAULT_SAPO_TAU_NEG if self.sapo_tau_neg is None else self.sapo_tau_neg


LOSS_RULES = (
    LossConfig._constant_needs_divisor,
    LossConfig._divisor_only_with_constant,
    LossConfig._per_token_flag_keeps_mode,
    LossConfig._custom_reducer_alone,
    LossConfig._custom_reducer_importable,
    LossConfig._custom_reducer_without_flag,
    LossConfig._sequence_ratio_needs_ppo_clip,
    LossConfig._eps_clip_only_with_ppo_clip,
    LossConfig._eps_clip_high_not_with_sapo,
    LossConfig._dual_clip_only_with_ppo_clip,
    LossConfig._sapo_temperatures_only_with_sapo,
)
"""LossConfig's cross-field rules, one named method each: a rule returns its problem line, or None."""
