"""GRPOConfig settings RLLossGRPOTrainer honours or rejects: never silently ignored (docs/configuration.md, docs/integrations/trl.md)."""

from __future__ import annotations

import pytest

from benchmarks import _trl_workload as workload
from rl_loss import LossConfig
from rl_loss.integrations.trl_checks import check_grpo_config, grpo_config_problems


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("trl_checks"))


def problems(out: str, loss: LossConfig | None = None, **grpo: object) -> list[str]:
    return grpo_config_problems(workload.grpo_config(out, **grpo), loss or LossConfig())


def test_defaults_are_consistent(out):
    assert problems(out) == []


def test_a_mode_trl_cannot_express_is_rejected_by_name(out):
    # a mode another part of rl-loss may add (validated elsewhere), read at run time
    loss = LossConfig.model_construct(aggregation="trajectory_mean")
    (line,) = problems(out, loss)
    assert line.startswith("loss_config.aggregation:") and "'trajectory_mean'" in line and "sample_mean" in line


@pytest.mark.parametrize("loss", [LossConfig(aggregation="token_mean"), LossConfig(aggregation="prompt_mean"),
                                  LossConfig(custom_pg_reducer="tests.custom_weights:double_sample_mean")])
def test_a_step_mixing_generations_needs_a_mode_of_local_weights(out, loss):
    # GA 2 over generations of 1 micro-batch: the second half of a step is not generated when the first trains
    (line,) = problems(out, loss, steps_per_generation=1, gradient_accumulation_steps=2)
    assert line.startswith("GRPOConfig.steps_per_generation:") and "got steps_per_generation=1" in line
    assert problems(out, loss, steps_per_generation=2, gradient_accumulation_steps=2) == []


@pytest.mark.parametrize("loss", [LossConfig(aggregation="sample_mean"), LossConfig(aggregation="constant", divisor=6.0)])
def test_sample_mean_and_constant_accept_any_steps_per_generation(out, loss):
    assert problems(out, loss, steps_per_generation=1, gradient_accumulation_steps=2) == []
    assert problems(out, loss, steps_per_generation=3, gradient_accumulation_steps=2) == []


def test_prompt_mean_needs_one_optimizer_step_per_generation(out):
    loss = LossConfig(aggregation="prompt_mean")
    (line,) = problems(out, loss, steps_per_generation=4, gradient_accumulation_steps=2)
    assert line.startswith("GRPOConfig.steps_per_generation:") and "set steps_per_generation=2" in line
    assert problems(out, loss, steps_per_generation=2, gradient_accumulation_steps=2) == []


@pytest.mark.parametrize(
    ("loss_type", "loss", "accepted"),
    [
        ("grpo", LossConfig(aggregation="sample_mean"), True),
        ("grpo", LossConfig(aggregation="token_mean"), False),
        ("dr_grpo", LossConfig(aggregation="constant", divisor=6.0), True),  # max_completion_length=6
        ("dr_grpo", LossConfig(aggregation="constant", divisor=512.0), False),
        ("bnpo", LossConfig(aggregation="token_mean"), False),
    ],
)
def test_loss_type_must_mean_the_loss_config(out, loss_type, loss, accepted):
    found = problems(out, loss, loss_type=loss_type)
    if accepted:
        assert found == []
    else:
        (line,) = found
        assert line.startswith("GRPOConfig.loss_type:") and f"got loss_type={loss_type!r}" in line


def test_trl_clip_ranges_must_equal_the_loss_configs(out):
    (low,) = problems(out, LossConfig(eps_clip=0.2), epsilon=0.3)
    assert low.startswith("GRPOConfig.epsilon:") and "got epsilon=0.3" in low
    (high,) = problems(out, LossConfig(), epsilon_high=0.28)
    assert high.startswith("GRPOConfig.epsilon_high:") and "got epsilon_high=0.28" in high
    assert problems(out, LossConfig(eps_clip=0.3, eps_clip_high=0.28), epsilon=0.3, epsilon_high=0.28) == []


def test_delta_is_accepted_only_as_the_same_dual_clip(out):
    (line,) = problems(out, LossConfig(), delta=3.0)
    assert line.startswith("GRPOConfig.delta:") and "got delta=3.0" in line
    assert problems(out, LossConfig(eps_clip_c=3.0), delta=3.0) == []


def test_parameters_of_trls_own_surrogates_are_rejected(out):
    (line,) = problems(out, sapo_temperature_pos=2.0)
    assert line.startswith("GRPOConfig.sapo_temperature_pos:") and "got 2.0" in line


def test_sequence_level_ratio_needs_the_loss_configs_ratio_level(out):
    (line,) = problems(out, LossConfig(), importance_sampling_level="sequence")
    assert line.startswith("GRPOConfig.importance_sampling_level:") and "'sequence'" in line


def test_kl_coefficient_has_one_source(out):
    no_ref, then_corrected = problems(out, LossConfig(kl_coef=0.04))  # the second follows once beta is set
    assert no_ref.startswith("GRPOConfig.beta:") and "beta=0.0, kl_coef=0.04" in no_ref
    assert then_corrected.startswith("GRPOConfig.use_bias_correction_kl:")
    (unused,) = problems(out, LossConfig(), beta=0.04, use_bias_correction_kl=False)
    assert unused.startswith("GRPOConfig.beta:") and "beta=0.04, kl_coef=0.0" in unused
    (corrected,) = problems(out, LossConfig(kl_coef=0.04), beta=0.04)  # TRL's default use_bias_correction_kl=True
    assert corrected.startswith("GRPOConfig.use_bias_correction_kl:")
    assert problems(out, LossConfig(kl_coef=0.04), beta=0.04, use_bias_correction_kl=False) == []


def test_trl_entropy_bonus_is_rejected_for_the_loss_configs(out):
    (coef,) = problems(out, entropy_coef=0.01)
    assert coef.startswith("GRPOConfig.entropy_coef:") and "loss_config.entropy_coef=0.01" in coef
    assert any(line.startswith("GRPOConfig.use_adaptive_entropy:") for line in problems(out, use_adaptive_entropy=True))


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_entropy_quantile", 0.2), ("off_policy_mask_threshold", 0.5), ("mask_truncated_completions", True)],
)
def test_trl_only_token_edits_are_rejected(out, field, value):
    (line,) = problems(out, **{field: value})
    assert line.startswith(f"GRPOConfig.{field}:") and str(value) in line


def test_advantage_settings_that_are_set_must_match_trls(out):
    (estimator,) = problems(out, LossConfig(advantage_estimator="drgrpo"))
    assert estimator.startswith("loss_config.advantage_estimator:") and "scale_rewards='none'" in estimator
    assert problems(out, LossConfig(advantage_estimator="drgrpo"), scale_rewards="none") == []
    (eps,) = problems(out, LossConfig(advantage_eps=1e-5))
    assert eps.startswith("loss_config.advantage_eps:") and "0.0001" in eps
    assert problems(out, LossConfig(advantage_eps=1e-4)) == []


def test_loss_fields_at_their_defaults_count_as_unset(out):
    # a Hydra-composed loss node sets every field, most of them to their defaults
    every_field = LossConfig.model_validate(LossConfig().model_dump(by_alias=True))
    assert "advantage_eps" in every_field.model_fields_set
    assert problems(out, every_field, scale_rewards="none") == []


def test_every_problem_is_one_line_of_one_error(out):
    args = workload.grpo_config(out, entropy_coef=0.01, delta=3.0, loss_type="bnpo")
    with pytest.raises(ValueError) as caught:
        check_grpo_config(args, LossConfig())
    lines = str(caught.value).splitlines()
    assert lines[0] == "Invalid RLLossGRPOTrainer configuration (3 problems):"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "GRPOConfig.loss_type", "GRPOConfig.delta", "GRPOConfig.entropy_coef"]


def test_the_trainer_rejects_before_loading_the_model(out):
    from rl_loss.integrations.trl import RLLossGRPOTrainer

    # a model path that does not exist: the check must fail first, naming the field
    with pytest.raises(ValueError, match="GRPOConfig.beta"):
        RLLossGRPOTrainer("/nonexistent/model", workload.reward, args=workload.grpo_config(out, beta=0.1),
                          loss_config=LossConfig())
    with pytest.raises(TypeError, match="loss_config must be"):
        RLLossGRPOTrainer("/nonexistent/model", workload.reward, args=workload.grpo_config(out), loss_config="grpo")


def test_opsm_from_the_loss_config_is_accepted(out):
    assert problems(out, LossConfig(off_policy_mask_delta=0.5)) == []


def test_a_covariance_penalty_the_trainer_cannot_select_for_is_rejected(out):
    (line,) = problems(out, LossConfig(cov_penalty="clip_cov"))
    assert line.startswith("loss_config.cov_penalty:") and "cov_penalty=none" in line


def test_a_rollout_correction_without_vllm_log_probs_is_rejected(out):
    (line,) = problems(out, LossConfig(rollout_correction=dict(is_level="token")))
    assert line.startswith("loss_config.rollout_correction:") and "use_vllm=False" in line


# --- the loss types TRL 1.16 ships that rl-loss can now express (docs/objectives-2026.md) ----------------------


@pytest.mark.parametrize(
    ("loss_type", "loss", "accepted"),
    [
        ("vespo", LossConfig(surrogate="vespo", aggregation="token_mean"), True),
        ("vespo", LossConfig(surrogate="vespo"), False),  # TRL's vespo divides by the tokens: token_mean
        ("luspo", LossConfig(aggregation="constant", divisor=1.0, ratio_level="sequence"), True),
        ("luspo", LossConfig(aggregation="constant", divisor=6.0, ratio_level="sequence"), False),
    ],
)
def test_vespo_and_luspo_loss_types_map_to_their_loss_config(out, loss_type, loss, accepted):
    level = "sequence" if loss.ratio_level == "sequence" else "token"
    found = problems(out, loss, loss_type=loss_type, importance_sampling_level=level)
    if accepted:
        assert found == []
    else:
        (line,) = found
        assert line.startswith("GRPOConfig.loss_type:") and f"got loss_type={loss_type!r}" in line


def test_bnpo_is_the_one_loss_type_named_as_inexpressible(out):
    (line,) = problems(out, LossConfig(aggregation="token_mean"), loss_type="bnpo")
    assert "no rl-loss equivalent (TRL loss types without one: bnpo" in line


def test_trls_cispo_epsilon_high_is_the_cap_itself(out):
    loss = LossConfig(surrogate="cispo", aggregation="token_mean", eps_clip_high=4.0)
    assert problems(out, loss, loss_type="cispo", epsilon_high=5.0) == []  # cap 5 = 1 + 4
    (unset,) = problems(out, loss, loss_type="cispo")  # TRL would cap at epsilon = 0.2
    assert unset.startswith("GRPOConfig.epsilon_high:") and "set epsilon_high = 1 + loss_config.eps_clip_high = 5.0" in unset


def test_vespo_parameters_must_equal_the_loss_configs(out):
    loss = LossConfig(surrogate="vespo", aggregation="token_mean", vespo_k_pos=1.5)
    assert problems(out, loss, loss_type="vespo", vespo_k_pos=1.5) == []
    (line,) = problems(out, loss, loss_type="vespo", vespo_k_pos=2.5)
    assert line.startswith("GRPOConfig.vespo_k_pos: must equal loss_config.vespo_k_pos=1.5") and "got 2.5" in line
    (other,) = problems(out, LossConfig(), vespo_k_pos=2.5)  # without vespo it is TRL's own parameter
    assert other.startswith("GRPOConfig.vespo_k_pos: a parameter of TRL's own loss")


def test_gspo_token_keeps_trls_default_token_level(out):
    assert problems(out, LossConfig(ratio_level="sequence_token")) == []
