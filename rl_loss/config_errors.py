"""Configuration problems as one readable line each: ``field: what is wrong (got value); fix``.

Pydantic's :class:`~pydantic.ValidationError` text spans several lines per problem and names pydantic's
error types and URLs; :func:`format_validation_error` turns it into one line per problem with the
dotted field path, adding "did you mean" for a misspelt key. :class:`ConfigError` carries those lines.
:func:`hydra_error_lines` does the same for the text of Hydra's composition errors (it only reads the
message, so this module imports no Hydra). Used by :func:`rl_loss.build_reducer_factory`, the
``rl-loss-validate`` command and the launcher's preflight.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration that must not run; ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


NamesAt = Callable[[list[str]], list[str]]
"""Field names offered at a dotted location of a config tree (for did-you-mean)."""


def format_validation_error(
    err: ValidationError,
    model: type[BaseModel],
    prefix: str = "",
    *,
    normalize_loc: Callable[[list[str]], list[str]] | None = None,
    names_at: NamesAt | None = None,
) -> list[str]:
    """One line per pydantic error: ``prefix.field: what is wrong (got value)``, did-you-mean for typos.

    Args:
        err: raised by ``model.model_validate``.
        model: the validated model (its fields name the keys and suggest the close matches).
        prefix: dotted path of the model in the user's config (``"loss"`` for a Hydra loss group).
        normalize_loc: rewrites pydantic's error location into the user's key path (e.g. drops the
            tag pydantic inserts for a member of a tagged union).
        names_at: field names at a location, when ``model``'s own tree does not say (tagged unions).
    """
    lead = [prefix] if prefix else []
    lines = []
    for e in err.errors():
        loc = [str(part) for part in e["loc"]]
        if normalize_loc is not None:
            loc = normalize_loc(loc)
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(model, loc, lead, names_at)
            lines.append(f"{'.'.join(lead + loc)}: unknown key{hint} (got {show(e['input'])})")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        for line in msg.split("\n"):
            field, sep, rest = line.partition(": ")
            if e["type"] == "value_error" and sep and re.fullmatch(r"[a-z_][a-z0-9_.]*", field):
                # Validator messages start with the field they blame, relative to their model.
                path = field if field.split(".")[0] in model.model_fields else ".".join([*loc, field])
                lines.append(f"{'.'.join([*lead, path])}: {rest}")
            else:
                where = ".".join(lead + loc) or "config"
                lines.append(f"{where}: {line[0].lower() + line[1:]} (got {show(e['input'])})")
    return lines


def show(value: Any) -> str:
    """A given value as a problem line quotes it: strings in quotes, at most 60 characters."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def field_names(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names (and aliases) of the sub-model at ``loc`` in ``model``'s tree (empty if none)."""
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [f.alias or name for name, f in model.model_fields.items()]


def did_you_mean(
    model: type[BaseModel], loc: list[str], lead: list[str] | None = None, names_at: NamesAt | None = None
) -> str:
    """``"; did you mean 'a.b'?"`` for the closest field name to ``loc[-1]``, or ``""``."""
    names = names_at(loc[:-1]) if names_at is not None else field_names(model, loc[:-1])
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return f"; did you mean '{'.'.join([*(lead or []), *loc[:-1], close[0]])}'?" if close else ""


def hydra_error_lines(
    err: Exception,
    override: str | None = None,
    model: type[BaseModel] | None = None,
    prefix: str = "",
    hidden_options: tuple[str, ...] | Callable[[str], bool] = ("base",),
    names_at: NamesAt | None = None,
) -> list[str]:
    """One line for a Hydra composition error: unknown group option (did-you-mean), unknown key, or its first line.

    Args:
        err: what Hydra's compose raised.
        override: the command-line override it blames, when known.
        model: the config's model, to suggest a close key name for an unknown key.
        prefix: dotted path of ``model`` in the composed config (``"loss"`` when it is the loss group).
        hidden_options: group options not to list as available (the schema node ``base``), or a
            predicate naming them.
        names_at: as in :func:`format_validation_error`.
    """
    hidden = hidden_options if callable(hidden_options) else hidden_options.__contains__
    text = str(err)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = [o for o in re.findall(r"^\t(\S+)$", text, flags=re.M) if not hidden(o)]
        close = difflib.get_close_matches(option, options, n=1)
        hint = f"did you mean '{group}={close[0]}'? " if close else ""
        return [f"{group}={option}: no such option; {hint}(available: {', '.join(options)})"]
    not_struct = re.search(r"Could not override '([^']+)'", text)
    if not_struct:
        key = not_struct.group(1).split(".")
        lead, inner = ([], key) if not prefix else ([prefix], key[1:] if key[0] == prefix else [])
        got = override or text.splitlines()[0]
        # a field of the model itself (not merely of some option of a group) that the composition lacks
        if model is not None and inner and inner[-1] in field_names(model, inner[:-1]):
            return [
                f"{'.'.join(key)}: is a field but not in the composed config, whose defaults list lacks base "
                f"(got {got}); add base to the defaults list or write +{got.lstrip('+')}"
            ]
        hint = did_you_mean(model, inner, lead, names_at) if model is not None and inner else ""
        return [f"{'.'.join(key)}: unknown key{hint} (got {got})"]
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return [f"{override + ': ' if override else ''}{first}"]


M = TypeVar("M", bound=BaseModel)


def validate_model(model: type[M], data: dict[str, Any], prefix: str = "") -> M:
    """``model.model_validate(data)``, reporting every problem at once: field errors AND cross-field rules.

    Pydantic runs a model's cross-field rules only when every field is valid, so a file with a bad value
    and a broken rule would show the first alone. Here the fields with errors are set aside and the rest
    validated again; a rule's line from that pass is kept unless it names a field set aside (it would
    blame that field's default, not the user's value).

    Raises:
        ConfigError: one line per problem, as :func:`format_validation_error` writes them.
    """
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = format_validation_error(err, model, prefix=prefix)
        bad = {str(e["loc"][0]) for e in err.errors() if e["loc"]}  # fields (and unknown keys) with errors
    rest = {k: v for k, v in data.items() if k not in bad}
    if bad and rest != data:
        try:
            model.model_validate(rest)
        except ValidationError as err:
            names = [re.escape(name) for name in bad]
            mentions = re.compile(rf"\b({'|'.join(names)})\b") if names else None
            for line in format_validation_error(err, model, prefix=prefix):
                if line not in problems and not (mentions and mentions.search(line)):
                    problems.append(line)
    raise ConfigError(problems)
