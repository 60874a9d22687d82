"""``rl-loss-validate --verl FILE``: the rl-loss section of a verl trainer config, checked without verl."""

from __future__ import annotations

import pytest

from rl_loss.validate import main

TARGET = "rl_loss.integrations.verl.RLLossPolicyLossConfig"


def write(tmp_path, text: str):
    path = tmp_path / "ppo_trainer.yaml"
    path.write_text(text)
    return path


def validate(capsys, *argv) -> tuple[int, list[str], list[str]]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def config(section: str, mini: int = 64, actor_extra: str = "", target: str = TARGET, mode: str = "rl_loss") -> str:
    """A verl trainer config; its lines: 5 ppo_mini_batch_size, 6 actor_extra, 8 _target_, 9 loss_mode, 11- section."""
    lines = [
        "data:",
        "  train_batch_size: 64",
        "actor_rollout_ref:",
        "  actor:",
        f"    ppo_mini_batch_size: {mini}",
        f"    {actor_extra}",
        "    policy_loss:",
        f"      _target_: {target}",
        f"      loss_mode: {mode}",
        "      rl_loss:",
        *(f"        {line}" for line in section.splitlines()),
    ]
    return "\n".join(lines) + "\n"


def test_valid_section_exits_0_with_its_summary(capsys, tmp_path):
    path = write(tmp_path, config("aggregation: constant\ndivisor: 4096"))
    status, out, err = validate(capsys, "--verl", path)
    assert (status, err) == (0, [])
    assert out == [f"{path}: ok (verl loss_mode=rl_loss, aggregation=constant, divisor=4096, surrogate=ppo_clip)"]


def test_each_problem_is_one_line_with_file_line_and_fix(capsys, tmp_path):
    path = write(tmp_path, config("aggregation: constant\nkl_coef: 0.1", target="verl.workers.config.PolicyLossConfig"))
    status, _, err = validate(capsys, "--verl", path)
    assert status == 2
    assert err == [
        f"{path}:8: actor_rollout_ref.actor.policy_loss._target_: verl's own config refuses the rl_loss section "
        f"(got 'verl.workers.config.PolicyLossConfig'); set _target_: {TARGET}",
        f"{path}:12: actor_rollout_ref.actor.policy_loss.rl_loss.kl_coef: verl owns this setting, so it would be set "
        "twice (got 0.1); remove it and set actor_rollout_ref.actor.kl_loss_coef (with use_kl_loss=true)",
        f"{path}:10: actor_rollout_ref.actor.policy_loss.rl_loss.divisor: must be a finite number > 0 when "
        "aggregation=constant (got None); set it to the generation budget, e.g. the rollout's max response length",
    ]


def test_another_loss_mode_is_reported(capsys, tmp_path):
    path = write(tmp_path, config("aggregation: token_mean", mode="vanilla"))
    status, _, err = validate(capsys, "--verl", path)
    assert status == 2 and err == [
        f"{path}:9: actor_rollout_ref.actor.policy_loss.loss_mode: rl-loss is not selected (got 'vanilla'); "
        "set loss_mode: rl_loss"
    ]


@pytest.mark.parametrize(("mode", "unit"), [("prompt_mean", "prompt group"), ("trajectory_mean", "trajectory")])
def test_group_modes_need_one_step_per_rollout(capsys, tmp_path, mode, unit):
    path = write(tmp_path, config(f"aggregation: {mode}", mini=16))
    status, _, err = validate(capsys, "--verl", path)
    assert status == 2 and err == [
        f"{path}:5: actor_rollout_ref.actor.ppo_mini_batch_size: aggregation={mode} needs one optimizer step per "
        f"rollout, or a {unit} could be averaged over two steps (got 16 with data.train_batch_size=64); "
        "set ppo_mini_batch_size: 64"
    ]


def test_verl_clip_out_of_rl_loss_range_names_verl_field(capsys, tmp_path):
    path = write(tmp_path, config("surrogate: cispo", actor_extra="clip_ratio_high: 20"))
    status, _, err = validate(capsys, "--verl", path)
    assert status == 2 and err == [
        f"{path}:6: actor_rollout_ref.actor.clip_ratio_high: input should be less than or equal to 10 (got 20)"
    ]


def test_interpolation_to_a_key_of_the_file_is_followed(capsys, tmp_path):
    text = config("aggregation: constant\ndivisor: ${data.max_response_length}")
    text = text.replace("data:\n", "data:\n  max_response_length: 0\n", 1)
    status, _, err = validate(capsys, "--verl", write(tmp_path, text))
    assert status == 2 and "rl_loss.divisor: must be a finite number > 0 when aggregation=constant (got 0.0)" in err[0]


def test_unresolvable_interpolation_is_a_warning_not_a_problem(capsys, tmp_path):
    path = write(tmp_path, config("aggregation: constant\ndivisor: ${oc.env:BUDGET}"))
    status, out, err = validate(capsys, "--verl", path)
    assert status == 0 and out == [f"{path}: ok (verl loss_mode=rl_loss, aggregation=constant, surrogate=ppo_clip)"]
    assert err == [
        f"{path}: warning: {path}:12: actor_rollout_ref.actor.policy_loss.rl_loss.divisor: '${{oc.env:BUDGET}}' is "
        "not resolved here (only references to keys of this file are); verl checks it when it builds its config"
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: [1\n", "YAML syntax error"),
        ("- 1\n- 2\n", "actor_rollout_ref.actor.policy_loss: missing (got None)"),
        (f"actor_rollout_ref: {{actor: {{policy_loss: {{_target_: {TARGET}, loss_mode: rl_loss, rl_loss: 3}}}}}}\n",
         "rl_loss: must be a mapping of rl-loss fields (got 3)"),
    ],
)
def test_unusable_files_are_one_line(capsys, tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    status, _, err = validate(capsys, "--verl", path)
    assert status == 2 and len(err) == 1 and line in err[0]


def test_missing_file_is_one_line(capsys, tmp_path):
    status, _, err = validate(capsys, "--verl", tmp_path / "nope.yaml")
    assert status == 2 and err == [f"{tmp_path / 'nope.yaml'}: no such file; give the path of a verl trainer config (YAML)"]
