"""Loss group YAML files as ``rl-loss-validate`` reads them: parse checks, key lines, group options.

Problems a file has before any composition (missing, unreadable, not UTF-8, broken YAML, empty, not a
mapping, duplicate or non-string keys) become :class:`~rl_loss.ConfigError` lines naming the file and
line. PyYAML is imported only when a file is read (it comes with omegaconf).

A file under review may come from a stranger (CI on a pull request), so reading it is bounded and runs
nothing (docs/trust-library.md): only regular files (no FIFO, device or socket, opened without blocking),
at most :data:`MAX_FILE_BYTES`, no YAML anchors or aliases (a few hundred bytes of aliases expand to
billions of nodes), at most :data:`MAX_DEPTH` levels of nesting, only standard tags, and no OmegaConf
resolver except ``oc.select`` (``${oc.env:...}`` would read a secret, and others run code).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_loss.config_errors import ConfigError, show

GROUP = "loss"
PRESETS_PACKAGE = "rl_loss_conf"

MAX_FILE_BYTES = 64 * 1024
"""Largest loss group file read (the shipped presets are under 1 KiB)."""
MAX_DEPTH = 8
"""Deepest nesting of YAML collections in a loss file (LossConfig's fields are scalars; defaults are 2 deep)."""
MAX_EVENTS = 20_000
"""Most YAML parse events (scalars, collections) in a loss file."""
ALLOWED_RESOLVERS = ("oc.select",)
"""Resolvers a loss file or override may use: oc.select reads another key of the composed config, nothing else."""
STANDARD_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}
RESOLVER_CALL = re.compile(r"\$\{\s*([^\s:{}]*)\s*:")
"""The name of every resolver call ``${name:...}`` in a string, nested ones too (``${a.b}`` is no call)."""


def resolver_problem(text: str) -> str | None:
    """What is wrong with the resolvers a string calls, or ``None``; never resolves anything."""
    names = [n for n in RESOLVER_CALL.findall(text) if n not in ALLOWED_RESOLVERS]
    if not names:
        return None
    return (
        f"uses the resolver {names[0]!r}, which rl-loss-validate never runs (it can read environment secrets or run "
        f"code); give the value itself ({', '.join(ALLOWED_RESOLVERS)} and plain ${{key}} interpolations are allowed)"
    )


def _read_bounded(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES, opened without blocking (a FIFO never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file; give the path of a loss group YAML file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory; give the YAML files in it (e.g. {path}/*.yaml)"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot be read ({err.strerror or err})"]) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError([f"{path}: is a directory; give the YAML files in it (e.g. {path}/*.yaml)"])
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([f"{path}: is not a regular file (a FIFO, device or socket); give a YAML file"])
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError([f"{path}: is {info.st_size} bytes, over the {MAX_FILE_BYTES // 1024} KiB limit of a "
                               "loss group file; a loss file is a short mapping of fields"])
        data = b""
        while len(data) <= MAX_FILE_BYTES and (chunk := os.read(fd, MAX_FILE_BYTES + 1 - len(data))):
            data += chunk
    except OSError as err:
        raise ConfigError([f"{path}: cannot be read ({err.strerror or err})"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # it grew after the size check
        raise ConfigError([f"{path}: is over the {MAX_FILE_BYTES // 1024} KiB limit of a loss group file"])
    return data


def _check_events(path: Path, text: str) -> None:
    """Refuse anchors, aliases, deep nesting, too many nodes and non-standard tags, from the parse events alone.

    PyYAML's parser keeps its own stack (no recursion) and builds no nodes, so this is bounded by the
    file's size; the composer (recursive, and expanding aliases) runs only on a file that passed.
    """
    import yaml

    depth = 0
    for count, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
        line = event.start_mark.line + 1
        if count > MAX_EVENTS:
            raise ConfigError([f"{path}: has over {MAX_EVENTS} YAML nodes; a loss file is a short mapping of fields"])
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ConfigError([f"{path}:{line}: YAML anchors and aliases are not accepted in a loss group file "
                               "(they can expand exponentially); write the values out"])
        tag = getattr(event, "tag", None)
        if tag is not None and tag != "!" and _full_tag(tag) not in STANDARD_TAGS:
            raise ConfigError([f"{path}:{line}: YAML tag {show(tag)} is not accepted in a loss group file; "
                               "remove it and write a plain value"])
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError([f"{path}:{line}: nesting deeper than {MAX_DEPTH} levels is not accepted in a loss "
                                   "group file; its fields are plain values"])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _full_tag(tag: str) -> str:
    return "tag:yaml.org,2002:" + tag[2:] if tag.startswith("!!") else tag


def _resolver_problems(path: Path, node: Any) -> list[str]:
    """One line per scalar of the file (keys and defaults too) that calls a resolver other than oc.select."""
    import yaml

    problems = []

    def walk(item: Any, where: str) -> None:
        if isinstance(item, yaml.ScalarNode):
            problem = resolver_problem(str(item.value))
            if problem:
                problems.append(f"{path}:{item.start_mark.line + 1}: {where}: {problem} (got {show(item.value)})")
        elif isinstance(item, yaml.SequenceNode):
            for child in item.value:
                walk(child, where)
        elif isinstance(item, yaml.MappingNode):
            for key, value in item.value:
                walk(key, where)
                walk(value, where)

    for key, value in node.value:
        where = field_path(str(key.value)) if isinstance(key, yaml.ScalarNode) else "key"
        walk(key, where)
        walk(value, where)
    return problems


@dataclass
class LossFile:
    """A loss group file that parses as a YAML mapping, with the line of each top-level key."""

    path: Path
    text: str
    key_lines: dict[str, int]
    siblings: dict[str, LossFile] = field(default_factory=dict)
    """Files of the same ``loss/`` folder that its defaults list names (transitively), each read and checked."""


def read_loss_file(path: Path) -> LossFile:
    """Read and parse a loss group file, and the siblings its defaults list names.

    Raises:
        ConfigError: a missing, unreadable, non-regular, oversized, non-UTF-8, syntactically broken, empty or
            non-mapping file; anchors, aliases, deep nesting or non-standard tags; duplicate or non-string
            top-level keys and resolvers other than oc.select (these last two: one line each, all at once).
    """
    loss_file = read_loss_file_alone(path)
    if path.resolve().parent.name == GROUP and "defaults" in loss_file.key_lines:
        loss_file.siblings = _named_siblings(loss_file)
    return loss_file


def read_loss_file_alone(path: Path) -> LossFile:
    """Read and parse one loss group file (see :func:`read_loss_file`)."""
    import yaml

    data = _read_bounded(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML"]) from None
    if "\x00" in text:
        raise ConfigError([f"{path}: holds a NUL character (byte {text.index(chr(0))}); save it as UTF-8 YAML text"])
    try:
        _check_events(path, text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            what += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
        raise ConfigError([f"{where}: YAML syntax error: {what}; fix the YAML"]) from None
    if node is None:
        raise ConfigError([f"{path}: is empty; write a mapping of loss fields (e.g. aggregation: token_mean)"])
    if not isinstance(node, yaml.MappingNode):
        kind = "list" if isinstance(node, yaml.SequenceNode) else f"single value {show(node.value)}"
        raise ConfigError([f"{path}: must be a mapping of loss fields (got a {kind}); write KEY: VALUE lines"])
    key_lines: dict[str, int] = {}
    problems = []
    for key_node, _ in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            problems.append(f"{path}:{line}: keys must be loss field names (got {show(key_node.value)})")
        elif key_node.value in key_lines:
            problems.append(
                f"{path}:{line}: {field_path(key_node.value)}: duplicate key (first at line {key_lines[key_node.value]}); "
                "keep one"
            )
        else:
            key_lines[key_node.value] = line
    problems += _resolver_problems(path, node)
    if problems:
        raise ConfigError(problems)
    return LossFile(path, text, key_lines)


def _named_siblings(loss_file: LossFile) -> dict[str, LossFile]:
    """Sibling files a file's defaults list names, read with every check above (Hydra reads none of the folder)."""
    import yaml

    found: dict[str, LossFile] = {}
    pending = [loss_file]
    while pending:
        current = pending.pop()
        entries = (yaml.safe_load(current.text) or {}).get("defaults") or []
        for entry in entries if isinstance(entries, list) else []:
            name = entry if isinstance(entry, str) else entry.get(GROUP) if isinstance(entry, dict) else None
            if not isinstance(name, str) or name in found or not re.fullmatch(r"[\w.-]+", name):
                continue
            for suffix in (".yaml", ".yml"):
                candidate = loss_file.path.parent / f"{name}{suffix}"
                if candidate.name != loss_file.path.name and os.path.lexists(candidate):
                    found[name] = read_loss_file_alone(candidate)
                    pending.append(found[name])
                    break
    return found


def group_options(loss_file: LossFile | None = None) -> list[str]:
    """The loss presets a file's defaults list can name: the shipped ones and, in a ``loss/`` folder, its siblings."""
    from importlib.resources import files

    names = {p.name for p in files(PRESETS_PACKAGE).joinpath(GROUP).iterdir()}
    if loss_file is not None and loss_file.path.resolve().parent.name == GROUP:
        names |= {p.name for p in loss_file.path.resolve().parent.iterdir() if p != loss_file.path.resolve()}
    return sorted(n.rsplit(".", 1)[0] for n in names if n.endswith((".yaml", ".yml")))


def field_path(key: str) -> str:
    """How a problem line names a top-level key of a loss group file: ``loss.KEY`` (``defaults`` as is)."""
    return key if key == "defaults" else f"{GROUP}.{key}"
