"""``rl-loss-validate`` (= ``python -m rl_loss.validate``): check loss configurations in CI and pre-commit.

    rl-loss-validate conf/loss/*.yaml                      # loss group files, each on its own
    rl-loss-validate conf/loss/drgrpo.yaml loss.divisor=40960   # files, with overrides applied to each
    rl-loss-validate loss=drgrpo loss.divisor=40960        # a preset and overrides, as on an app's command line
    rl-loss-validate --schema > loss.schema.json           # the loss group's JSON Schema, for editors

A FILE is a loss group file as a Hydra app keeps it (``conf/loss/NAME.yaml``): a mapping of LossConfig
fields, with or without a Hydra ``defaults:`` list. The list may name ``base`` (LossConfig's defaults), a
shipped preset to extend (``grpo``, ``dapo``, ...), a sibling file when the file sits in a folder named
``loss``, and ``_self_``. A file is composed as ``loss=NAME`` composes in a Hydra app with the rl-loss
plugin (a file without a defaults list on top of ``base``, so that overrides may set any field), then
validated; an interpolation to a key outside the loss group (``${rollout...}``) cannot resolve here and
is reported with the field it sets. An argument that contains ``=`` and is not an existing file is an
override (Hydra syntax; ``loss.`` may be left out of a key).

Exit status 0 when every configuration is valid (warnings are printed), 2 otherwise, with one line per
problem on stderr: ``SOURCE: loss.FIELD: what is wrong (got VALUE); fix``, where SOURCE is ``FILE`` or
``FILE:LINE``, or the override responsible. No input gives a traceback.

Each kind of input has its own module: :mod:`rl_loss.loss_files` (files) and :mod:`rl_loss.loss_overrides`
(overrides); this one composes, validates and reports. Nothing named in an input is imported or resolved
unless ``--import-custom`` is given (docs/trust-library.md).

This module imports Hydra only inside :func:`main`'s work; ``import rl_loss`` never imports it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_loss.config import LossConfig
from rl_loss.config_errors import ConfigError, hydra_error_lines, show, validate_model
from rl_loss.custom_reducer import load_custom_reducer
from rl_loss.integrations.verl_config import verl_config_problems
from rl_loss.loss_files import GROUP, LossFile, field_path, group_options, read_loss_file, resolver_problem
from rl_loss.loss_overrides import loss_override, override_key, split_inputs, unparsable_overrides

EXIT_OK, EXIT_INVALID = 0, 2
INPUT_NAME = "rl_loss_validate_input"  # the file under validation, as an option of the loss group
PRIMARY_NAME = "rl_loss_validate"
PRESETS_SEARCH_PATH = "pkg://rl_loss_conf"
INTERPOLATION = {"type": "string", "pattern": r"^\$\{.+\}$", "description": "a Hydra/OmegaConf interpolation"}


@dataclass
class Outcome:
    """The result of validating one input: problem lines, warning lines, or a one-line summary."""

    label: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: str = ""


# --- composition and validation -------------------------------------------------------------------------------


def compose_loss(overrides: list[str], loss_file: LossFile | None) -> Any:
    """The ``loss`` node composed by Hydra: LossConfig's defaults, the file or preset, then the overrides.

    Raises:
        Exception: whatever Hydra's compose raises (reported as one line by the caller).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hydra_plugins.rl_loss_searchpath import register_loss_base

    register_loss_base()
    search_path = [PRESETS_SEARCH_PATH]  # siblings are copied in below, checked: Hydra reads no folder of the user's
    primary = {"defaults": [{GROUP: "base"}, "_self_"], "hydra": {"searchpath": search_path}}
    with tempfile.TemporaryDirectory(prefix="rl-loss-validate-") as tmp:
        # JSON is YAML: no quoting trouble with paths.
        (Path(tmp) / f"{PRIMARY_NAME}.yaml").write_text(json.dumps(primary))
        if loss_file is not None:
            (Path(tmp) / GROUP).mkdir()
            (Path(tmp) / GROUP / f"{INPUT_NAME}.yaml").write_text(loss_file.text, encoding="utf-8")
            for sibling_name, sibling in loss_file.siblings.items():
                (Path(tmp) / GROUP / f"{sibling_name}.yaml").write_text(sibling.text, encoding="utf-8")
            name = INPUT_NAME
            if "defaults" not in loss_file.key_lines:  # a plain mapping: on top of LossConfig's defaults
                name = f"{INPUT_NAME}_on_base"
                (Path(tmp) / GROUP / f"{name}.yaml").write_text(json.dumps({"defaults": ["base", INPUT_NAME]}))
            overrides = [f"{GROUP}={name}", *overrides]
        GlobalHydra.instance().clear()
        try:
            with warnings.catch_warnings(), initialize_config_dir(config_dir=tmp, version_base=None):
                warnings.simplefilter("ignore")  # Hydra's own notices are not about the user's config
                return compose(PRIMARY_NAME, overrides=overrides)[GROUP]
        finally:
            GlobalHydra.instance().clear()


def resolve_loss(node: Any) -> dict[str, Any]:
    """The composed loss node as plain values, interpolations resolved.

    Raises:
        ConfigError: one line per field whose interpolation does not resolve outside the user's app.
    """
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(node, resolve=False)
    fields = {f.alias or name for name, f in LossConfig.model_fields.items()}
    data, problems = {}, []
    for key in raw:
        unsafe = resolver_problem(json.dumps(raw[key], default=str))  # a preset, file or override may call one
        if unsafe:
            problems.append(f"{field_path(str(key))}: {unsafe} (got {show(raw[key])})")
            continue
        if key not in fields:  # an unknown key is reported as such, whatever its value
            data[key] = raw[key]
            continue
        try:
            value = node[key]
            data[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception as err:  # OmegaConf's resolution errors have several types
            problems.append(
                f"{field_path(str(key))}: cannot resolve {show(raw[key])} outside your app "
                f"({str(err).splitlines()[0]}); give the value itself or pass {field_path(str(key))}=VALUE"
            )
    if problems:
        raise ConfigError(problems)
    return data


def validate_loss(data: dict[str, Any]) -> tuple[LossConfig, list[str]]:
    """LossConfig from plain values, and the warnings it raised.

    Raises:
        ConfigError: one line per problem, fields named ``loss.FIELD``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = validate_model(LossConfig, data, prefix=GROUP)  # field and cross-field problems at once
    return config, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def check(overrides: list[str], loss_file: LossFile | None, label: str, import_custom: bool = False) -> Outcome:
    """Compose, resolve and validate one input; every problem becomes a line naming its source.

    ``custom_pg_reducer`` is imported (running its module's code) only with ``import_custom``.
    """
    given = {override_key(loss_override(o)): o for o in overrides if override_key(o) != GROUP}
    preset = next((o for o in overrides if override_key(o) == GROUP), None)

    def source(problem: str) -> str:
        key = problem.split(": ", 1)[0]
        for k in sorted(given, key=len, reverse=True):  # the most specific override that sets the field
            if k == key or key.startswith(k + "."):
                return given[k]
        if loss_file is not None:
            name = key.removeprefix(f"{GROUP}.").split(".")[0]
            line = loss_file.key_lines.get(name)
            return f"{loss_file.path}:{line}" if line else str(loss_file.path)
        return preset or "(defaults)"

    outcome = Outcome(label)
    outcome.problems = unparsable_overrides(overrides)
    if outcome.problems:
        return outcome
    try:
        node = compose_loss([loss_override(o) for o in overrides], loss_file)
    except Exception as err:  # Hydra raises several exception types; each becomes one line
        outcome.problems = composition_problems(err, overrides, loss_file, label)
        return outcome
    try:
        config, outcome.warnings = validate_loss(resolve_loss(node))
    except ConfigError as err:
        located = [(source(p), p) for p in err.problems]
        if loss_file is not None:  # in the order of the file's lines
            located.sort(key=lambda sp: _line_number(sp[0], loss_file))
        outcome.problems = [f"{where}: {p}" for where, p in located]
        return outcome
    divisor = f", divisor={config.divisor:g}" if config.divisor is not None else ""
    outcome.summary = f"aggregation={config.aggregation}{divisor}"
    if config.custom_pg_reducer is not None:
        if not import_custom:
            outcome.summary += f", custom_pg_reducer={config.custom_pg_reducer} not imported (--import-custom checks it)"
        else:
            try:
                load_custom_reducer(config.custom_pg_reducer)
            except ValueError as err:
                problem = f"{GROUP}.{err}"
                outcome.problems = [f"{source(problem)}: {problem}"]
    return outcome


def _line_number(source: str, loss_file: LossFile) -> int:
    head, _, line = source.rpartition(":")
    return int(line) if head == str(loss_file.path) and line.isdigit() else 0


def composition_problems(err: Exception, overrides: list[str], loss_file: LossFile | None, label: str) -> list[str]:
    """One line for a Hydra composition error, naming the override or the file's defaults list."""
    missing = re.search(rf"Could not load '{GROUP}/([^']+)'", str(err))
    if loss_file is not None and missing:
        # a defaults entry of the file names no option of the loss group
        line = loss_file.key_lines.get("defaults")
        options = group_options(loss_file)
        close = difflib.get_close_matches(missing.group(1), options, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return [
            f"{loss_file.path}{f':{line}' if line else ''}: defaults: no loss preset {missing.group(1)!r}{hint} "
            f"(available: base, {', '.join(options)}); name one of them"
        ]
    blamed = next((o for o in overrides if f"'{override_key(loss_override(o))}'" in str(err)), None)
    hidden = ("base", INPUT_NAME, f"{INPUT_NAME}_on_base")
    lines = hydra_error_lines(err, blamed, LossConfig, GROUP, hidden_options=hidden)
    where = "" if loss_file is None else f"{loss_file.path}: "
    temporary_names = re.compile(rf"{GROUP}/{INPUT_NAME}\w*|{INPUT_NAME}\w*\.yaml")
    return [temporary_names.sub(lambda _: label, where + line) for line in lines]


def check_file(path: str, overrides: list[str], import_custom: bool = False) -> Outcome:
    """Validate one loss group file (with the overrides applied on top)."""
    try:
        loss_file = read_loss_file(Path(path))
    except ConfigError as err:
        return Outcome(path, problems=err.problems)
    return check(overrides, loss_file, path, import_custom)


def check_overrides(overrides: list[str], import_custom: bool = False) -> Outcome:
    """Validate ``loss=PRESET key=value ...`` overrides on their own, as an app's command line would compose them."""
    return check(overrides, None, " ".join(overrides), import_custom)


# --- the JSON Schema -------------------------------------------------------------------------------------------


def loss_group_schema() -> dict[str, Any]:
    """JSON Schema of a loss group file: LossConfig's fields, Hydra's ``defaults`` list, interpolations allowed."""
    schema = LossConfig.model_json_schema(by_alias=True)
    properties = {}
    for name, prop in schema["properties"].items():
        meta = {k: prop[k] for k in ("title", "description", "default") if k in prop}
        rule = {k: v for k, v in prop.items() if k not in meta}
        properties[name] = {**meta, "anyOf": [rule, INTERPOLATION]}
    properties["defaults"] = {
        "title": "Defaults",
        "description": "Hydra's defaults list: base (LossConfig's defaults), a preset to extend, _self_.",
        "type": "array",
        "items": {"anyOf": [{"type": "string"}, {"type": "object"}]},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **{k: v for k, v in schema.items() if k != "properties"},
        "title": "rl-loss loss group (conf/loss/*.yaml)",
        "properties": properties,
    }


# --- the command ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rl-loss-validate",
        description="Validate rl-loss loss configurations: YAML loss group files or loss=PRESET overrides. "
        "Exit 0 when valid, 2 with one line per problem.",
        epilog="examples:\n  rl-loss-validate conf/loss/*.yaml\n  rl-loss-validate loss=drgrpo loss.divisor=40960\n"
        "  rl-loss-validate --schema > loss.schema.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", metavar="FILE|OVERRIDE",
                        help="loss group YAML files, and/or overrides such as loss=grpo loss.kl_coef=0.01")
    parser.add_argument("--schema", action="store_true", help="print the loss group's JSON Schema and exit")
    parser.add_argument("--verl", action="append", default=[], metavar="FILE",
                        help="a verl trainer config whose rl-loss section to check (docs/integrations/verl.md)")
    parser.add_argument("--slime-env", action="store_true",
                        help="validate $RL_LOSS_CONFIG as rl_loss.integrations.slime does when slime loads it")
    parser.add_argument("--import-custom", action="store_true",
                        help="also import loss.custom_pg_reducer and call it on a two-sample step: this RUNS the named "
                        "module's code, so never use it on files you do not trust (off by default: only the "
                        "'module:function' shape is checked)")
    return parser


def run(inputs: list[str], import_custom: bool = False) -> list[Outcome]:
    """Validate files (each with the overrides) or, without files, the overrides alone."""
    files, overrides = split_inputs(inputs)
    if not files:
        return [check_overrides(overrides, import_custom)]
    presets = [o for o in overrides if override_key(o) == GROUP]
    if presets:
        return [Outcome(p, problems=[f"{p}: a preset cannot be combined with files (each file is the loss group); "
                                     "drop it or validate it without files"]) for p in presets]
    return [check_file(path, overrides, import_custom) for path in files]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rl-loss-validate``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.schema:
        print(json.dumps(loss_group_schema(), indent=2, sort_keys=True))
        return EXIT_OK
    if args.slime_env:  # the slime adapter's load-time check (imports no megatron)
        from rl_loss.integrations.slime_config import slime_env_main

        return slime_env_main(args.inputs)
    if not args.inputs and not args.verl:
        print("rl-loss-validate: nothing to validate; give loss group YAML files or overrides such as "
              "loss=grpo (see --help)", file=sys.stderr)
        return EXIT_INVALID
    outcomes = (run(args.inputs, args.import_custom) if args.inputs else []) + [
        Outcome(p, *verl_config_problems(Path(p))) for p in args.verl
    ]
    for outcome in outcomes:
        for line in outcome.problems:
            print(line, file=sys.stderr)
        for line in outcome.warnings:
            print(f"{outcome.label}: warning: {line}", file=sys.stderr)
        if not outcome.problems:
            print(f"{outcome.label}: ok ({outcome.summary})")
    return EXIT_INVALID if any(o.problems for o in outcomes) else EXIT_OK


def _without_working_directory_on_path() -> None:
    """``python -m`` puts the working directory first on sys.path; a checkout under review could then shadow
    a module that Hydra imports (its ``hydra_plugins`` packages). The console script has no such entry."""
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]


if __name__ == "__main__":
    _without_working_directory_on_path()
    sys.exit(main())
