"""Files generated from the pydantic models: the JSON Schema of a run and the Hydra plugin's loss base.

``python -m launchers.config.schema --write`` (or ``make schema``) regenerates both ``conf/schema.json`` and
``hydra_plugins/rl_loss_searchpath/loss_base.py`` (LossConfig's defaults as a plain literal, so that
the plugin imports neither torch nor rl_loss); ``--check`` exits 1 when either committed file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launchers.config.run_config import RunConfig
from rl_loss.config import LossConfig

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "conf" / "schema.json"
LOSS_BASE_PATH = ROOT / "hydra_plugins" / "rl_loss_searchpath" / "loss_base.py"
REGENERATE = "`make schema` (python -m launchers.config.schema --write)"


def render_schema() -> str:
    """The JSON Schema of :class:`~launchers.config.run_config.RunConfig`, as committed (sorted, 2-space indent)."""
    schema = RunConfig.model_json_schema(by_alias=True)
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def loss_base() -> dict:
    """The ``loss/base`` node: LossConfig's defaults as Hydra sees them (aliases, JSON values)."""
    return LossConfig().model_dump(mode="json", by_alias=True)


def render_loss_base() -> str:
    """``loss_base.py``: the :func:`loss_base` dict as a Python literal, one key per line."""
    lines = [f"    {json.dumps(key)}: {_literal(value)}," for key, value in loss_base().items()]
    return (
        '"""The ``loss/base`` node of the Hydra plugin: LossConfig\'s defaults as plain values.\n\n'
        f"GENERATED from rl_loss.config.LossConfig by {REGENERATE}; do not edit.\n"
        "A literal, so that the plugin imports neither torch nor rl_loss; tests/test_hydra_plugin.py fails\n"
        'when it differs from LossConfig().model_dump(mode="json", by_alias=True).\n'
        '"""\n\n'
        "LOSS_BASE = {\n" + "\n".join(lines) + "\n}\n"
    )


def _literal(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


GENERATED = {SCHEMA_PATH: render_schema, LOSS_BASE_PATH: render_loss_base}


def main(argv: list[str] | None = None) -> int:
    """Write or check the generated files."""
    parser = argparse.ArgumentParser(prog="python -m launchers.config.schema", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate conf/schema.json and the plugin's loss base")
    mode.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    args = parser.parse_args(argv)
    stale = 0
    for path, render in GENERATED.items():
        fresh = render()
        if args.write:
            path.write_text(fresh)
            print(f"wrote {path}")
        elif (path.read_text() if path.exists() else "") != fresh:
            print(f"{path} is stale: regenerate it with {REGENERATE}")
            stale = 1
        else:
            print(f"{path} is up to date")
    return stale


if __name__ == "__main__":
    sys.exit(main())
