"""The one reader of run-folder files (YAML, JSON, JSON lines, lock and checksum files): bounded and inert.

Every file a launch or the report reads from a run folder comes through here, because a run folder
is input: it may be damaged, replaced, or crafted. Each reader:

- opens regular files only (a FIFO, a device such as ``/dev/zero``, a folder or a socket is refused
  without blocking: the file is opened non-blocking and checked with ``fstat`` before any read);
- reads at most a size cap (:data:`TEXT_CAP` for configs, :data:`JSONL_CAP` for ``metrics.jsonl``);
- parses YAML with ``yaml.safe_load`` semantics (no Python objects, no interpolation: ``${...}`` is plain
  text) under a depth limit and an expanded-node budget (an alias bomb is refused before it is built);
- parses JSON with finite numbers only (``NaN``, ``Infinity`` are refused) under a depth limit.

Each problem raises :class:`UnsafeInput`, a ``ValueError`` whose message is one line naming the file.
See ``docs/run-safety-guarantees.md``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import yaml

TEXT_CAP = 4 << 20
"""Largest YAML/JSON file read (4 MiB): a run's config is a few KiB."""
JSONL_CAP = 512 << 20
"""Largest ``metrics.jsonl`` read (512 MiB: about a million steps of records)."""
MAX_DEPTH = 64
"""Deepest nesting of YAML or JSON accepted (a run config nests about 4 levels)."""
MAX_NODES = 200_000
"""Most YAML nodes accepted, counting every alias as the nodes it stands for."""


class UnsafeInput(ValueError):
    """A run-folder file that is refused; the message is one line naming it and why."""


def read_bytes(path: Path, cap: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (symbolic links followed), at most ``cap`` of them.

    Raises:
        UnsafeInput: missing, not a regular file, unreadable, or larger than ``cap`` (default :data:`TEXT_CAP`).
    """
    path, cap = Path(path), TEXT_CAP if cap is None else cap
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UnsafeInput(f"{path}: cannot be read ({err.strerror or errno.errorcode.get(err.errno, err)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeInput(f"{path}: not a regular file ({_kind(info.st_mode)}); not read")
        if info.st_size > cap:
            raise UnsafeInput(f"{path}: {info.st_size} bytes, over the {cap} bytes a run-folder file may hold; not read")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise UnsafeInput(f"{path}: grew past the {cap} bytes a run-folder file may hold; not read")
        return b"".join(chunks)
    except OSError as err:
        raise UnsafeInput(f"{path}: cannot be read ({err.strerror})") from None
    finally:
        os.close(fd)


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (symbolic links followed); never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def read_text(path: Path, cap: int | None = None) -> str:
    """:func:`read_bytes` decoded as UTF-8 (undecodable bytes become U+FFFD)."""
    return read_bytes(path, cap).decode("utf-8", errors="replace")


# -- YAML -----------------------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses deep nesting and alias expansion past :data:`MAX_NODES`.

    ``compose_node`` is where PyYAML recurses and resolves aliases, so the budget is kept there: the
    expanded size of each node (an alias counts as the whole node it repeats) is known once its
    children are composed, before any Python object is built.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes.get(id(child), 1) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            else:
                size = 1
            if size > MAX_NODES:
                raise yaml.YAMLError(f"expands to more than {MAX_NODES} nodes (an alias bomb?)")
            self._sizes[id(node)] = size
        elif self._sizes[id(node)] > MAX_NODES:
            raise yaml.YAMLError(f"expands to more than {MAX_NODES} nodes (an alias bomb?)")
        return node


def parse_yaml(text: str, source: Path | str = "<text>") -> Any:
    """Plain YAML data from ``text``: safe types only, bounded; ``${...}`` stays text.

    Raises:
        UnsafeInput: not YAML, too deep, or too large once aliases are expanded.
    """
    loader = None
    try:
        loader = _BoundedLoader(text)  # PyYAML's reader checks the characters here already
        return loader.get_single_data()
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeInput(f"{source}: not readable as plain YAML ({detail})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path, cap: int | None = None) -> Any:
    """:func:`parse_yaml` of the file ``path`` (read with :func:`read_text`)."""
    return parse_yaml(read_text(path, cap), path)


# -- JSON -----------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def parse_json(text: str, source: Path | str = "<text>") -> Any:
    """JSON data from ``text`` with finite numbers only, nested at most :data:`MAX_DEPTH` deep.

    Raises:
        UnsafeInput: not JSON, a non-finite number (NaN, Infinity, 1e999), or too deep.
    """
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise UnsafeInput(f"{source}: nested too deeply to be read as JSON") from None
    except ValueError as err:
        raise UnsafeInput(f"{source}: not valid JSON ({str(err).splitlines()[0]})") from None
    if _depth(data) > MAX_DEPTH:
        raise UnsafeInput(f"{source}: nested deeper than {MAX_DEPTH} levels; not read")
    return data


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [c for v in level if isinstance(v, (dict, list)) for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def read_json(path: Path, cap: int | None = None) -> Any:
    """:func:`parse_json` of the file ``path``."""
    return parse_json(read_text(path, cap), path)


def read_jsonl_lines(path: Path, cap: int | None = None) -> list[str]:
    """The lines of a JSON-lines file (each parsed later with :func:`parse_json`), read under ``cap`` (default
    :data:`JSONL_CAP`)."""
    return read_text(path, JSONL_CAP if cap is None else cap).splitlines()
