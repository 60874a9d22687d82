"""rl-loss: policy-gradient loss aggregation for LLM RL, exact under micro-batching, DP and CP."""

from __future__ import annotations

from typing import Any

from rl_loss.advantages import group_advantages
from rl_loss.aggregation import EmptyStepWarning, ReducerFactory, StepWeights, TokenReducer, build_step_weights
from rl_loss.config import AGGREGATIONS, SURROGATES, DivisorBelowMaxLength, LossConfig, RelabelNotice
from rl_loss.config_errors import ConfigError, validate_model
from rl_loss.corrections_config import RolloutCorrection
from rl_loss.covariance import covariance_selection
from rl_loss.layout import local_response_ranges
from rl_loss.policy_loss import kl_penalty, policy_loss, truncated_importance_weights
from rl_loss.rollout_correction import rollout_correction_terms
from rl_loss.sample_masks import off_policy_sequence_mask
from rl_loss.step import StepBatch
from rl_loss.surrogates import cispo_pg_loss, clipped_pg_loss, sapo_pg_loss, sequence_importance_ratio

__version__ = "0.1.0"


def build_reducer_factory(**loss_fields: Any) -> ReducerFactory:
    """Validate loss fields (e.g. a Hydra ``loss`` group) and return their :class:`ReducerFactory`.

    This is the ``_target_`` of every ``conf/loss/*.yaml``: ``hydra.utils.instantiate(cfg.loss)``.

    Raises:
        ConfigError: (a ``ValueError``) with one line per problem, each naming the field as
            ``loss.FIELD``, the value given and the fix.
    """
    return ReducerFactory(validate_model(LossConfig, loss_fields, prefix="loss"))  # field and cross-field lines at once


__all__ = [
    "AGGREGATIONS",
    "ConfigError",
    "DivisorBelowMaxLength",
    "EmptyStepWarning",
    "LossConfig",
    "ReducerFactory",
    "RelabelNotice",
    "RolloutCorrection",
    "SURROGATES",
    "StepBatch",
    "StepWeights",
    "TokenReducer",
    "build_reducer_factory",
    "build_step_weights",
    "cispo_pg_loss",
    "clipped_pg_loss",
    "covariance_selection",
    "group_advantages",
    "kl_penalty",
    "local_response_ranges",
    "off_policy_sequence_mask",
    "policy_loss",
    "rollout_correction_terms",
    "sapo_pg_loss",
    "sequence_importance_ratio",
    "truncated_importance_weights",
]
