"""Hydra's base config, generated from the pydantic models (the single source of truth).

``conf/config.yaml`` starts its defaults list with ``base_config``, every ``conf/loss/*.yaml`` with
``base``, and every option ``X`` of the ``backend`` and ``model`` groups with ``base_X``: all are the
models' defaults, registered here in Hydra's ConfigStore. So every field can be overridden from the
command line (``loss.divisor=40960``, ``model.name_or_path=...``), a misspelt key is caught by Hydra's
struct mode, and the YAML files only hold values that differ from the defaults. A required field
(no default, e.g. ``model.name_or_path`` of ``model=hf``) is Hydra's ``???``. ``loss/base`` is the
Hydra plugin's own registration (:mod:`hydra_plugins.rl_loss_searchpath`, generated from LossConfig),
so the launcher and every other Hydra app compose the presets on the same base.
"""

from __future__ import annotations

from typing import Any, get_args

from hydra.core.config_store import ConfigStore
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from hydra_plugins.rl_loss_searchpath import register_loss_base
from launchers.config.run_config import RunConfig

SCHEMA_NODE_PREFIX = "base"
"""Group options named ``base`` or ``base_*`` are schema nodes, not options a user picks."""

GROUP_SECTIONS = ("backend", "model")
"""RunConfig sections that are Hydra groups with one pydantic model per option (tagged by ``kind``)."""

_registered = False


def is_schema_node(option: str) -> bool:
    """True for the generated nodes (``base``, ``base_toy``, ...) that group options build on."""
    return option == SCHEMA_NODE_PREFIX or option.startswith(SCHEMA_NODE_PREFIX + "_")


def section_options(section: str) -> dict[str, type[BaseModel]]:
    """The options of a group section and their models, e.g. ``{"toy": ModelConfig, "hf_tiny": ...}``."""
    union = get_args(RunConfig.model_fields[section].annotation)
    return {member.model_fields["kind"].default: member for member in union}


def schema_node(model: type[BaseModel]) -> dict[str, Any]:
    """Every field of ``model`` at its default (``???`` where it has none), as plain YAML-able values."""
    return {
        field.alias or name: "???" if field.is_required() else to_jsonable_python(field.get_default(call_default_factory=True))
        for name, field in model.model_fields.items()
    }


def register_configs() -> None:
    """Store ``base_config``, ``loss/base`` and ``{backend,model}/base_OPTION`` in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    run_defaults = RunConfig().model_dump(mode="json", exclude={"loss", *GROUP_SECTIONS})
    store.store(name="base_config", node=run_defaults)
    register_loss_base()
    for section in GROUP_SECTIONS:
        for option, model in section_options(section).items():
            store.store(group=section, name=f"{SCHEMA_NODE_PREFIX}_{option}", node=schema_node(model))
    _registered = True
