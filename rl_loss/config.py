"""The loss configuration: one pydantic model, the single source of truth for its fields.

Types, bounds, defaults and the rules that tie fields together live here; the YAML presets under
``conf/loss/`` hold values only, and Hydra's ``_target_`` builds a :class:`~rl_loss.ReducerFactory`
from them through :func:`build_reducer_factory`. Rules that need other sections of a training run
(steps per rollout, the rollout's max response length) live on the launcher's root model.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

from rl_loss.corrections_config import (
    CORRECTION_RULES,
    DEFAULT_CLIP_COV_LB,
    DEFAULT_CLIP_COV_RATIO,
    DEFAULT_CLIP_COV_UB,
    DEFAULT_KL_COV_COEF,
    DEFAULT_KL_COV_RATIO,
    CovPenalty,
    KlAggregation,
    RolloutCorrection,
)
from rl_loss.custom_reducer import check_reducer_path

Aggregation = Literal["sample_mean", "prompt_mean", "token_mean", "constant", "trajectory_mean"]
AGGREGATIONS: tuple[str, ...] = ("sample_mean", "prompt_mean", "token_mean", "constant", "trajectory_mean")
KlEstimator = Literal["k1", "k2", "k3"]
AdvantageEstimator = Literal["grpo", "drgrpo", "grpo_batch_std"]
Surrogate = Literal["ppo_clip", "cispo", "sapo", "gmpo", "dppo_tv", "dppo_kl", "vespo"]
SURROGATES: tuple[str, ...] = ("ppo_clip", "cispo", "sapo", "gmpo", "dppo_tv", "dppo_kl", "vespo")
RatioLevel = Literal["token", "sequence", "sequence_token"]

DEFAULT_EPS_CLIP = 0.2
"""Clip range used when eps_clip is unset (PPO's usual 0.2)."""
DEFAULT_SAPO_TAU_POS = 1.0
"""SAPO's temperature for positive advantages when sapo_tau_pos is unset (arXiv:2511.20347)."""
DEFAULT_SAPO_TAU_NEG = 1.05
"""SAPO's temperature for non-positive advantages when sapo_tau_neg is unset (arXiv:2511.20347)."""

DEFAULT_GMPO_EPS_CLIP = 0.4
"""GMPO's clip range in log space when eps_clip is unset: ratios clipped to [e^-0.4, e^0.4] (arXiv:2507.20673)."""
DEFAULT_DPPO_DELTA = 0.2
"""DPPO's divergence threshold when dppo_delta is unset (prime-rl's and verl's default, arXiv:2602.04879)."""
VESPO_DEFAULTS = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}
"""VESPO's gamma shapes k and rates lambda when unset (arXiv:2602.10693; TRL's and liger-kernel's defaults)."""
SURROGATE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "dppo_delta": ("dppo_tv", "dppo_kl"),
    "dppo_delta_high": ("dppo_tv", "dppo_kl"),
    "dppo_ratio_cap": ("dppo_tv", "dppo_kl"),
    **{name: ("vespo",) for name in VESPO_DEFAULTS},
}
"""Fields of one surrogate family -> the surrogates that read them (any other surrogate would ignore them)."""

FACTORY_TARGET = "rl_loss.build_reducer_factory"

MAX_DIVISOR = 2**31
"""Upper bound of Dr.GRPO's divisor L, a token count (a generation budget); its lower bound is 1 token."""


class RelabelNotice(UserWarning):
    """A setting was accepted under its canonical name (e.g. the per-token flag as token_mean)."""


class DivisorBelowMaxLength(UserWarning):
    """Dr.GRPO's divisor is below the longest possible response: pg_loss can exceed token_mean's scale."""


def _finite_positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


class LossConfig(BaseModel):
    """How the policy loss of a step is computed and aggregated (docs/aggregation.md, docs/objectives.md, docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, populate_by_name=True)

    target: Literal["rl_loss.build_reducer_factory"] = Field(FACTORY_TARGET, alias="_target_")
    """Hydra's builder of the reducer factory; always rl_loss.build_reducer_factory."""

    aggregation: Aggregation = "sample_mean"
    """How pg_loss is averaged over a step: sample_mean (GRPO) | prompt_mean (ScaleRL) | token_mean (DAPO) | constant (Dr.GRPO) | trajectory_mean (agent trajectories of several samples)."""

    divisor: float | None = Field(None, json_schema_extra={"minimum": 1, "maximum": MAX_DIVISOR})
    """L of Dr.GRPO: pg_loss = masked token sum / (N * L), N = samples per step. A token count in [1, 2**31]. Only with aggregation=constant."""

    calculate_per_token_loss: bool = False
    """Megatron's flag: a legacy spelling of aggregation=token_mean (set by it; sample_mean + flag is relabelled)."""

    surrogate: Surrogate = "ppo_clip"
    """Per-token policy loss: ppo_clip (PPO's clipped ratio) | cispo (MiniMax-M1: truncated, detached IS weight on a REINFORCE term) | sapo (soft sigmoid gate) | gmpo (clipped geometric mean of the token ratios) | dppo_tv, dppo_kl (REINFORCE term masked past a probability-divergence trust region) | vespo (gamma-shaped, detached weight of the sequence ratio); see docs/objectives-2026.md."""

    ratio_level: RatioLevel = "token"
    """Importance ratio per token, or per sequence (GSPO: exp of the sample's mean log-ratio), or sequence_token (GSPO-token: the sequence ratio's value with each token's own gradient); the last two with surrogate=ppo_clip only."""

    eps_clip: float | None = Field(None, gt=0, lt=1)
    """ppo_clip's clip range below 1: the ratio is clipped to [1 - eps_clip, 1 + eps_clip_high]; null means 0.2. With gmpo it is in log space: log-ratios clipped to [-eps_clip, eps_clip_high]; null means 0.4."""

    eps_clip_high: float | None = Field(None, gt=0, le=10)
    """Upper clip range (DAPO's clip-higher); null means eps_clip. With cispo the IS weight is truncated at 1 + eps_clip_high; with gmpo it is the upper log-ratio bound."""

    eps_clip_c: float | None = Field(None, gt=1)
    """Dual-clip constant (> 1, ppo_clip only): for negative advantages the loss is capped at -eps_clip_c * A; null disables."""

    sapo_tau_pos: float | None = Field(None, gt=0, le=100)
    """SAPO's gate temperature for positive advantages (surrogate=sapo only); null means 1.0."""

    sapo_tau_neg: float | None = Field(None, gt=0, le=100)
    """SAPO's gate temperature for zero or negative advantages (surrogate=sapo only); null means 1.05."""

    dppo_delta: float | None = Field(None, gt=0, le=1)
    """delta of DPPO (dppo_tv / dppo_kl only): a token is masked when its divergence from the old policy passes delta in the direction of A; null means 0.2."""

    dppo_delta_high: float | None = Field(None, gt=0, le=1)
    """DPPO's threshold for positive advantages (probability rising); null means dppo_delta."""

    dppo_ratio_cap: float | None = Field(None, gt=1)
    """C of DPPO: the detached ratio weight is truncated at C (verl's clip_ratio_c); null means no truncation (prime-rl)."""

    vespo_k_pos: float | None = Field(None, ge=0, le=100)
    """VESPO's gamma shape k for A >= 0 (surrogate=vespo only); null means 2.0."""

    vespo_lambda_pos: float | None = Field(None, gt=0, le=100)
    """VESPO's gamma rate lambda for A >= 0 (surrogate=vespo only); null means 3.0."""

    vespo_k_neg: float | None = Field(None, ge=0, le=100)
    """VESPO's gamma shape k for A < 0 (surrogate=vespo only); null means 3.0."""

    vespo_lambda_neg: float | None = Field(None, gt=0, le=100)
    """VESPO's gamma rate lambda for A < 0 (surrogate=vespo only); null means 2.0."""

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
    """Import path 'module:function' (or 'module.function') of a token-weight function step -> flat weights; replaces the aggregation. Validation checks its shape only; it is imported when a ReducerFactory or a run is built."""

    # --- corrections (docs/corrections.md) ---

    kl_aggregation: KlAggregation = "sample_mean"
    """How the KL term enters the loss: sample_mean (rl-loss's default) | pg (the configured aggregation, as verl, TRL and Liger)."""

    kl_clamp: float | None = Field(None, gt=0)
    """Clamp the k3 estimate to [-kl_clamp, kl_clamp] (verl's 10); null: no clamp. kl_estimator=k3 only."""

    cispo_clip_low: float | None = Field(None, gt=0, lt=1)
    """Lower bound of CISPO's IS weight: sg(clip(r, 1 - cispo_clip_low, 1 + eps_clip_high)) (slime, verl); null: none."""

    off_policy_mask_delta: float | None = Field(None, ge=0)
    """OPSM delta (DeepSeek-V3.2, arXiv:2512.02556): drop a sample with A < 0 whose mean KL(old || current) exceeds it; null: off."""

    cov_penalty: CovPenalty = "none"
    """Covariance-based entropy control (arXiv:2505.22617): none | clip_cov (detach high-covariance tokens) | kl_cov (KL-penalise them)."""

    clip_cov_ratio: float | None = Field(None, gt=0, le=1)
    """clip_cov: share of the step's tokens to detach (at least one); null means 0.0002."""

    clip_cov_lb: float | None = Field(None, allow_inf_nan=False)
    """clip_cov: candidates have covariance above this; null means 1.0."""

    clip_cov_ub: float | None = Field(None, allow_inf_nan=False)
    """clip_cov: candidates have covariance below this; null means 5.0."""

    kl_cov_ratio: float | None = Field(None, gt=0, le=1)
    """kl_cov: share of the step's tokens (largest covariance, at least one) to KL-penalise; null means 0.0002."""

    kl_cov_coef: float | None = Field(None, ge=0, le=100)
    """kl_cov: coefficient of |logp - logp_old| on the selected tokens; null means 1.0."""

    rollout_correction: RolloutCorrection = RolloutCorrection()
    """Corrections from the rollout engine's log-probs (TIS weights, rejection masks), as verl's rollout_corr_helper."""

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

    def _divisor_is_a_token_count(self) -> str | None:
        # L is a generation budget in tokens: 1e-300 gives infinite weights (NaN losses), 1e300 zero weights
        # (a silent no-op); a fraction of a token is a unit slip
        if _finite_positive(self.divisor) and not 1 <= self.divisor <= MAX_DIVISOR:
            return (
                f"divisor: must be a token count in [1, 2**31] (got {self.divisor:g}); "
                "set it to the generation budget in tokens, e.g. the rollout's max response length"
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

    def _custom_reducer_is_an_import_path(self) -> str | None:
        # the shape only: validating a config never imports (a file under review may name any module);
        # ReducerFactory and the launcher's preflight import it through load_custom_reducer
        if self.custom_pg_reducer is not None:
            return check_reducer_path(self.custom_pg_reducer)
        return None

    def _custom_reducer_without_flag(self) -> str | None:
        if self.custom_pg_reducer is not None and self.calculate_per_token_loss:
            return (
                "calculate_per_token_loss: would renormalise the custom pg reducer's weights by the token "
                f"count (got true with custom_pg_reducer={self.custom_pg_reducer!r}); set it to false"
            )
        return None

    def _sequence_ratio_needs_ppo_clip(self) -> str | None:
        if self.ratio_level != "token" and self.surrogate != "ppo_clip":
            own = " (gmpo and vespo take their per-sequence reductions themselves)" if self.surrogate in ("gmpo", "vespo") else ""
            return (
                f"ratio_level: the sequence ratio (GSPO) is defined for surrogate=ppo_clip only{own} "
                f"(got {self.ratio_level} with surrogate={self.surrogate}); set ratio_level=token or surrogate=ppo_clip"
            )
        return None

    def _eps_clip_only_with_ppo_clip(self) -> str | None:
        if self.eps_clip is not None and self.surrogate not in ("ppo_clip", "gmpo"):
            uses = "truncates the IS weight at 1 + eps_clip_high only" if self.surrogate == "cispo" else "has no clip"
            return (
                f"eps_clip: {self.surrogate} {uses}, so the lower clip range would be ignored "
                f"(got {self.eps_clip}); remove it or set surrogate=ppo_clip"
            )
        return None

    def _eps_clip_high_not_with_sapo(self) -> str | None:
        if self.eps_clip_high is not None and self.surrogate in ("sapo", "dppo_tv", "dppo_kl", "vespo"):
            gate = {"sapo": "a soft gate with sapo_tau_pos / sapo_tau_neg", "vespo": "a gamma weight with vespo_k_* / vespo_lambda_*"}
            how = gate.get(self.surrogate, "a trust-region mask with dppo_delta / dppo_delta_high")
            return (
                f"eps_clip_high: {self.surrogate} has no clip ({how}), so it would be "
                f"ignored (got {self.eps_clip_high}); remove it or set surrogate=ppo_clip or cispo"
            )
        return None

    def _surrogate_parameters_used(self) -> str | None:
        problems = [
            f"{name}: is only used by surrogate={' or '.join(users)}, it would be ignored with "
            f"surrogate={self.surrogate} (got {value}); remove it or set surrogate={users[0]}"
            for name, users in SURROGATE_PARAMETERS.items()
            if (value := getattr(self, name)) is not None and self.surrogate not in users
        ]
        return "\n".join(problems) or None

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
    def cov_lb(self) -> float:
        """clip_cov's lower covariance bound: clip_cov_lb, or 1.0 when unset."""
        return DEFAULT_CLIP_COV_LB if self.clip_cov_lb is None else self.clip_cov_lb

    @property
    def cov_ub(self) -> float:
        """clip_cov's upper covariance bound: clip_cov_ub, or 5.0 when unset."""
        return DEFAULT_CLIP_COV_UB if self.clip_cov_ub is None else self.clip_cov_ub

    @property
    def cov_ratio(self) -> float:
        """Share of the step's tokens that the covariance penalty selects (clip_cov_ratio or kl_cov_ratio)."""
        value = self.clip_cov_ratio if self.cov_penalty == "clip_cov" else self.kl_cov_ratio
        default = DEFAULT_CLIP_COV_RATIO if self.cov_penalty == "clip_cov" else DEFAULT_KL_COV_RATIO
        return default if value is None else value

    @property
    def cov_kl_coef(self) -> float:
        """KL-cov's coefficient: kl_cov_coef, or 1.0 when unset."""
        return DEFAULT_KL_COV_COEF if self.kl_cov_coef is None else self.kl_cov_coef

    @property
    def clip_low(self) -> float:
        """Lower clip range of ppo_clip (gmpo: in log space): eps_clip, or 0.2 (gmpo: 0.4) when unset."""
        if self.eps_clip is not None:
            return self.eps_clip
        return DEFAULT_GMPO_EPS_CLIP if self.surrogate == "gmpo" else DEFAULT_EPS_CLIP

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

    @property
    def dppo_thresholds(self) -> tuple[float, float]:
        """DPPO's (delta_low, delta_high): dppo_delta or 0.2, and dppo_delta_high or delta_low."""
        low = DEFAULT_DPPO_DELTA if self.dppo_delta is None else self.dppo_delta
        return low, low if self.dppo_delta_high is None else self.dppo_delta_high

    @property
    def vespo_shape(self) -> tuple[float, float, float, float]:
        """VESPO's (k_pos, lambda_pos, k_neg, lambda_neg), each field or its default (2, 3, 3, 2)."""
        names = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
        return tuple(VESPO_DEFAULTS[n] if getattr(self, n) is None else getattr(self, n) for n in names)  # type: ignore[return-value]


LOSS_RULES = (
    LossConfig._constant_needs_divisor,
    LossConfig._divisor_is_a_token_count,
    LossConfig._divisor_only_with_constant,
    LossConfig._per_token_flag_keeps_mode,
    LossConfig._custom_reducer_alone,
    LossConfig._custom_reducer_is_an_import_path,
    LossConfig._custom_reducer_without_flag,
    LossConfig._sequence_ratio_needs_ppo_clip,
    LossConfig._eps_clip_only_with_ppo_clip,
    LossConfig._eps_clip_high_not_with_sapo,
    LossConfig._dual_clip_only_with_ppo_clip,
    LossConfig._sapo_temperatures_only_with_sapo,
    *CORRECTION_RULES,
    LossConfig._surrogate_parameters_used,
)
"""LossConfig's cross-field rules, one named method each: a rule returns its problem line, or None."""
