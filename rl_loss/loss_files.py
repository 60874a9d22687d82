"""Loss group YAML files as ``rl-loss-validate`` reads them: parse checks, key lines, group options.

Problems a file has before any composition (missing, unreadable, not UTF-8, broken YAML, empty, not a
mapping, duplicate or non-string keys) become :class:`~rl_loss.ConfigError` lines naming the file and
line. PyYAML is imported only when a file is read (it comes with omegaconf).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rl_loss.config_errors import ConfigError, show

GROUP = "loss"
PRESETS_PACKAGE = "rl_loss_conf"


@dataclass
class LossFile:
    """A loss group file that parses as a YAML mapping, with the line of each top-level key."""

    path: Path
    text: str
    key_lines: dict[str, int]


def read_loss_file(path: Path) -> LossFile:
    """Read and parse a loss group file.

    Raises:
        ConfigError: a missing, unreadable, non-UTF-8, syntactically broken, empty or non-mapping file,
            and duplicate or non-string top-level keys.
    """
    import yaml

    if not path.exists():
        raise ConfigError([f"{path}: no such file; give the path of a loss group YAML file"])
    if path.is_dir():
        raise ConfigError([f"{path}: is a directory; give the YAML files in it (e.g. {path}/*.yaml)"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot be read ({err.strerror or err})"]) from None
    try:
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
    if problems:
        raise ConfigError(problems)
    return LossFile(path, text, key_lines)


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
