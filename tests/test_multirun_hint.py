"""A sweep without ``--multirun`` fails with one line that keeps Hydra's hint (add --multirun), exit 2."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.config.preflight import EXIT_CONFIG_ERROR, preflight

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_comma_separated_presets_without_multirun_print_hydras_hint_on_one_line():
    result = subprocess.run([sys.executable, "-m", "launchers.train", "loss=grpo,dapo"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    header, *problems = result.stderr.splitlines()
    assert header == "Invalid configuration (1 problem):"
    (line,) = problems
    assert line.startswith("  loss=grpo,dapo: ambiguous value: to sweep over it, add --multirun (-m) to your command line;")
    assert "key=[value1,value2]" in line  # Hydra's other two readings stay on the same line


def test_range_sweep_without_multirun_names_the_override_and_the_flag():
    err = io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        preflight(["seed=range(3)"], err=err)
    assert exit_.value.code == EXIT_CONFIG_ERROR
    assert err.getvalue().splitlines()[1:] == [
        "  seed=range(3): a sweep requires --multirun: add --multirun (-m) to your command line"
    ]


def test_the_same_sweep_with_multirun_is_valid():
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        preflight(["-m", "loss=grpo,dapo", "dry_run=true"], out=out)
    assert exit_.value.code == 0
    assert out.getvalue().splitlines()[-1] == "dry run: 2 job(s) valid, nothing started"
