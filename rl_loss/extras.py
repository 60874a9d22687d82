"""Optional dependencies (pip extras): one line naming the extra when a part of rl-loss lacks its own.

``pip install rl-loss`` brings the library's dependencies only (torch, pydantic, hydra-core, omegaconf,
typing-extensions). An integration or the launcher needs its extra (``pyproject.toml``,
``[project.optional-dependencies]``); without it, :func:`require_extra` raises a
``ModuleNotFoundError`` whose message is one line: what needs the extra, its name and the pip command.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys


def missing_extra(extra: str, needed_by: str, module: str) -> ModuleNotFoundError:
    """The one-line error of ``needed_by`` when ``module`` (of the pip extra ``extra``) is not installed."""
    return ModuleNotFoundError(
        f"{needed_by} needs the '{extra}' extra: pip install 'rl-loss[{extra}]' (no module named {module!r})",
        name=module,
    )


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, found on the path without importing it or its parent packages.

    A name set to ``None`` in ``sys.modules`` counts as missing (as ``import`` treats it).
    """
    path = None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name in sys.modules:
            if sys.modules[name] is None:
                return False
            path = getattr(sys.modules[name], "__path__", None)
            continue
        if depth > 1 and path is None:  # the parent is not a package
            return False
        spec = importlib.util.find_spec(name) if depth == 1 else importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return False
        path = spec.submodule_search_locations
    return True


def require_extra(extra: str, modules: tuple[str, ...], needed_by: str) -> None:
    """Raise :func:`missing_extra`'s error for the first of ``modules`` that is not installed."""
    for module in modules:
        if not is_installed(module):
            raise missing_extra(extra, needed_by, module)
