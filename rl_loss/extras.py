"""Optional dependencies (pip extras): one line naming the extra when a part of rl-loss lacks its own.

``pip install rl-loss`` brings the library's dependencies only (torch, pydantic, hydra-core, omegaconf,
typing-extensions). An integration or the launcher needs its extra (``pyproject.toml``,
``[project.optional-dependencies]``); without it, :func:`require_extra` raises a
``ModuleNotFoundError`` whose message is one line: what needs the extra, its name and the pip command.
"""

from __future__ import annotations

import importlib.util


def missing_extra(extra: str, needed_by: str, module: str) -> ModuleNotFoundError:
    """The one-line error of ``needed_by`` when ``module`` (of the pip extra ``extra``) is not installed."""
    return ModuleNotFoundError(
        f"{needed_by} needs the '{extra}' extra: pip install 'rl-loss[{extra}]' (no module named {module!r})",
        name=module,
    )


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported (found on the path), without importing it (only its parents)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module blocked by sys.modules[name] = None
        return False


def require_extra(extra: str, modules: tuple[str, ...], needed_by: str) -> None:
    """Raise :func:`missing_extra`'s error for the first of ``modules`` that is not installed."""
    for module in modules:
        if not is_installed(module):
            raise missing_extra(extra, needed_by, module)
