"""Package boundaries and the public API of docs/api.md."""

from __future__ import annotations

import subprocess
import sys


def modules_loaded(imports: str, packages: tuple[str, ...]) -> str:
    """The modules of ``packages`` that ``import <imports>`` loads in a fresh interpreter, comma-separated."""
    code = f"import sys, {imports}; print(','.join(m for m in sys.modules if m.split('.')[0] in {packages!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_public_api_names_import_from_rl_loss():
    from rl_loss import ReducerFactory, StepBatch, local_response_ranges

    assert callable(local_response_ranges) and isinstance(ReducerFactory, type) and isinstance(StepBatch, type)


def test_rl_loss_never_imports_hydra_or_launchers():
    assert modules_loaded("rl_loss, rl_loss.integrations.megatron", ("hydra", "omegaconf", "launchers")) == ""


def test_rl_loss_never_imports_trl_or_transformers():
    # only rl_loss.integrations.trl itself imports trl; its helpers follow TRL's contract without it
    imports = "rl_loss, rl_loss.integrations.trl_steps, rl_loss.integrations.trl_checks"
    assert modules_loaded(imports, ("trl", "transformers", "datasets", "accelerate")) == ""


def test_validator_imports_hydra_only_when_it_runs():
    assert modules_loaded("rl_loss.validate", ("hydra", "omegaconf")) == ""
