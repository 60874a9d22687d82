"""Tests that run verl's own code (verl 0.9.1) in the `.venv-verl` environment: `make test-verl`.

verl is not a dependency of the main test environment (its transformers pin conflicts with TRL's), so
these tests live outside `tests/`. When verl cannot be imported they FAIL, saying so: never a silent skip.
"""

import sys

import pytest


def pytest_collection_modifyitems(session, config, items):
    try:
        import verl  # noqa: F401  (loads the `verl.plugins` entry points, rl-loss's among them)
    except ImportError as err:
        pytest.exit(
            f"verl is not installed in {sys.executable} ({err}): these tests need it; run `make test-verl`, "
            "which creates .venv-verl with verl 0.9.1",
            returncode=1,
        )


def pytest_configure(config):
    # verl announces at import each optional engine it cannot load (torchtitan, veomni, megatron, ...)
    config.addinivalue_line("filterwarnings", "ignore:.*engine is not available:UserWarning")
