"""RL_LOSS_CONFIG: validated when slime loads rl_loss.integrations.slime, and by rl-loss-validate --slime-env."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from rl_loss import ConfigError
from rl_loss.integrations.slime_config import ENV_VAR, SlimeNotice, check_slime_env, load_env_config
from rl_loss.validate import main


def test_drgrpo_preset_with_divisor_loads_as_constant_with_an_advantage_notice():
    config, notices = load_env_config({ENV_VAR: "loss=drgrpo loss.divisor=4096"})
    assert (config.aggregation, config.divisor) == ("constant", 4096.0)
    assert notices == [
        "loss.advantage_estimator=drgrpo: slime computes advantages before the loss and the adapter does not apply "
        "it; match it with slime's --advantage-estimator grpo --disable-grpo-std-normalization"
    ]


def test_yaml_file_named_by_the_variable_is_loaded(tmp_path):
    path = tmp_path / "loss.yaml"
    path.write_text("aggregation: token_mean\n")
    config, _ = load_env_config({ENV_VAR: str(path)})
    assert (config.aggregation, config.calculate_per_token_loss) == ("token_mean", True)


def test_unset_variable_is_one_line_naming_it():
    with pytest.raises(ConfigError) as err:
        load_env_config({})
    assert err.value.problems == [
        f"{ENV_VAR}: is not set (got None); set it to a loss YAML file or to overrides such as "
        f"{ENV_VAR}='loss=drgrpo loss.divisor=4096' in the environment of every training process"
    ]


def test_invalid_loss_config_gives_rl_loss_validate_lines_prefixed_with_the_variable():
    with pytest.raises(ConfigError) as err:
        load_env_config({ENV_VAR: "aggregation=constant divisor=-1"})
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"{ENV_VAR}: divisor=-1: loss.divisor: must be a finite number > 0")


@pytest.mark.parametrize("aggregation", ["prompt_mean", "trajectory_mean"])
def test_modes_the_hook_cannot_serve_are_refused_at_load(aggregation):
    with pytest.raises(ConfigError) as err:
        load_env_config({ENV_VAR: f"aggregation={aggregation}"})
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"{ENV_VAR}: loss.aggregation: {aggregation} ")
    assert "drop --custom-pg-loss-reducer-function-path" in err.value.problems[0]


def test_per_token_loss_settings_slime_computes_itself_are_refused_one_line_each():
    # dapo = token_mean + eps_clip_high 0.28: slime clips with its own --eps-clip-high
    with pytest.raises(ConfigError) as err:
        load_env_config({ENV_VAR: "loss=dapo loss.kl_coef=0.1"})
    assert err.value.problems == [
        f"{ENV_VAR}: loss.eps_clip_high: slime computes the per-token loss itself, so it would be ignored "
        f"(got 0.28); remove it from {ENV_VAR} and use slime's --eps-clip-high",
        f"{ENV_VAR}: loss.kl_coef: slime computes the per-token loss itself, so it would be ignored "
        f"(got 0.1); remove it from {ENV_VAR} and use slime's --use-kl-loss --kl-loss-coef",
    ]


def test_importing_the_slime_module_under_a_bad_config_stops_before_training(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "loss=scalerl")
    monkeypatch.delitem(sys.modules, "rl_loss.integrations.slime", raising=False)
    with pytest.raises(ConfigError, match=f"^{ENV_VAR}: loss.aggregation: prompt_mean"):
        importlib.import_module("rl_loss.integrations.slime")


def test_importing_the_slime_module_builds_the_hook_and_shows_notices(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "loss=drgrpo loss.divisor=4096")
    monkeypatch.delitem(sys.modules, "rl_loss.integrations.slime", raising=False)
    with pytest.warns(SlimeNotice, match="disable-grpo-std-normalization"):
        module = importlib.import_module("rl_loss.integrations.slime")
    assert module.LOSS_CONFIG.divisor == 4096.0 and callable(module.get_pg_loss_reducer)


def test_rl_loss_validate_slime_env_exits_0_for_a_served_config(monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "aggregation=token_mean")
    assert main(["--slime-env"]) == 0
    assert capsys.readouterr().out == (
        f"{ENV_VAR}: ok for slime's pg-loss reducer hook (aggregation=token_mean, needs --calculate-per-token-loss)\n"
    )


def test_rl_loss_validate_slime_env_exits_2_with_the_load_time_lines(monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, "aggregation=prompt_mean")
    assert main(["--slime-env"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{ENV_VAR}: loss.aggregation: prompt_mean needs")


@pytest.mark.slow
def test_slime_modules_import_no_megatron_slime_or_miles():
    code = (
        "import sys, rl_loss.integrations.slime_config, rl_loss.integrations.slime_reducer; "
        "print([m for m in sys.modules if m.split('.')[0] in ('megatron', 'slime', 'miles')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_slime_env_check_imports_no_megatron(monkeypatch):
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.delitem(sys.modules, name)
    assert check_slime_env({ENV_VAR: "loss=grpo"})[0] == []
    assert not [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]
