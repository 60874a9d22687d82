"""``rl-loss-validate``: exit 0 on valid loss configurations, 2 with one line per problem, never a traceback (docs/integrations/validate.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_loss.config import LossConfig
from rl_loss.validate import main

ROOT = Path(__file__).resolve().parent.parent
PRESET_FILES = sorted((ROOT / "conf" / "loss").glob("*.yaml"))
CUSTOM = "tests.custom_weights:double_sample_mean"
DIVISOR_FIX = "set it to the generation budget, e.g. the rollout's max response length"


def validate(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    """(exit status, stdout lines, stderr lines) of ``rl-loss-validate ARGV``."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def only_problem(capsys, *argv) -> str:
    status, out, err = validate(capsys, *argv)
    assert (status, out, len(err)) == (2, [], 1), (status, out, err)
    return err[0]


def write(tmp_path: Path, text: str, name: str = "custom.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- valid inputs ---------------------------------------------------------------------------------------------


def test_every_shipped_preset_file_is_valid_on_its_own(capsys):
    # the CI example of docs/integrations/validate.md: rl-loss-validate conf/loss/*.yaml
    status, out, err = validate(capsys, *PRESET_FILES)
    assert (status, err) == (0, [])
    assert len(out) == len(PRESET_FILES)
    for path, line in zip(PRESET_FILES, out, strict=True):
        aggregation = yaml.safe_load(path.read_text()).get("aggregation")  # a preset may inherit it
        assert line.startswith(f"{path}: ok (aggregation={aggregation or ''}"), line


def test_shipped_drgrpo_alone_divides_by_trls_default_budget(capsys):
    # no rollout.max_response_len outside an app: the fallback 512 (trl 1.16 GRPOConfig.max_completion_length)
    drgrpo = ROOT / "conf" / "loss" / "drgrpo.yaml"
    assert validate(capsys, drgrpo) == (0, [f"{drgrpo}: ok (aggregation=constant, divisor=512)"], [])
    assert validate(capsys, drgrpo, "loss.divisor=40960") == (0, [f"{drgrpo}: ok (aggregation=constant, divisor=40960)"], [])


@pytest.mark.parametrize("preset", [p.stem for p in PRESET_FILES])
def test_every_preset_override_is_valid(capsys, preset):
    status, out, err = validate(capsys, f"loss={preset}")
    assert (status, err) == (0, [])
    assert out[0].startswith(f"loss={preset}: ok (aggregation=")


def test_plain_mapping_file_is_valid(capsys, tmp_path):
    path = write(tmp_path, "aggregation: constant\ndivisor: 4096\nkl_coef: 0.01\n")
    assert validate(capsys, path) == (0, [f"{path}: ok (aggregation=constant, divisor=4096)"], [])


def test_file_extending_a_shipped_preset_is_valid(capsys, tmp_path):
    path = write(tmp_path, "defaults:\n  - dapo\n  - _self_\n\nkl_coef: 0.04\n")
    assert validate(capsys, path) == (0, [f"{path}: ok (aggregation=token_mean)"], [])


def test_file_extending_a_sibling_in_a_loss_folder_is_valid(capsys, tmp_path):
    write(tmp_path, "defaults:\n  - base\n  - _self_\naggregation: constant\ndivisor: 512\n", "loss/mine.yaml")
    path = write(tmp_path, "defaults:\n  - mine\n  - _self_\neps_clip: 0.1\n", "loss/tighter.yaml")
    assert validate(capsys, path) == (0, [f"{path}: ok (aggregation=constant, divisor=512)"], [])


def test_bare_override_keys_are_loss_fields(capsys):
    assert validate(capsys, "aggregation=constant", "divisor=8")[0] == 0


def test_relabelled_per_token_flag_is_valid_with_a_warning(capsys):
    status, out, err = validate(capsys, "loss=grpo", "loss.calculate_per_token_loss=true")
    assert (status, out) == (0, ["loss=grpo loss.calculate_per_token_loss=true: ok (aggregation=token_mean)"])
    assert err == [
        "loss=grpo loss.calculate_per_token_loss=true: warning: loss.calculate_per_token_loss=true with "
        "aggregation=sample_mean: relabelled aggregation=token_mean (the flag is the legacy spelling of token_mean)"
    ]


# --- every cross-field rule of LossConfig, through overrides --------------------------------------------------

RULE_CASES = {
    "_divisor_is_a_token_count": (
        ["loss=drgrpo", "loss.divisor=1e-300"],
        # 1e-300 passes "finite and > 0" but 1 / (N * 1e-300) overflows: a token count is at least 1
        "loss.divisor=1e-300: loss.divisor: must be a token count in [1, 2**31] (got 1e-300); set it to the "
        "generation budget in tokens, e.g. the rollout's max response length",
    ),
    "_constant_needs_divisor": (
        ["loss=drgrpo", "loss.divisor=null"],
        f"loss.divisor=null: loss.divisor: must be a finite number > 0 when aggregation=constant (got None); {DIVISOR_FIX}",
    ),
    "_divisor_only_with_constant": (
        ["loss=grpo", "loss.divisor=4096"],
        "loss.divisor=4096: loss.divisor: is only used by aggregation=constant, it would be ignored with "
        "aggregation=sample_mean (got 4096.0); remove it or set aggregation=constant",
    ),
    "_per_token_flag_keeps_mode": (
        ["loss=scalerl", "loss.calculate_per_token_loss=true"],
        "loss.calculate_per_token_loss=true: loss.calculate_per_token_loss: Megatron would renormalise pg_loss by "
        "the token count and erase the prompt_mean denominators (got true with aggregation=prompt_mean); "
        "set calculate_per_token_loss=false",
    ),
    "_custom_reducer_alone": (
        ["loss=grpo", "loss.aggregation=prompt_mean", f"loss.custom_pg_reducer={CUSTOM}"],
        f"loss.custom_pg_reducer={CUSTOM}: loss.custom_pg_reducer: a custom pg reducer replaces the aggregation, so "
        f"aggregation=prompt_mean would be silently ignored (got '{CUSTOM}'); "
        "leave aggregation at sample_mean or drop custom_pg_reducer",
    ),
    "_custom_reducer_is_an_import_path": (
        ["loss.custom_pg_reducer=no_colon_or_dot"],
        "loss.custom_pg_reducer=no_colon_or_dot: loss.custom_pg_reducer: 'no_colon_or_dot' is not an import path; "
        "use 'package.module:function' naming a function step -> one weight per response token",
    ),
    "_custom_reducer_without_flag": (
        [f"loss.custom_pg_reducer={CUSTOM}", "loss.calculate_per_token_loss=true"],
        "loss.calculate_per_token_loss=true: loss.calculate_per_token_loss: would renormalise the custom pg "
        f"reducer's weights by the token count (got true with custom_pg_reducer='{CUSTOM}'); set it to false",
    ),
    "_sequence_ratio_needs_ppo_clip": (
        ["loss=cispo", "loss.ratio_level=sequence"],
        "loss.ratio_level=sequence: loss.ratio_level: the sequence ratio (GSPO) is defined for surrogate=ppo_clip "
        "only (got sequence with surrogate=cispo); set ratio_level=token or surrogate=ppo_clip",
    ),
    "_eps_clip_only_with_ppo_clip": (
        ["loss=sapo", "loss.eps_clip=0.1"],
        "loss.eps_clip=0.1: loss.eps_clip: sapo has no clip, so the lower clip range would be ignored (got 0.1); "
        "remove it or set surrogate=ppo_clip",
    ),
    "_eps_clip_high_not_with_sapo": (
        ["loss=sapo", "loss.eps_clip_high=0.28"],
        "loss.eps_clip_high=0.28: loss.eps_clip_high: sapo has no clip (a soft gate with sapo_tau_pos / "
        "sapo_tau_neg), so it would be ignored (got 0.28); remove it or set surrogate=ppo_clip or cispo",
    ),
    "_dual_clip_only_with_ppo_clip": (
        ["loss=cispo", "loss.eps_clip_c=3"],
        "loss.eps_clip_c=3: loss.eps_clip_c: the dual clip belongs to ppo_clip and would be ignored with "
        "surrogate=cispo (got 3.0); remove it or set surrogate=ppo_clip",
    ),
    "_sapo_temperatures_only_with_sapo": (
        ["loss=gspo", "loss.sapo_tau_pos=2"],
        "loss.sapo_tau_pos=2: loss.sapo_tau_pos: is only used by surrogate=sapo, it would be ignored with "
        "surrogate=ppo_clip (got 2.0); remove it or set surrogate=sapo",
    ),
    "_cov_penalty_needs_token_ppo_clip": (
        ["loss=cispo", "loss.cov_penalty=clip_cov"],
        "loss.cov_penalty=clip_cov: loss.cov_penalty: clip_cov acts on PPO's per-token ratio (arXiv:2505.22617), "
        "so it needs surrogate=ppo_clip and ratio_level=token (got surrogate=cispo, ratio_level=token); set them "
        "or cov_penalty=none",
    ),
    "_kl_cov_has_no_clip": (
        ["loss=grpo", "loss.cov_penalty=kl_cov", "loss.eps_clip=0.1"],
        "loss.eps_clip=0.1: loss.eps_clip: cov_penalty=kl_cov replaces PPO's clip by a KL penalty on the selected "
        "tokens, so the clip range would be ignored (got 0.1); remove it or use clip_cov",
    ),
    "_cov_fields_match_penalty": (
        ["loss=grpo", "loss.kl_cov_ratio=0.01"],
        "loss.kl_cov_ratio=0.01: loss.kl_cov_ratio: is only used with cov_penalty=kl_cov, it would be ignored with "
        "cov_penalty=none (got 0.01); remove it or set cov_penalty=kl_cov",
    ),
    "_clip_cov_bounds_ordered": (
        ["loss=grpo", "loss.cov_penalty=clip_cov", "loss.clip_cov_lb=6"],
        "loss.clip_cov_lb=6: loss.clip_cov_lb: must be below clip_cov_ub=5.0 (got 6.0); no token's covariance "
        "could fall between them",
    ),
    "_kl_clamp_only_for_k3": (
        ["loss=grpo", "loss.kl_estimator=k2", "loss.kl_clamp=10"],
        "loss.kl_clamp=10: loss.kl_clamp: clamps the k3 estimate only (as verl does), it would be ignored with "
        "kl_estimator=k2 (got 10.0); remove it or set kl_estimator=k3",
    ),
    "_cispo_clip_low_only_with_cispo": (
        ["loss=grpo", "loss.cispo_clip_low=0.2"],
        "loss.cispo_clip_low=0.2: loss.cispo_clip_low: bounds CISPO's IS weight below and would be ignored with "
        "surrogate=ppo_clip (got 0.2); remove it or set surrogate=cispo",
    ),
    "_surrogate_parameters_used": (
        ["loss=gmpo", "loss.vespo_k_pos=2"],
        "loss.vespo_k_pos=2: loss.vespo_k_pos: is only used by surrogate=vespo, it would be ignored with "
        "surrogate=gmpo (got 2.0); remove it or set surrogate=vespo",
    ),
}
# before-validators that accept and relabel (tested above, with their warning)
RELABELLING_RULES = {"_per_token_flag_is_token_mean"}


def test_every_cross_field_rule_has_a_case():
    from rl_loss.config import LOSS_RULES

    rules = {rule.__name__ for rule in LOSS_RULES} | set(LossConfig.__pydantic_decorators__.model_validators)
    missing = rules - RULE_CASES.keys() - RELABELLING_RULES - {"_rules"}
    assert not missing, f"add a rl-loss-validate case to RULE_CASES for LossConfig's new rule(s): {sorted(missing)}"


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_cross_field_rule_gives_one_line(capsys, rule):
    overrides, line = RULE_CASES[rule]
    assert only_problem(capsys, *overrides) == line


def test_every_broken_rule_is_reported_at_once(capsys):
    # sapo with a dual clip and a sequence ratio breaks two rules: both lines come in one run, not one per fix
    code = main(["loss=sapo", "loss.eps_clip_c=3", "loss.ratio_level=sequence"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line.split(": ")[1] for line in lines] == ["loss.ratio_level", "loss.eps_clip_c"]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_divisor_must_be_finite_and_positive(capsys, value):
    line = only_problem(capsys, "loss=drgrpo", f"loss.divisor={value}")
    assert line == (
        f"loss.divisor={value}: loss.divisor: must be a finite number > 0 when aggregation=constant "
        f"(got {float(value)}); {DIVISOR_FIX}"
    )


# --- bad overrides ------------------------------------------------------------------------------------------


def test_unknown_preset_gets_did_you_mean(capsys):
    line = only_problem(capsys, "loss=grpoo")
    assert line.startswith("loss=grpoo: no such option; did you mean 'loss=grpo'? (available: cispo, dapo, dppo, drgrpo, gmpo, grpo, ")


def test_unknown_key_override_gets_did_you_mean(capsys):
    line = only_problem(capsys, "loss=grpo", "loss.divisr=3")
    assert line == "loss.divisr: unknown key; did you mean 'loss.divisor'? (got loss.divisr=3)"


def test_wrong_type_override(capsys):
    line = only_problem(capsys, "loss=dapo", "loss.eps_clip=abc")
    assert line == (
        "loss.eps_clip=abc: loss.eps_clip: input should be a valid number, unable to parse string as a number "
        "(got 'abc')"
    )


def test_out_of_range_and_unknown_literal_give_a_line_each(capsys):
    status, out, err = validate(capsys, "loss.eps_clip=1.5", "loss.aggregation=median")
    modes = [repr(m) for m in get_args(LossConfig.model_fields["aggregation"].annotation)]
    assert (status, out) == (2, [])
    assert err == [
        f"loss.aggregation=median: loss.aggregation: input should be {', '.join(modes[:-1])} or {modes[-1]} "
        "(got 'median')",
        "loss.eps_clip=1.5: loss.eps_clip: input should be less than 1 (got 1.5)",
    ]


def test_unparsable_override_is_named(capsys):
    line = only_problem(capsys, "loss.eps_clip=[")
    assert line.startswith("loss.eps_clip=[: not a valid override (")


def test_preset_override_with_files_is_rejected(capsys):
    line = only_problem(capsys, PRESET_FILES[0], "loss=grpo")
    assert line.startswith("loss=grpo: a preset cannot be combined with files")


def test_no_input_is_an_error(capsys):
    status, out, err = validate(capsys)
    assert (status, out) == (2, []) and err[0].startswith("rl-loss-validate: nothing to validate")


# --- bad files ----------------------------------------------------------------------------------------------


def test_missing_file(capsys, tmp_path):
    path = tmp_path / "nope.yaml"
    assert only_problem(capsys, path) == f"{path}: no such file; give the path of a loss group YAML file"


def test_directory(capsys, tmp_path):
    assert only_problem(capsys, tmp_path).startswith(f"{tmp_path}: is a directory")


def test_yaml_syntax_error_names_line_and_column(capsys, tmp_path):
    path = write(tmp_path, "aggregation: token_mean\neps_clip: [0.2\n")
    assert only_problem(capsys, path) == (
        f"{path}:3:1: YAML syntax error: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence "
        "at line 2, column 11); fix the YAML"
    )


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "is empty; write a mapping of loss fields (e.g. aggregation: token_mean)"),
        ("# only a comment\n", "is empty; write a mapping of loss fields (e.g. aggregation: token_mean)"),
        ("- grpo\n- dapo\n", "must be a mapping of loss fields (got a list); write KEY: VALUE lines"),
        ("token_mean\n", "must be a mapping of loss fields (got a single value 'token_mean'); write KEY: VALUE lines"),
    ],
)
def test_file_that_is_not_a_mapping(capsys, tmp_path, text, problem):
    path = write(tmp_path, text)
    assert only_problem(capsys, path) == f"{path}: {problem}"


def test_file_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("aggregation: token_mean # é\n".encode("latin-1"))
    assert only_problem(capsys, path) == f"{path}: is not UTF-8 text (byte 26); save it as UTF-8 YAML"


def test_duplicate_key_names_both_lines(capsys, tmp_path):
    path = write(tmp_path, "aggregation: token_mean\nkl_coef: 0.1\naggregation: constant\n")
    assert only_problem(capsys, path) == f"{path}:3: loss.aggregation: duplicate key (first at line 1); keep one"


def test_unknown_key_in_a_file_names_its_line(capsys, tmp_path):
    path = write(tmp_path, "defaults:\n  - grpo\n  - _self_\nkl_coef: 0.1\ndivisr: 3\n")
    assert only_problem(capsys, path) == f"{path}:5: loss.divisr: unknown key; did you mean 'loss.divisor'? (got 3)"


def test_cross_field_problem_in_a_file_names_the_field_line(capsys, tmp_path):
    path = write(tmp_path, "aggregation: prompt_mean\ncalculate_per_token_loss: true\n")
    assert only_problem(capsys, path).startswith(f"{path}:2: loss.calculate_per_token_loss: Megatron would renormalise")


def test_file_problems_follow_its_lines(capsys, tmp_path):
    path = write(tmp_path, "defaults:\n  - dapo\n  - _self_\ndivisr: 4096\nkl_coef: -0.1\n")
    status, out, err = validate(capsys, path)
    assert (status, out) == (2, [])
    assert err == [
        f"{path}:4: loss.divisr: unknown key; did you mean 'loss.divisor'? (got 4096)",
        f"{path}:5: loss.kl_coef: input should be greater than or equal to 0 (got -0.1)",
    ]


def test_override_applied_to_a_file_is_named_for_its_problem(capsys, tmp_path):
    path = write(tmp_path, "aggregation: prompt_mean\n")
    line = only_problem(capsys, path, f"loss.custom_pg_reducer={CUSTOM}")
    assert line.startswith(f"loss.custom_pg_reducer={CUSTOM}: loss.custom_pg_reducer: a custom pg reducer replaces")


def test_plain_mapping_file_takes_overrides_of_any_field(capsys, tmp_path):
    path = write(tmp_path, "aggregation: token_mean\n")  # no defaults list: validated on top of base
    assert validate(capsys, path, "loss.kl_coef=0.1")[0] == 0


def test_override_of_a_field_missing_from_a_file_without_base_is_explained(capsys, tmp_path):
    path = write(tmp_path, "defaults:\n  - _self_\naggregation: token_mean\n")
    assert only_problem(capsys, path, "loss.kl_coef=0.1") == (
        f"{path}: loss.kl_coef: is a field but not in the composed config, whose defaults list lacks base "
        "(got loss.kl_coef=0.1); add base to the defaults list or write +loss.kl_coef=0.1"
    )


def test_unknown_key_is_reported_as_unknown_whatever_its_value(capsys, tmp_path):
    path = write(tmp_path, "aggregation: token_mean\nkl_coeff: ${trainer.kl}\n")
    assert only_problem(capsys, path) == (
        f"{path}:2: loss.kl_coeff: unknown key; did you mean 'loss.kl_coef'? (got '${{trainer.kl}}')"
    )


def test_problem_inherited_from_a_sibling_names_the_file(capsys, tmp_path):
    write(tmp_path, "aggregation: constant\n", "loss/budgetless.yaml")
    path = write(tmp_path, "defaults:\n  - budgetless\n  - _self_\nkl_coef: 0.1\n", "loss/child.yaml")
    assert only_problem(capsys, path) == (
        f"{path}: loss.divisor: must be a finite number > 0 when aggregation=constant (got None); {DIVISOR_FIX}"
    )


def test_unknown_preset_in_a_files_defaults_gets_did_you_mean(capsys, tmp_path):
    path = write(tmp_path, "defaults:\n  - dapoo\n  - _self_\n")
    assert only_problem(capsys, path).startswith(
        f"{path}:1: defaults: no loss preset 'dapoo'; did you mean 'dapo'? (available: base, cispo, dapo, dppo, drgrpo, gmpo, grpo, "
    )


def test_interpolation_outside_the_loss_group_names_the_field(capsys, tmp_path):
    path = write(tmp_path, "aggregation: constant\ndivisor: ${rollout.max_response_len}\n")
    assert only_problem(capsys, path) == (
        f"{path}:2: loss.divisor: cannot resolve '${{rollout.max_response_len}}' outside your app (Interpolation "
        "key 'rollout.max_response_len' not found); give the value itself or pass loss.divisor=VALUE"
    )


def test_several_files_each_get_their_lines(capsys, tmp_path):
    good = write(tmp_path, "aggregation: token_mean\n", "good.yaml")
    bad = write(tmp_path, "aggregation: constant\n", "bad.yaml")
    status, out, err = validate(capsys, good, bad)
    assert (status, out) == (2, [f"{good}: ok (aggregation=token_mean)"])
    # the file sets no divisor, so the line names the file without a line number
    assert err == [f"{bad}: loss.divisor: must be a finite number > 0 when aggregation=constant (got None); {DIVISOR_FIX}"]


# --- no traceback for any input --------------------------------------------------------------------------------

YAMLISH = st.text(alphabet=st.sampled_from(list("abdegilnort_:-[]{}$!&*#'\"\n .0123456789")), max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=YAMLISH | st.sampled_from(["aggregation: constant\ndivisor: ", "defaults:\n- ", "eps_clip: "]).flatmap(
    lambda head: YAMLISH.map(lambda tail: head + tail)))
def test_any_file_gives_exit_0_or_2_and_no_traceback(capsys, tmp_path, text):
    path = write(tmp_path, text, "fuzz.yaml")
    status, out, err = validate(capsys, path)
    assert status in (0, 2)
    assert bool(err) == (status == 2) or any(": warning: " in e for e in err)
    assert all(line.startswith(str(path)) for line in err), err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["loss", "loss.divisor", "loss.aggregation", "divisor", "+loss.x", "loss.eps_clip", "~loss"]),
       value=YAMLISH.filter(lambda v: "\n" not in v))
def test_any_override_gives_exit_0_or_2_and_no_traceback(capsys, key, value):
    status, out, err = validate(capsys, f"{key}={value}")
    assert status in (0, 2)
    assert (status == 2) == any(": warning: " not in e for e in err)


def test_command_runs_as_a_module_without_traceback(tmp_path):
    bad = write(tmp_path, "aggregation: constant\ndivisor: -3\n")
    result = subprocess.run([sys.executable, "-m", "rl_loss.validate", bad, "loss=grpo", "nope.yaml"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "loss=grpo: a preset cannot be combined with files (each file is the loss group); "
        "drop it or validate it without files"
    ]


# --- the JSON Schema and the pre-commit hook ----------------------------------------------------------------


def test_schema_covers_every_field_and_the_defaults_list(capsys):
    status, out, _ = validate(capsys, "--schema")
    schema = json.loads("\n".join(out))
    assert status == 0
    fields = {f.alias or name for name, f in LossConfig.model_fields.items()}
    assert set(schema["properties"]) == fields | {"defaults"}
    assert schema["additionalProperties"] is False
    for preset in PRESET_FILES:
        assert set(yaml.safe_load(preset.read_text())) <= set(schema["properties"]), preset
    # Hydra interpolations are accepted wherever a value is
    divisor_choices = schema["properties"]["divisor"]["anyOf"]
    assert any(re.fullmatch(c.get("pattern", "^$"), "${oc.select:rollout.max_response_len,null}") for c in divisor_choices)


def test_pre_commit_hook_runs_the_console_script_on_loss_files():
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert (hook["id"], hook["entry"], hook["language"]) == ("rl-loss-validate", "rl-loss-validate", "python")
    assert 'rl-loss-validate = "rl_loss.validate:main"' in (ROOT / "pyproject.toml").read_text().splitlines()
    files = re.compile(hook["files"])
    assert all(files.search(str(p.relative_to(ROOT))) for p in PRESET_FILES)
    assert not files.search("conf/config.yaml") and not files.search(".github/workflows/ci.yml")
