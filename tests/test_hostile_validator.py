"""``rl-loss-validate`` on untrusted input: it runs nothing, reads no secret, ends fast, one line per problem.

One test per class of the issue "Trust at the edges" (code run from a file under review, a secret
printed, hangs, problems reported one at a time), then hypothesis sweeps of random bytes and random
alias structures (docs/trust-library.md).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_loss.validate import main

TIME_BOUND_S = 2.0  # "well under a second" on an idle core; the bound leaves room for a loaded 2-core CI
SECRET = "ghp_s3cr3t_value_never_printed"


@contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"rl-loss-validate still busy after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def validate(capsys, *argv, bound: float = 10.0) -> tuple[int, list[str], list[str]]:
    with deadline(bound):
        status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def only_problem(capsys, *argv, bound: float = 10.0) -> str:
    status, out, err = validate(capsys, *argv, bound=bound)
    assert (status, out, len(err)) == (2, [], 1), (status, out, err)
    return err[0]


def write(tmp_path: Path, text: str | bytes, name: str = "loss.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module in the working directory (on sys.path) whose import leaves a marker file."""
    marker = tmp_path / "imported"
    (tmp_path / "leaves_marker.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import torch\n"
        "def weights(step):\n    return torch.ones(step.num_response_tokens, dtype=torch.float64)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield marker
    sys.modules.pop("leaves_marker", None)


# --- code run from a file under review ------------------------------------------------------------------------


def test_a_custom_reducer_named_in_a_file_is_not_imported(capsys, tmp_path, marker_module):
    path = write(tmp_path, "custom_pg_reducer: leaves_marker:weights\n")
    status, out, err = validate(capsys, path)
    assert (status, err) == (0, [])
    assert out == [f"{path}: ok (aggregation=sample_mean, custom_pg_reducer=leaves_marker:weights not imported "
                   "(--import-custom checks it))"]
    assert not marker_module.exists()


def test_a_custom_reducer_named_in_an_override_is_not_imported(capsys, marker_module):
    assert validate(capsys, "loss.custom_pg_reducer=leaves_marker:weights")[0] == 0
    assert not marker_module.exists()


def test_import_custom_imports_and_probes_the_reducer(capsys, marker_module):
    status, out, err = validate(capsys, "--import-custom", "loss.custom_pg_reducer=leaves_marker:weights")
    assert (status, err) == (0, [])
    assert marker_module.exists()


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("os:system", "'os:system' failed on a two-sample step (TypeError"),
        ("os:getcwd", "'os:getcwd' cannot be called with one argument, the step"),
        ("os:sep", "'os:sep' is not a function (got str)"),
        ("no_such_module_anywhere:fn", "cannot import 'no_such_module_anywhere:fn' (No module named"),
    ],
)
def test_import_custom_refuses_a_callable_outside_the_contract_in_one_line(capsys, path, says):
    line = only_problem(capsys, "--import-custom", f"loss.custom_pg_reducer={path}")
    assert line.startswith(f"loss.custom_pg_reducer={path}: loss.custom_pg_reducer: {says}"), line


def test_import_custom_names_a_module_that_raises_on_import(capsys, tmp_path, monkeypatch):
    (tmp_path / "raises_here.py").write_text("raise SystemExit('module exits at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = only_problem(capsys, "--import-custom", "loss.custom_pg_reducer=raises_here:fn")
    assert "importing 'raises_here' raised SystemExit (module exits at import); fix that module" in line


def test_a_python_tag_is_refused_not_constructed(capsys, tmp_path):
    path = write(tmp_path, "kl_coef: !!python/object/apply:os.system ['echo pwned']\n")
    assert only_problem(capsys, path) == (
        f"{path}:1: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not accepted in a loss group "
        "file; remove it and write a plain value"
    )


def test_hydra_settings_cannot_be_overridden(capsys):
    # hydra.searchpath=[pkg://X] would import X to look for configs
    line = only_problem(capsys, "hydra.searchpath=[pkg://leaves_marker]")
    assert line == ("'hydra.searchpath=[pkg://leaves_marker]': Hydra's own settings cannot be overridden here "
                    "(they can name modules to import); drop it")


# --- a secret printed --------------------------------------------------------------------------------------------


def test_an_env_resolver_in_a_file_is_refused_by_name_without_its_value(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", SECRET)
    path = write(tmp_path, "kl_coef: 0.01\naggregation: ${oc.env:GITHUB_TOKEN}\n")
    line = only_problem(capsys, path)
    assert line.startswith(f"{path}:2: loss.aggregation: uses the resolver 'oc.env', which rl-loss-validate never runs")
    assert SECRET not in line


def test_an_env_resolver_nested_in_oc_select_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", SECRET)
    status, out, err = validate(capsys, "loss.aggregation=${oc.select:${oc.env:GITHUB_TOKEN},x}")
    assert (status, len(err)) == (2, 1) and "'oc.env'" in err[0]
    assert SECRET not in "\n".join(out + err)


def test_oc_select_and_plain_interpolations_stay_allowed(capsys, tmp_path):
    path = write(tmp_path, "eps_clip: 0.1\neps_clip_high: ${loss.eps_clip}\n"
                           "divisor: ${oc.select:rollout.max_response_len,512}\naggregation: constant\n")
    assert validate(capsys, path) == (0, [f"{path}: ok (aggregation=constant, divisor=512)"], [])


# --- hangs -------------------------------------------------------------------------------------------------------

ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
    "kl_coef: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n"
)  # about 330 bytes, 9**7 = 4.8 million leaves once expanded


def test_an_alias_bomb_is_refused_in_well_under_a_second(capsys, tmp_path):
    path = write(tmp_path, ALIAS_BOMB)
    start = time.perf_counter()
    line = only_problem(capsys, path, bound=TIME_BOUND_S)
    assert time.perf_counter() - start < TIME_BOUND_S
    assert line == (f"{path}:1: YAML anchors and aliases are not accepted in a loss group file (they can expand "
                    "exponentially); write the values out")


def test_deep_nesting_is_refused_without_recursion_error(capsys, tmp_path):
    path = write(tmp_path, "kl_coef: " + "[" * 30_000 + "]" * 30_000 + "\n")
    line = only_problem(capsys, path, bound=TIME_BOUND_S)
    assert line.startswith(f"{path}:1: nesting deeper than 8 levels is not accepted")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_blocking(capsys, tmp_path):
    fifo = tmp_path / "loss.yaml"
    os.mkfifo(fifo)  # no writer: a blocking open or read would wait forever
    assert only_problem(capsys, fifo, bound=TIME_BOUND_S) == (
        f"{fifo}: is not a regular file (a FIFO, device or socket); give a YAML file"
    )


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_dev_zero_is_refused_without_reading_it(capsys):
    assert only_problem(capsys, "/dev/zero", bound=TIME_BOUND_S) == (
        "/dev/zero: is not a regular file (a FIFO, device or socket); give a YAML file"
    )


def test_an_oversized_file_is_refused_before_parsing(capsys, tmp_path):
    path = write(tmp_path, "kl_coef: 0.0\n" + "# padding\n" * 7000)  # 70,013 bytes > 64 KiB
    assert only_problem(capsys, path, bound=TIME_BOUND_S) == (
        f"{path}: is 70013 bytes, over the 64 KiB limit of a loss group file; a loss file is a short mapping of fields"
    )


def test_an_overlong_override_is_refused(capsys):
    line = only_problem(capsys, "loss.kl_coef=" + "1" * 5000, bound=TIME_BOUND_S)
    assert "is 5013 characters, over the limit of 1000" in line


# --- every problem at once ----------------------------------------------------------------------------------------


def test_field_and_cross_field_problems_are_reported_together(capsys, tmp_path):
    path = write(tmp_path, "aggregation: prompt_mean\ncalculate_per_token_loss: true\neps_clip: 3.0\n")
    status, out, err = validate(capsys, path)
    assert (status, out) == (2, [])
    assert err == [
        f"{path}:2: loss.calculate_per_token_loss: Megatron would renormalise pg_loss by the token count and erase "
        "the prompt_mean denominators (got true with aggregation=prompt_mean); set calculate_per_token_loss=false",
        f"{path}:3: loss.eps_clip: input should be less than 1 (got 3.0)",
    ]


def test_a_rule_that_blames_a_bad_fields_default_is_not_reported(capsys, tmp_path):
    # aggregation is misspelt: "divisor only with constant" would blame sample_mean, the default, not the user
    path = write(tmp_path, "aggregation: constnt\ndivisor: 512\n")
    status, out, err = validate(capsys, path)
    assert status == 2 and len(err) == 1 and err[0].startswith(f"{path}:1: loss.aggregation: ")


# --- random input -------------------------------------------------------------------------------------------------


def assert_one_line_per_problem(path: Path, status: int, out: list[str], err: list[str]) -> None:
    assert status in (0, 2)
    assert (status == 0) == (not err or all(": warning: " in e for e in err))
    for line in out + err:
        assert line.startswith(str(path)), line
        assert "Traceback" not in line


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_end_in_exit_0_or_2_with_one_line_per_problem(capsys, tmp_path, data):
    path = write(tmp_path, data)
    start = time.perf_counter()
    status, out, err = validate(capsys, path)
    assert time.perf_counter() - start < 10.0
    assert_one_line_per_problem(path, status, out, err)


YAML_PIECES = st.sampled_from([
    "&a ", "&b ", "*a", "*b", "[", "]", "{", "}", ", ", ": ", "\n", "\n  ", "- ", "kl_coef", "aggregation",
    "token_mean", "0.5", "x", "${oc.env:HOME}", "${loss.kl_coef}", "!!str ", "!!python/name:os.system ", "'", '"',
    "<<: ", "? ", "|\n  ", "defaults", "grpo",
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(YAML_PIECES, max_size=40))
def test_random_alias_structures_end_in_exit_0_or_2_fast(capsys, tmp_path, pieces):
    path = write(tmp_path, "".join(pieces))
    start = time.perf_counter()
    status, out, err = validate(capsys, path)
    assert time.perf_counter() - start < 10.0
    assert_one_line_per_problem(path, status, out, err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_sibling_named_in_the_defaults_list_is_refused_without_blocking(capsys, tmp_path):
    (tmp_path / "loss").mkdir()
    os.mkfifo(tmp_path / "loss" / "trap.yaml")
    path = write(tmp_path, "defaults:\n  - trap\n  - _self_\nkl_coef: 0.01\n", "loss/mine.yaml")
    assert only_problem(capsys, path, bound=TIME_BOUND_S) == (
        f"{tmp_path / 'loss' / 'trap.yaml'}: is not a regular file (a FIFO, device or socket); give a YAML file"
    )


def test_a_sibling_alias_bomb_named_in_the_defaults_list_is_refused(capsys, tmp_path):
    (tmp_path / "loss").mkdir()
    write(tmp_path, ALIAS_BOMB, "loss/bomb.yaml")
    path = write(tmp_path, "defaults:\n  - bomb\n  - _self_\n", "loss/mine.yaml")
    line = only_problem(capsys, path, bound=TIME_BOUND_S)
    assert line.startswith(f"{tmp_path / 'loss' / 'bomb.yaml'}:1: YAML anchors and aliases are not accepted")
