"""Package boundaries and the public API of SPEC §8."""

from __future__ import annotations

import subprocess
import sys


def test_public_api_names_import_from_rl_loss():
    from rl_loss import ReducerFactory, StepBatch, local_response_ranges

    assert callable(local_response_ranges) and isinstance(ReducerFactory, type) and isinstance(StepBatch, type)


def test_rl_loss_never_imports_hydra_or_launchers():
    code = (
        "import sys, rl_loss, rl_loss.integrations.megatron; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'launchers')]; "
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_rl_loss_never_imports_trl_or_transformers():
    # only rl_loss.integrations.trl itself imports trl; its helpers follow TRL's contract without it
    code = (
        "import sys, rl_loss, rl_loss.integrations.trl_steps, rl_loss.integrations.trl_checks; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('trl', 'transformers', 'datasets', 'accelerate')]; "
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_validator_imports_hydra_only_when_it_runs():
    code = "import sys, rl_loss.validate; print(','.join(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
