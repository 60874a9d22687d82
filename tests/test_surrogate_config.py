"""Configuration of the surrogates (docs/objectives.md, docs/configuration.md): one test per rejection rule, through the launcher's
composition (one line naming field, value and fix) and its CLI (exit code 2), and the effective defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launchers.config.preflight import ConfigError, compose_job
from rl_loss import LossConfig

ROOT = Path(__file__).resolve().parent.parent


def only_problem(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        compose_job(list(overrides))
    assert len(err.value.problems) == 1, err.value.problems
    return err.value.problems[0]


def test_sequence_ratio_with_cispo_is_rejected():
    line = only_problem("loss.surrogate=cispo", "loss.ratio_level=sequence")
    assert line == (
        "loss.ratio_level: the sequence ratio (GSPO) is defined for surrogate=ppo_clip only "
        "(got sequence with surrogate=cispo); set ratio_level=token or surrogate=ppo_clip"
    )


def test_sequence_ratio_with_sapo_is_rejected():
    line = only_problem("loss.surrogate=sapo", "loss.ratio_level=sequence")
    assert line.startswith("loss.ratio_level: the sequence ratio (GSPO) is defined for surrogate=ppo_clip only")


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
def test_eps_clip_with_a_surrogate_that_ignores_it_is_rejected(surrogate):
    line = only_problem(f"loss.surrogate={surrogate}", "loss.eps_clip=0.1")
    assert line.startswith(f"loss.eps_clip: {surrogate} ")
    assert line.endswith("(got 0.1); remove it or set surrogate=ppo_clip")


def test_eps_clip_high_with_sapo_is_rejected():
    line = only_problem("loss.surrogate=sapo", "loss.eps_clip_high=0.28")
    assert line.startswith("loss.eps_clip_high: sapo has no clip")
    assert "(got 0.28); remove it or set surrogate=ppo_clip or cispo" in line


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
def test_dual_clip_with_a_surrogate_that_ignores_it_is_rejected(surrogate):
    line = only_problem(f"loss.surrogate={surrogate}", "loss.eps_clip_c=3")
    assert line == (
        f"loss.eps_clip_c: the dual clip belongs to ppo_clip and would be ignored with surrogate={surrogate} "
        "(got 3.0); remove it or set surrogate=ppo_clip"
    )


@pytest.mark.parametrize(("surrogate", "field"), [("ppo_clip", "sapo_tau_pos"), ("cispo", "sapo_tau_neg")])
def test_sapo_temperature_without_sapo_is_rejected(surrogate, field):
    line = only_problem(f"loss.surrogate={surrogate}", f"loss.{field}=2")
    assert line == (
        f"loss.{field}: is only used by surrogate=sapo, it would be ignored with surrogate={surrogate} "
        "(got 2.0); remove it or set surrogate=sapo"
    )


@pytest.mark.parametrize("override", ["loss.sapo_tau_pos=0", "loss.sapo_tau_neg=-1"])
def test_sapo_temperature_must_be_positive(override):
    field = override.split("=")[0]
    assert only_problem("loss.surrogate=sapo", override).startswith(f"{field}: input should be greater than 0")


def test_unknown_surrogate_is_rejected_naming_the_choices():
    line = only_problem("loss.surrogate=grpo")
    assert line.startswith("loss.surrogate: input should be 'ppo_clip', 'cispo', 'sapo', 'gmpo', 'dppo_tv', 'dppo_kl' or 'vespo'")


def test_cispo_accepts_its_truncation_bound():
    assert LossConfig(surrogate="cispo", eps_clip_high=4.0).clip_high == 4.0


def test_effective_defaults_of_unset_surrogate_fields():
    config = LossConfig()
    assert (config.eps_clip, config.eps_clip_high, config.sapo_tau_pos, config.sapo_tau_neg) == (None,) * 4
    assert (config.clip_low, config.clip_high, config.tau_pos, config.tau_neg) == (0.2, 0.2, 1.0, 1.05)


def test_cli_rejects_a_field_the_surrogate_ignores_with_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "launchers.train", "loss.surrogate=sapo", "loss.eps_clip_c=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "loss.eps_clip_c: the dual clip belongs to ppo_clip and would be ignored with surrogate=sapo" in result.stderr


# --- presets --------------------------------------------------------------------------------------------------


def test_gspo_preset_is_ppo_clip_on_the_sequence_ratio_with_the_papers_ranges():
    loss = compose_job(["loss=gspo"]).config.loss
    assert (loss.surrogate, loss.ratio_level, loss.aggregation) == ("ppo_clip", "sequence", "sample_mean")
    assert (loss.clip_low, loss.clip_high) == (3e-4, 4e-4)


def test_cispo_preset_is_cispo_with_token_mean():
    loss = compose_job(["loss=cispo"]).config.loss
    assert (loss.surrogate, loss.ratio_level, loss.aggregation) == ("cispo", "token", "token_mean")


def test_sapo_preset_is_sapo_with_the_papers_temperatures():
    loss = compose_job(["loss=sapo"]).config.loss
    assert (loss.surrogate, loss.aggregation, loss.tau_pos, loss.tau_neg) == ("sapo", "sample_mean", 1.0, 1.05)


def test_scalerl_preset_is_cispo_prompt_mean_and_batch_std_advantages():
    loss = compose_job(["loss=scalerl"]).config.loss
    assert (loss.surrogate, loss.aggregation, loss.advantage_estimator) == ("cispo", "prompt_mean", "grpo_batch_std")
    assert 1 + loss.clip_high == 5.0  # ScaleRL's truncation eps_max


def test_presets_reject_fields_their_surrogate_ignores():
    assert only_problem("loss=sapo", "loss.eps_clip=0.2").startswith("loss.eps_clip: sapo has no clip")
    assert only_problem("loss=scalerl", "loss.eps_clip_c=3").startswith("loss.eps_clip_c: the dual clip")


def test_dppo_preset_is_prime_rls_default_tv_mask_with_token_mean():
    loss = compose_job(["loss=dppo"]).config.loss
    assert (loss.surrogate, loss.aggregation, loss.dppo_thresholds, loss.dppo_ratio_cap) == (
        "dppo_tv", "token_mean", (0.2, 0.2), None)


def test_gmpo_preset_clips_log_ratios_to_the_papers_range():
    loss = compose_job(["loss=gmpo"]).config.loss
    assert (loss.surrogate, loss.aggregation, loss.clip_low, loss.clip_high) == ("gmpo", "sample_mean", 0.4, 0.4)


def test_vespo_preset_has_the_papers_gamma_shapes_and_token_mean():
    loss = compose_job(["loss=vespo"]).config.loss
    assert (loss.surrogate, loss.aggregation, loss.vespo_shape) == ("vespo", "token_mean", (2.0, 3.0, 3.0, 2.0))


def test_gspo_token_preset_is_ppo_clip_on_the_sequence_token_ratio():
    loss = compose_job(["loss=gspo_token"]).config.loss
    assert (loss.surrogate, loss.ratio_level, loss.clip_low, loss.clip_high) == ("ppo_clip", "sequence_token", 3e-4, 4e-4)


# --- the 2026 surrogates' fields (docs/objectives-2026.md) ------------------------------------------------------


@pytest.mark.parametrize(("surrogate", "field"), [("ppo_clip", "dppo_delta"), ("vespo", "dppo_ratio_cap"),
                                                  ("dppo_tv", "vespo_k_pos"), ("gmpo", "vespo_lambda_neg")])
def test_a_2026_field_without_its_surrogate_is_rejected(surrogate, field):
    value = 0.5 if field == "dppo_delta" else 2.0  # each within its field's bounds
    line = only_problem(f"loss.surrogate={surrogate}", f"loss.{field}={value}")
    assert line.startswith(f"loss.{field}: is only used by surrogate=")
    assert line.endswith(f"it would be ignored with surrogate={surrogate} (got {value}); remove it or set surrogate="
                         f"{'dppo_tv' if field.startswith('dppo') else 'vespo'}")


@pytest.mark.parametrize("surrogate", ["dppo_tv", "dppo_kl", "vespo"])
def test_clip_ranges_with_an_unclipped_2026_surrogate_are_rejected(surrogate):
    assert only_problem(f"loss.surrogate={surrogate}", "loss.eps_clip_high=0.3").startswith(
        f"loss.eps_clip_high: {surrogate} has no clip")
    assert only_problem(f"loss.surrogate={surrogate}", "loss.eps_clip=0.3").startswith(f"loss.eps_clip: {surrogate} ")


@pytest.mark.parametrize("surrogate", ["gmpo", "vespo", "cispo"])
def test_sequence_token_level_needs_ppo_clip(surrogate):
    line = only_problem(f"loss.surrogate={surrogate}", "loss.ratio_level=sequence_token")
    assert line.startswith("loss.ratio_level: the sequence ratio (GSPO) is defined for surrogate=ppo_clip only")
    assert f"(got sequence_token with surrogate={surrogate})" in line


def test_gmpo_clip_range_defaults_to_0_4_in_log_space():
    assert (LossConfig(surrogate="gmpo").clip_low, LossConfig(surrogate="gmpo").clip_high) == (0.4, 0.4)
    assert LossConfig(surrogate="gmpo", eps_clip=0.3, eps_clip_high=0.5).clip_high == 0.5
