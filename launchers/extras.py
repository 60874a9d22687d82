"""The pip extras the launcher's commands need: checked first, one line naming the extra, exit 2.

``python -m launchers.train`` and ``python -m launchers.report`` need the ``launcher`` extra
(``pip install 'rl-loss[launcher]'``): TensorBoard and tqdm for the run's records and progress,
matplotlib for the sweep report, megatron-core's ``parallel_state`` for DP x CP, and the joblib and
submitit Hydra launchers. ``backend=trl`` needs the ``trl`` extra besides. Without one, the command
prints ``the launcher needs the 'launcher' extra: pip install 'rl-loss[launcher]' (...)`` and exits 2,
before any work, instead of a traceback at the first import halfway through a run.
"""

from __future__ import annotations

import sys

from rl_loss.extras import require_extra

EXIT_MISSING_EXTRA = 2

LAUNCHER_MODULES = (
    "tensorboard",
    "tqdm",
    "matplotlib",
    "megatron.core",
    "hydra_plugins.hydra_joblib_launcher",
    "hydra_plugins.hydra_submitit_launcher",
)
"""One importable module per distribution of the ``launcher`` extra (pyproject.toml)."""

TRL_MODULES = ("trl", "transformers", "datasets", "accelerate")
"""One importable module per distribution of the ``trl`` extra (pyproject.toml)."""

BACKEND_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {"trl": ("trl", TRL_MODULES)}
"""Backend option -> the extra it needs beyond the launcher's, and that extra's modules."""


def exit_without(extra: str, modules: tuple[str, ...], needed_by: str) -> None:
    """Print the one line of :func:`rl_loss.extras.require_extra` and exit 2 when ``extra`` is missing."""
    try:
        require_extra(extra, modules, needed_by)
    except ModuleNotFoundError as err:
        print(err, file=sys.stderr)
        raise SystemExit(EXIT_MISSING_EXTRA) from None


def require_launcher() -> None:
    """Exit 2 with one line unless the ``launcher`` extra is installed."""
    exit_without("launcher", LAUNCHER_MODULES, "the launcher")


def require_backend(kind: str) -> None:
    """Exit 2 with one line unless the extra of ``backend=kind`` is installed (the toy backend needs none)."""
    if kind in BACKEND_EXTRAS:
        extra, modules = BACKEND_EXTRAS[kind]
        exit_without(extra, modules, f"backend={kind}")
