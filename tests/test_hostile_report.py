"""Hostile inputs to ``python -m launchers.report`` and the run-folder readers it uses.

Every case ends in one line per problem (or a refused file named in one line), never a traceback, a
hang, a silent NaN, or code run from a run folder. Random bytes and random alias structures are fed to
the readers by hypothesis; each class of the issue has a test of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launchers.reporting.report import main
from launchers.runs import safe_read
from launchers.runs.run_records import find_runs, group_seeds, read_metrics
from launchers.runs.safe_read import UnsafeInput, parse_yaml

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail (instead of hanging the suite) when the body blocks: a FIFO read would block forever."""
    def _raise(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def record(step: int, reward: object = 0.5) -> str:
    return json.dumps({"step": step, "reward_mean": reward, "response_length_mean": 3.0})


def write_run(folder: Path, lines: list[str], config: str | None = "loss: {aggregation: token_mean}\nseed: 0\n",
              overrides: str = "- loss=dapo\n") -> Path:
    """A run folder: metrics.jsonl from ``lines``, and .hydra/ files as given (raw text)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if config is not None:
        (folder / ".hydra").mkdir(exist_ok=True)
        (folder / ".hydra" / "config.yaml").write_text(config)
        (folder / ".hydra" / "overrides.yaml").write_text(overrides)
    return folder


def alias_bomb(levels: int, width: int) -> str:
    """Billion laughs: level k is a list of ``width`` aliases of level k-1, so it expands to width**levels scalars."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * width) + "]" for k in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# -- random bytes and random alias structures ---------------------------------------------------------


@FAST
@given(data=st.binary(max_size=400))
def test_random_bytes_as_metrics_give_records_or_one_line_problems(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("m") / "metrics.jsonl"
    path.write_bytes(data)
    records, problems = read_metrics(path)
    for r in records:
        assert isinstance(r["step"], int) and not isinstance(r["step"], bool)
        assert all(math.isfinite(r[k]) for k in ("reward_mean", "response_length_mean") if k in r)
    assert all("\n" not in p and str(path) in p for p in problems)


@FAST
@given(data=st.binary(max_size=400), which=st.sampled_from(["config.yaml", "overrides.yaml"]))
def test_random_bytes_as_hydra_files_leave_the_run_reported(tmp_path_factory, data, which):
    run = write_run(tmp_path_factory.mktemp("r") / "run", [record(1)])
    (run / ".hydra" / which).write_bytes(data)
    runs, problems = find_runs([run])
    assert len(runs) == 1 and runs[0].steps == [1]
    assert all("\n" not in p for p in problems)
    group_seeds(runs)  # labels from whatever was read: never raises


@st.composite
def alias_documents(draw) -> str:
    """YAML with anchors and aliases nested in random shapes (lists and maps of earlier anchors)."""
    n = draw(st.integers(1, 8))
    lines = ["a0: &a0 [x, y]"]
    for k in range(1, n + 1):
        refs = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=12))
        if draw(st.booleans()):
            body = "[" + ", ".join(f"*a{r}" for r in refs) + "]"
        else:
            body = "{" + ", ".join(f"k{i}: *a{r}" for i, r in enumerate(refs)) + "}"
        lines.append(f"a{k}: &a{k} {body}")
    return "\n".join(lines) + "\n"


def expanded_size(value: object) -> int:
    if isinstance(value, list):
        return 1 + sum(expanded_size(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + expanded_size(v) for v in value.values())
    return 1


@FAST
@given(text=alias_documents())
def test_random_alias_structures_load_within_the_node_budget_or_are_refused(text):
    started = time.perf_counter()
    try:
        data = parse_yaml(text)
    except UnsafeInput as err:
        assert "alias bomb" in str(err)
    else:
        assert expanded_size(data) <= 2 * safe_read.MAX_NODES  # maps count key and value: at most twice the nodes
    assert time.perf_counter() - started < 2.0


# -- one test per class of the issue ------------------------------------------------------------------


def test_alias_bomb_config_is_refused_fast_and_the_run_reported_alone(tmp_path):
    # 10 levels of 10 aliases: 10**10 scalars once expanded; the budget stops it while composing
    run = write_run(tmp_path / "run", [record(1)], config=alias_bomb(10, 10))
    started = time.perf_counter()
    runs, problems = find_runs([run])
    assert time.perf_counter() - started < 2.0
    assert runs[0].recipe is None
    assert problems == [f"{run / '.hydra' / 'config.yaml'}: not readable as plain YAML (expands to more than "
                        f"{safe_read.MAX_NODES} nodes (an alias bomb?)); the run is reported on its own, not with its seeds"]


def test_deep_yaml_nesting_is_one_line_not_a_recursion_error(tmp_path):
    deep = "".join("  " * i + f"k{i}:\n" for i in range(2000)) + "  " * 2000 + "v\n"
    run = write_run(tmp_path / "run", [record(1)], config=deep)
    runs, problems = find_runs([run])
    assert len(runs) == 1 and len(problems) == 1
    assert f"nested deeper than {safe_read.MAX_DEPTH} levels" in problems[0]


def test_deep_json_nesting_in_metrics_is_a_skipped_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(record(1) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    records, problems = read_metrics(path)
    assert [r["step"] for r in records] == [1]
    assert problems == [f"{path} line 2: nested too deeply to be read as JSON; line skipped"]


@pytest.mark.parametrize("where", ["metrics.jsonl", ".hydra/config.yaml"])
def test_fifo_is_refused_without_blocking(tmp_path, where):
    run = write_run(tmp_path / "run", [record(1)])
    (run / where).unlink()
    os.mkfifo(run / where)
    with no_hang():
        runs, problems = find_runs([run])
    assert any(f"{run / where}: not a regular file (a FIFO); not read" in p for p in problems)


def test_dev_zero_as_metrics_is_refused_and_as_folder_argument_is_skipped(tmp_path, capsys):
    run = write_run(tmp_path / "run", [record(1)])
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to("/dev/zero")
    with no_hang():
        records, problems = read_metrics(run / "metrics.jsonl")
        code = main(["/dev/zero", str(run)])
    assert records == [] and problems == [f"{run / 'metrics.jsonl'}: not a regular file (a character device); "
                                          "not read; skipped"]
    assert code == 2
    err = capsys.readouterr().err
    assert "/dev/zero: not a folder" in err and "Traceback" not in err


def test_metrics_that_is_a_folder_is_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)
    runs, problems = find_runs([tmp_path])
    assert runs == []
    assert f"{run / 'metrics.jsonl'}: not a regular file (a folder); not read; skipped" in problems


def test_oversized_metrics_is_refused_by_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_read, "JSONL_CAP", 100)
    path = write_run(tmp_path / "run", [record(s) for s in range(1, 20)]) / "metrics.jsonl"
    records, problems = read_metrics(path)
    assert records == []
    assert problems == [f"{path}: {path.stat().st_size} bytes, over the 100 bytes a run-folder file may hold; "
                        "not read; skipped"]


@pytest.mark.parametrize(("reward", "shown"), [(None, "None"), ("0.5", "'0.5'"), (True, "True")])
def test_reward_that_is_not_a_number_skips_its_line(tmp_path, reward, shown):
    path = write_run(tmp_path / "run", [record(1), record(2, reward), record(3)]) / "metrics.jsonl"
    records, problems = read_metrics(path)
    assert [r["step"] for r in records] == [1, 3]
    assert problems == [f"{path} line 2: reward_mean is {shown}, not a finite number; line skipped"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_number_skips_its_line(tmp_path, literal):
    path = write_run(tmp_path / "run", [record(1), f'{{"step": 2, "reward_mean": {literal}}}']) / "metrics.jsonl"
    records, problems = read_metrics(path)
    assert [r["step"] for r in records] == [1]
    assert problems == [f"{path} line 2: {literal} is not a finite number; line skipped"]


def test_infinite_step_is_a_skipped_line(tmp_path):
    path = write_run(tmp_path / "run", [record(1), '{"step": Infinity, "reward_mean": 0.5}']) / "metrics.jsonl"
    records, problems = read_metrics(path)
    assert [r["step"] for r in records] == [1] and len(problems) == 1


def test_report_with_bad_rewards_reports_the_rest_and_exits_0(tmp_path, capsys):
    # seed 0: rewards 0.2, (null), 0.6, 0.4 -> steps 1, 3, 4 kept; seed 1 all good: 0.4 0.4 0.4 0.4
    write_run(tmp_path / "sweep" / "0", [record(1, 0.2), record(2, None), record(3, 0.6), record(4, 0.4)],
              config="seed: 0\n", overrides="- seed=0\n")
    write_run(tmp_path / "sweep" / "1", [record(s, 0.4) for s in (1, 2, 3, 4)], config="seed: 1\n",
              overrides="- seed=1\n")
    assert main([str(tmp_path / "sweep"), "--smooth", "1"]) == 0
    out, err = capsys.readouterr()
    assert "line 2: reward_mean is None, not a finite number; line skipped" in err
    assert "nan" not in out.lower() and "Traceback" not in err


def test_config_is_never_run_or_interpolated(tmp_path):
    marker = tmp_path / "marker"
    config = (f"seed: 0\nhome: ${{oc.env:HOME}}\nnow: ${{now:%H}}\n"
              f"evil: !!python/object/apply:os.system ['touch {marker}']\n")
    run = write_run(tmp_path / "run", [record(1)], config=config)
    runs, problems = find_runs([run])
    assert not marker.exists()
    assert runs[0].recipe is None and "could not determine a constructor" in problems[0]
    (run / ".hydra" / "config.yaml").write_text("seed: 0\nhome: ${oc.env:HOME}\n")
    runs, _ = find_runs([run])
    assert json.loads(runs[0].recipe) == {"home": "${oc.env:HOME}"}  # the text itself, unresolved


def test_out_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    write_run(tmp_path / "run", [record(1)])
    (tmp_path / "taken").write_text("x")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"--out: {tmp_path / 'taken'} is a file, not a folder; give a folder with --out"
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "taken" / "sub")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"--out: {tmp_path / 'taken' / 'sub'} lies under the file {tmp_path / 'taken'}, not a folder; "
        "give a folder with --out")


def test_unwritable_out_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "run", [record(1)])

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"--out: cannot write the report into {tmp_path / 'o'} (No space left on device); give a writable folder with --out"


def test_yaml_read_as_plain_data_keeps_safe_types():
    assert parse_yaml("a: 1\nb: [x, 2.5]\nc: null\n") == {"a": 1, "b": ["x", 2.5], "c": None}
    assert yaml.safe_load("a: &x [1]\nb: *x\n") == parse_yaml("a: &x [1]\nb: *x\n")  # a legitimate alias
