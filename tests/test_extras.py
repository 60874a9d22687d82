"""A missing pip extra fails with one line naming it (``pip install 'rl-loss[EXTRA]'``), never a traceback.

The extras are installed here (``make`` installs ``.[dev]``), so a missing one is simulated:
``sys.modules[name] = None`` makes ``import name`` fail as if the package were absent.
"""

from __future__ import annotations

import importlib
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

WITHOUT_TENSORBOARD = """
import runpy, sys
sys.modules["tensorboard"] = None  # as if the launcher extra were not installed
sys.argv = ["launchers.train", "trainer.max_steps=1"]
runpy.run_module("launchers.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_train_without_the_launcher_extra_prints_one_line_naming_it():
    result = subprocess.run([sys.executable, "-c", WITHOUT_TENSORBOARD], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "the launcher needs the 'launcher' extra: pip install 'rl-loss[launcher]' (no module named 'tensorboard')"
    ]


def test_report_without_matplotlib_names_the_launcher_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(sys, "argv", ["launchers.report", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("launchers.report", run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "the launcher needs the 'launcher' extra: pip install 'rl-loss[launcher]' (no module named 'matplotlib')"
    ]


def test_trl_backend_without_trl_names_the_trl_extra_before_any_work(monkeypatch, capsys, tmp_path):
    from launchers.train import main

    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(SystemExit) as exit_:
        main(["backend=trl", "model=hf_tiny", f"hydra.run.dir={tmp_path / 'run'}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "backend=trl needs the 'trl' extra: pip install 'rl-loss[trl]' (no module named 'trl')"
    ]
    assert not (tmp_path / "run").exists()


def reimport(monkeypatch, module: str) -> None:
    """Import ``module`` afresh (monkeypatch puts the loaded one back afterwards)."""
    monkeypatch.delitem(sys.modules, module, raising=False)
    importlib.import_module(module)


def test_megatron_integration_without_megatron_core_names_the_megatron_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(ModuleNotFoundError) as err:
        reimport(monkeypatch, "rl_loss.integrations.megatron")
    assert str(err.value) == (
        "rl_loss.integrations.megatron needs the 'megatron' extra: pip install 'rl-loss[megatron]' "
        "(no module named 'megatron.core')"
    )


def test_trl_integration_without_trl_names_the_trl_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ModuleNotFoundError) as err:
        reimport(monkeypatch, "rl_loss.integrations.trl")
    assert str(err.value) == "rl_loss.integrations.trl needs the 'trl' extra: pip install 'rl-loss[trl]' (no module named 'trl')"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the one line, not trl's chain

