"""Configuration of the loss corrections (docs/corrections.md): rollout correction, OPSM, clip-cov / KL-cov,
the KL term's aggregation and clamp, CISPO's lower bound.

:class:`RolloutCorrection` is the nested ``loss.rollout_correction`` section; the other fields live on
:class:`rl_loss.LossConfig`, whose cross-field rules include :data:`CORRECTION_RULES` (one function per
rule, returning its problem line or None). No torch here: the Hydra plugin and ``rl-loss-validate`` import
the config without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

if TYPE_CHECKING:
    from rl_loss.config import LossConfig

CovPenalty = Literal["none", "clip_cov", "kl_cov"]
KlAggregation = Literal["sample_mean", "pg"]
IsLevel = Literal["token", "sequence"]
RejectionOption = Literal[
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
]  # fmt: skip

DEFAULT_CLIP_COV_RATIO = 2e-4
"""clip-cov's share of tokens to detach when clip_cov_ratio is unset (verl's and arXiv:2505.22617's 0.0002)."""
DEFAULT_CLIP_COV_LB = 1.0
"""clip-cov's lower covariance bound when clip_cov_lb is unset (verl's 1.0)."""
DEFAULT_CLIP_COV_UB = 5.0
"""clip-cov's upper covariance bound when clip_cov_ub is unset (verl's 5.0)."""
DEFAULT_KL_COV_RATIO = 2e-4
"""KL-cov's share of tokens to penalise when kl_cov_ratio is unset (verl's 0.0002)."""
DEFAULT_KL_COV_COEF = 1.0
"""KL-cov's coefficient of |logp - logp_old| when kl_cov_coef is unset (verl's ppo_kl_coef 1.0)."""


class RolloutCorrection(BaseModel):
    """Correction for the rollout engine's log-probs differing from the trainer's (verl ``rollout_corr_helper``).

    With r = pi_old_train / pi_rollout per token (log-ratio clamped to [-20, 20]): truncated importance
    weights (``is_level``) and one rejection option (``rs``) whose tokens or samples outside the bounds get
    numerator mask 0. Formulas: docs/corrections.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    is_level: IsLevel | None = None
    """Truncated IS weights: token (min(r_t, C)) | sequence (min(prod_t r_t, C) for every token of the sample); null: none."""

    is_threshold: float = Field(2.0, gt=0, le=1e6)
    """C, the cap of the truncated IS weights (verl's rollout_is_threshold, default 2.0)."""

    rs: RejectionOption | None = None
    """Rejection option (verl's rollout_rs): token_k1 | seq_sum_k1 | seq_mean_k1 (ratio bounds) or *_k2 / *_k3 (upper bound); null: none."""

    rs_threshold_low: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Lower ratio bound of a *_k1 option; null means 1 / rs_threshold_high (verl's default)."""

    rs_threshold_high: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Upper bound of the rejection option: a ratio bound for *_k1, the largest k2 / k3 divergence otherwise."""

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems = [message for rule in ROLLOUT_RULES if (message := rule(self))]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _rs_needs_upper_bound(self) -> str | None:
        if self.rs is not None and self.rs_threshold_high is None:
            return (
                f"rs_threshold_high: the rejection option rs={self.rs} needs its upper bound (got None); "
                "set it, e.g. 2.0 for a *_k1 ratio bound"
            )
        return None

    def _bounds_need_rs(self) -> str | None:
        for name in ("rs_threshold_low", "rs_threshold_high"):
            if getattr(self, name) is not None and self.rs is None:
                return f"{name}: is only used with a rejection option, it would be ignored (got {getattr(self, name)}); set rs or remove it"
        return None

    def _lower_bound_only_for_k1(self) -> str | None:
        if self.rs_threshold_low is not None and self.rs is not None and not self.rs.endswith("k1"):
            return (
                f"rs_threshold_low: {self.rs} has an upper bound only, so the lower bound would be ignored "
                f"(got {self.rs_threshold_low}); remove it or use a *_k1 option"
            )
        return None

    def _ratio_bounds_ordered(self) -> str | None:
        ordered = self.rs is None or not self.rs.endswith("k1") or self.rs_threshold_high is None
        if not ordered and self.ratio_low > self.rs_threshold_high:
            return (
                f"rs_threshold_low: must not exceed rs_threshold_high={self.rs_threshold_high} "
                f"(got {self.ratio_low}); every token would be rejected"
            )
        return None

    @property
    def ratio_low(self) -> float:
        """Lower ratio bound of a *_k1 option: rs_threshold_low, or 1 / rs_threshold_high when unset."""
        if self.rs_threshold_low is not None:
            return self.rs_threshold_low
        return 1.0 / self.rs_threshold_high if self.rs_threshold_high else 0.0

    @property
    def enabled(self) -> bool:
        """Does the section ask for any weight or mask?"""
        return self.is_level is not None or self.rs is not None


ROLLOUT_RULES = (
    RolloutCorrection._rs_needs_upper_bound,
    RolloutCorrection._bounds_need_rs,
    RolloutCorrection._lower_bound_only_for_k1,
    RolloutCorrection._ratio_bounds_ordered,
)


# --- LossConfig rules of the correction fields (each takes the LossConfig) --------------------------------------


def _cov_penalty_needs_token_ppo_clip(config: LossConfig) -> str | None:
    if config.cov_penalty != "none" and (config.surrogate != "ppo_clip" or config.ratio_level != "token"):
        return (
            f"cov_penalty: {config.cov_penalty} acts on PPO's per-token ratio (arXiv:2505.22617), so it needs "
            f"surrogate=ppo_clip and ratio_level=token (got surrogate={config.surrogate}, "
            f"ratio_level={config.ratio_level}); set them or cov_penalty=none"
        )
    return None


def _kl_cov_has_no_clip(config: LossConfig) -> str | None:
    if config.cov_penalty == "kl_cov":
        for name in ("eps_clip", "eps_clip_high", "eps_clip_c"):
            if getattr(config, name) is not None:
                return (
                    f"{name}: cov_penalty=kl_cov replaces PPO's clip by a KL penalty on the selected tokens, so "
                    f"the clip range would be ignored (got {getattr(config, name)}); remove it or use clip_cov"
                )
    return None


def _cov_fields_match_penalty(config: LossConfig) -> str | None:
    for name, owner in (("clip_cov_ratio", "clip_cov"), ("clip_cov_lb", "clip_cov"), ("clip_cov_ub", "clip_cov"),
                        ("kl_cov_ratio", "kl_cov"), ("kl_cov_coef", "kl_cov")):
        value = getattr(config, name)
        if value is not None and config.cov_penalty != owner:
            return (
                f"{name}: is only used with cov_penalty={owner}, it would be ignored with "
                f"cov_penalty={config.cov_penalty} (got {value}); remove it or set cov_penalty={owner}"
            )
    return None


def _clip_cov_bounds_ordered(config: LossConfig) -> str | None:
    if config.cov_penalty == "clip_cov" and config.cov_lb >= config.cov_ub:
        return (
            f"clip_cov_lb: must be below clip_cov_ub={config.cov_ub} (got {config.cov_lb}); no token's "
            "covariance could fall between them"
        )
    return None


def _kl_clamp_only_for_k3(config: LossConfig) -> str | None:
    if config.kl_clamp is not None and config.kl_estimator != "k3":
        return (
            f"kl_clamp: clamps the k3 estimate only (as verl does), it would be ignored with "
            f"kl_estimator={config.kl_estimator} (got {config.kl_clamp}); remove it or set kl_estimator=k3"
        )
    return None


def _cispo_clip_low_only_with_cispo(config: LossConfig) -> str | None:
    if config.cispo_clip_low is not None and config.surrogate != "cispo":
        return (
            f"cispo_clip_low: bounds CISPO's IS weight below and would be ignored with "
            f"surrogate={config.surrogate} (got {config.cispo_clip_low}); remove it or set surrogate=cispo"
        )
    return None


CORRECTION_RULES = (
    _cov_penalty_needs_token_ppo_clip,
    _kl_cov_has_no_clip,
    _cov_fields_match_penalty,
    _clip_cov_bounds_ordered,
    _kl_clamp_only_for_k3,
    _cispo_clip_low_only_with_cispo,
)
"""LossConfig's rules of the correction fields, appended to ``rl_loss.config.LOSS_RULES``."""
