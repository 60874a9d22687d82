"""The committed JSON Schema of a run's configuration, generated from the pydantic models.

``python -m launchers.schema --write`` (or ``make schema``) regenerates ``conf/schema.json``;
``--check`` exits 1 when the committed file is stale. Editors and CI can validate YAML against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launchers.config import RunConfig

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "conf" / "schema.json"


def render_schema() -> str:
    """The JSON Schema of :class:`~launchers.config.RunConfig`, as committed (sorted, 2-space indent)."""
    schema = RunConfig.model_json_schema(by_alias=True)
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write or check ``conf/schema.json``."""
    parser = argparse.ArgumentParser(prog="python -m launchers.schema", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate conf/schema.json")
    mode.add_argument("--check", action="store_true", help="exit 1 if conf/schema.json is stale")
    args = parser.parse_args(argv)
    fresh = render_schema()
    if args.write:
        SCHEMA_PATH.write_text(fresh)
        print(f"wrote {SCHEMA_PATH}")
        return 0
    current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
    if current != fresh:
        print(f"{SCHEMA_PATH} is stale: regenerate it with `make schema` (python -m launchers.schema --write)")
        return 1
    print(f"{SCHEMA_PATH} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
