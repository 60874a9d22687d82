"""Overrides as ``rl-loss-validate`` reads them: ``loss=PRESET key=value ...`` in Hydra's override syntax.

An override is checked before Hydra sees it (docs/trust-library.md): at most :data:`MAX_OVERRIDE_CHARS`
characters, no override of Hydra's own settings (``hydra.searchpath=[pkg://x]`` would import ``x``) and no
resolver but ``oc.select`` (``${oc.env:...}`` would read a secret). Hydra is imported only to parse.
"""

from __future__ import annotations

import re
from pathlib import Path

from rl_loss.config_errors import show
from rl_loss.loss_files import GROUP, resolver_problem

MAX_OVERRIDE_CHARS = 1000
"""Longest override accepted (a loss override is KEY=VALUE)."""


def split_inputs(items: list[str]) -> tuple[list[str], list[str]]:
    """(files, overrides): an item with ``=`` that is not an existing path is an override."""
    files, overrides = [], []
    for item in items:
        (overrides if "=" in item and not _exists(item) else files).append(item)
    return files, overrides


def _exists(item: str) -> bool:
    try:
        return Path(item).exists()
    except (OSError, ValueError):  # a name too long for a path, or one with a NUL: not a file
        return False


def loss_override(text: str) -> str:
    """``divisor=1`` -> ``loss.divisor=1``: keys outside ``loss``/``hydra`` are loss fields here."""
    body = text.lstrip("+~")
    key = body.split("=", 1)[0]
    if not key or key.split(".")[0].split("@")[0] in (GROUP, "hydra"):
        return text
    return f"{text[: len(text) - len(body)]}{GROUP}.{body}"


def override_key(text: str) -> str:
    """The dotted key an override sets (``+loss.divisor=1`` -> ``loss.divisor``)."""
    return text.lstrip("+~").split("=", 1)[0].split("@")[0]


def unparsable_overrides(overrides: list[str]) -> list[str]:
    """One line per override that is not Hydra override syntax, or that this validator will not apply.

    Refused without being parsed: overrides over MAX_OVERRIDE_CHARS, those of Hydra's own settings
    (``hydra.searchpath=[pkg://...]`` would import a module) and resolver calls other than oc.select.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, problems = OverridesParser.create(), []
    for override in overrides:
        if len(override) > MAX_OVERRIDE_CHARS:
            problems.append(f"{show(override)}: is {len(override)} characters, over the limit of "
                            f"{MAX_OVERRIDE_CHARS}; a loss override is KEY=VALUE")
            continue
        root = re.split(r"[./@=]", override.lstrip("+~"), maxsplit=1)[0]
        if root == "hydra":
            problems.append(f"{show(override)}: Hydra's own settings cannot be overridden here (they can name "
                            "modules to import); drop it")
            continue
        unsafe = resolver_problem(override)
        if unsafe:
            problems.append(f"{show(override)}: {unsafe}")
            continue
        try:
            parser.parse_overrides([loss_override(override)])
        except Exception as err:  # Hydra's OverrideParseException, or anything its grammar raises
            problems.append(
                f"{override}: not a valid override ({str(err).splitlines()[0]}); write loss.KEY=VALUE, "
                "e.g. loss.kl_coef=0.01"
            )
    return problems
