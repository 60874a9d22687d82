"""One test per rejection rule of docs/configuration.md: the composed command line fails with a line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from launchers.config.preflight import ConfigError, compose_job, preflight

ROOT = Path(__file__).resolve().parent.parent


def problems_of(*overrides: str, world_size: int = 1) -> list[str]:
    with pytest.raises(ConfigError) as err:
        compose_job(list(overrides), world_size)
    return err.value.problems


def only_problem(*overrides: str, world_size: int = 1) -> str:
    problems = problems_of(*overrides, world_size=world_size)
    assert len(problems) == 1, problems
    return problems[0]


def test_constant_without_divisor_is_rejected():
    line = only_problem("loss=drgrpo", "loss.divisor=null")
    assert line.startswith("loss.divisor: must be a finite number > 0 when aggregation=constant (got None)")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_constant_divisor_must_be_finite_and_positive(value):
    line = only_problem("loss=drgrpo", f"loss.divisor={value}")
    assert line.startswith("loss.divisor: must be a finite number > 0")
    assert f"(got {float(value)})" in line


@pytest.mark.parametrize("preset", ["grpo", "dapo", "scalerl"])
def test_divisor_with_another_mode_is_rejected(preset):
    line = only_problem(f"loss={preset}", "loss.divisor=4096")
    assert line.startswith("loss.divisor: is only used by aggregation=constant")
    assert "(got 4096.0)" in line


def test_divisor_with_trajectory_mean_is_rejected():
    line = only_problem("loss.aggregation=trajectory_mean", "loss.divisor=4096")
    assert line.startswith(
        "loss.divisor: is only used by aggregation=constant, it would be ignored with aggregation=trajectory_mean"
    )
    assert "(got 4096.0)" in line


@pytest.mark.parametrize("preset", ["drgrpo", "scalerl"])
def test_per_token_flag_with_constant_or_prompt_mean_is_rejected(preset):
    line = only_problem(f"loss={preset}", "loss.calculate_per_token_loss=true")
    assert line.startswith("loss.calculate_per_token_loss: Megatron would renormalise")


def test_per_token_flag_with_trajectory_mean_is_rejected():
    line = only_problem("loss.aggregation=trajectory_mean", "loss.calculate_per_token_loss=true")
    assert line.startswith("loss.calculate_per_token_loss: Megatron would renormalise")
    assert "erase the trajectory_mean denominators" in line


def test_trajectory_mean_is_accepted_with_several_steps_per_rollout():
    # the launcher's samples are whole trajectories, so a trajectory cannot straddle steps (unlike a prompt group)
    job = compose_job(["loss.aggregation=trajectory_mean", "trainer.global_batch_size=64"])
    assert job.config.loss.aggregation == "trajectory_mean"
    assert job.config.steps_per_rollout == 2


def test_per_token_flag_with_default_mode_is_relabelled_token_mean():
    job = compose_job(["loss=grpo", "loss.calculate_per_token_loss=true"])
    assert job.config.loss.aggregation == "token_mean"
    assert any("relabelled aggregation=token_mean" in w for w in job.warnings)


def test_token_mean_sets_the_per_token_flag():
    assert compose_job(["loss=dapo"]).config.loss.calculate_per_token_loss is True


def test_prompt_mean_with_several_steps_per_rollout_is_rejected():
    line = only_problem("loss=scalerl", "trainer.global_batch_size=64", "trainer.max_steps=60")
    assert line.startswith("loss.aggregation: prompt_mean needs one optimizer step per rollout")
    assert "set trainer.global_batch_size=128" in line


def test_custom_reducer_with_non_default_aggregation_is_rejected():
    line = only_problem("loss=scalerl", "loss.custom_pg_reducer=tests.custom_weights:double_sample_mean")
    assert line.startswith("loss.custom_pg_reducer: a custom pg reducer replaces the aggregation")


def test_every_broken_loss_rule_is_listed_at_once():
    # dapo's token_mean sets Megatron's per-token flag: a custom reducer then breaks two rules, both reported
    problems = problems_of("loss=dapo", "loss.custom_pg_reducer=tests.custom_weights:double_sample_mean")
    assert [p.split(":")[0] for p in problems] == ["loss.custom_pg_reducer", "loss.calculate_per_token_loss"]


def test_custom_reducer_that_does_not_import_is_rejected():
    line = only_problem("loss.custom_pg_reducer=no_such_module:fn")
    assert line.startswith("loss.custom_pg_reducer: cannot import 'no_such_module:fn'")


def test_unknown_key_gets_did_you_mean():
    line = only_problem("loss.divisr=3")
    assert line.startswith("loss.divisr: unknown key; did you mean 'loss.divisor'?")


def test_unknown_appended_key_gets_did_you_mean():
    line = only_problem("+trainer.micro_bach_size=3")
    assert line.startswith("trainer.micro_bach_size: unknown key; did you mean 'trainer.micro_batch_size'?")


def test_unknown_preset_lists_the_available_ones():
    line = only_problem("loss=grpoo")
    assert line == "loss=grpoo: no such option; did you mean 'loss=grpo'? (available: cispo, dapo, dppo, drgrpo, gmpo, grpo, gspo, gspo_token, sapo, scalerl, vespo)"


def test_wrong_type_names_field_and_value():
    line = only_problem("loss.eps_clip=abc")
    assert line.startswith("loss.eps_clip: input should be a valid number") and "(got 'abc')" in line


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("loss.eps_clip=1.5", "loss.eps_clip"),
        ("loss.eps_clip_c=0.5", "loss.eps_clip_c"),
        ("loss.kl_coef=-0.1", "loss.kl_coef"),
        ("loss.entropy_coef=-1", "loss.entropy_coef"),
        ("rollout.temperature=0", "rollout.temperature"),
    ],
)
def test_out_of_range_values_are_rejected(override, field):
    assert only_problem(override).startswith(f"{field}: input should be")


def test_global_batch_must_divide_rollout():
    line = only_problem("trainer.global_batch_size=48", "trainer.micro_batch_size=8")
    assert line.startswith("trainer.global_batch_size: 128 samples per rollout")


def test_max_steps_must_be_whole_rollouts():
    # 16 prompts x 8 samples = 128 per rollout in steps of 64: 2 steps per rollout, so step 301 ends mid-rollout
    line = only_problem("trainer.global_batch_size=64", "trainer.max_steps=301")
    assert line == "trainer.max_steps: must be a multiple of the 2 optimizer steps per rollout (got 301)"


def test_micro_batch_must_divide_step_per_dp_rank():
    line = only_problem("trainer.micro_batch_size=48", world_size=1)
    assert line.startswith("trainer.micro_batch_size: a step of 128 samples over 1 DP rank(s)")


def test_micro_batches_account_for_dp_world():
    # 128 samples over 4 DP ranks (world 4, cp 1) -> 32 per rank, which micro batches of 64 cannot split
    line = only_problem("trainer.micro_batch_size=64", world_size=4)
    assert "over 4 DP rank(s)" in line


def test_cp_size_must_divide_world_size():
    line = only_problem("parallel.cp_size=3", world_size=4)
    assert line.startswith("parallel.cp_size: 4 process(es) do not split into CP groups of 3")


def test_divisor_below_max_response_len_is_accepted_with_warning():
    job = compose_job(["loss=drgrpo", "loss.divisor=4"])
    assert job.config.loss.divisor == 4
    assert any("loss.divisor=4 is below rollout.max_response_len=" in w for w in job.warnings)


def test_every_problem_gets_its_own_line():
    problems = problems_of("trainer.global_batch_size=48", "trainer.micro_batch_size=5")
    assert [p.split(":")[0] for p in problems] == ["trainer.global_batch_size", "trainer.micro_batch_size"]


def test_sweep_is_validated_whole_before_any_job(capsys):
    with pytest.raises(SystemExit) as exit_:
        preflight(["-m", "loss=grpo,drgrpo", "loss.divisor=-1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Invalid sweep, no job was started (2 problems):")
    assert "job 0 (loss=grpo loss.divisor=-1): loss.divisor: is only used by aggregation=constant" in err
    assert "job 1 (loss=drgrpo loss.divisor=-1): loss.divisor: must be a finite number > 0" in err


def test_dry_run_sweep_validates_every_preset(capsys):
    with pytest.raises(SystemExit) as exit_:
        preflight(["-m", "loss=grpo,dapo,drgrpo,scalerl,gspo,cispo,sapo", "dry_run=true"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "dry run: 7 job(s) valid, nothing started" in out
    for mode in ("sample_mean", "token_mean", "constant", "prompt_mean"):
        assert f"aggregation={mode}" in out
    for surrogate in ("ppo_clip", "cispo", "sapo"):
        assert f"surrogate={surrogate}" in out
    assert "ratio=sequence" in out and "advantages=grpo_batch_std" in out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launchers.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_config_error_exits_2_without_traceback():
    result = run_cli("loss=drgrpo", "loss.divisor=-1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "loss.divisor: must be a finite number > 0 when aggregation=constant (got -1.0)" in result.stderr


def test_cli_dry_run_prints_summary_and_exits_0():
    result = run_cli("loss=drgrpo", "loss.divisor=40960", "dry_run=true")
    assert result.returncode == 0, result.stderr
    assert "aggregation=constant divisor=40960" in result.stdout
    assert "steps_per_rollout=1" in result.stdout and "micro_batches_per_step=4" in result.stdout


def test_cli_help_lists_groups_and_every_loss_field():
    from rl_loss import LossConfig

    result = run_cli("--help")
    assert result.returncode == 0
    assert "loss: cispo, dapo, dppo, drgrpo, gmpo, grpo, gspo, gspo_token, sapo, scalerl, vespo" in result.stdout
    for name, field in LossConfig.model_fields.items():
        if name == "target":
            continue
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):  # a nested section
            assert f"loss.{name}: {field.description}" in result.stdout
            for inner, inner_field in field.annotation.model_fields.items():
                assert f"loss.{name}.{inner} (" in result.stdout
                assert inner_field.description in result.stdout
        else:
            assert f"loss.{name} (" in result.stdout
            assert field.description in result.stdout


def test_nccl_backend_needs_cuda():
    assert only_problem("parallel.backend=nccl").startswith("parallel.backend: nccl needs CUDA tensors")


def test_max_response_len_must_reach_the_largest_target():
    # target 40 needs five digits of at most 9 (45 >= 40) plus EOS: 6 tokens
    line = only_problem("rollout.max_response_len=5")
    assert line.startswith("rollout.max_response_len: task.target_max=40 needs responses of 6 tokens")


def test_adam_betas_must_be_below_one():
    assert only_problem("optim.betas=[0.9,1.0]").startswith("optim.betas: each must be in [0, 1)")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["loss.cov_penalty=clip_cov"], "loss.cov_penalty: backend=toy"),
        (["loss.rollout_correction.rs=token_k1", "loss.rollout_correction.rs_threshold_high=2"],
         "loss.rollout_correction: backend=toy"),
        (["backend=trl", "model=hf_tiny", "loss.cov_penalty=kl_cov"], "loss.cov_penalty: backend=trl cannot honour it"),
    ],
)
def test_a_correction_the_backend_cannot_feed_is_rejected_before_any_work(overrides, field):
    assert only_problem(*overrides).startswith(field)


def test_opsm_and_kl_aggregation_run_on_the_toy_backend():
    job = compose_job(["loss.off_policy_mask_delta=0.1", "loss.kl_aggregation=pg"])
    assert job.config.loss.off_policy_mask_delta == 0.1 and job.config.loss.kl_aggregation == "pg"
