"""The ``loss/base`` node of the Hydra plugin: LossConfig's defaults as plain values.

GENERATED from rl_loss.config.LossConfig by `make schema` (python -m launchers.config.schema --write); do not edit.
A literal, so that the plugin imports neither torch nor rl_loss; tests/test_hydra_plugin.py fails
when it differs from LossConfig().model_dump(mode="json", by_alias=True).
"""

LOSS_BASE = {
    "_target_": "rl_loss.build_reducer_factory",
    "aggregation": "sample_mean",
    "divisor": None,
    "calculate_per_token_loss": False,
    "surrogate": "ppo_clip",
    "ratio_level": "token",
    "eps_clip": None,
    "eps_clip_high": None,
    "eps_clip_c": None,
    "sapo_tau_pos": None,
    "sapo_tau_neg": None,
    "dppo_delta": None,
    "dppo_delta_high": None,
    "dppo_ratio_cap": None,
    "vespo_k_pos": None,
    "vespo_lambda_pos": None,
    "vespo_k_neg": None,
    "vespo_lambda_neg": None,
    "kl_coef": 0.0,
    "kl_estimator": "k3",
    "entropy_coef": 0.0,
    "advantage_estimator": "grpo",
    "advantage_eps": 1e-06,
    "custom_pg_reducer": None,
    "kl_aggregation": "sample_mean",
    "kl_clamp": None,
    "cispo_clip_low": None,
    "off_policy_mask_delta": None,
    "cov_penalty": "none",
    "clip_cov_ratio": None,
    "clip_cov_lb": None,
    "clip_cov_ub": None,
    "kl_cov_ratio": None,
    "kl_cov_coef": None,
    "rollout_correction": {'is_level': None, 'is_threshold': 2.0, 'rs': None, 'rs_threshold_low': None, 'rs_threshold_high': None},
}
