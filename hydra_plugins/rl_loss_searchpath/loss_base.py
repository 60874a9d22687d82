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
}
