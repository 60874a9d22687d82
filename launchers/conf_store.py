"""Hydra's base config, generated from the pydantic models (the single source of truth).

``conf/config.yaml`` starts its defaults list with ``base_config`` and every ``conf/loss/*.yaml`` with
``base``: both are the models' defaults, registered here in Hydra's ConfigStore. So every field can
be overridden from the command line (``loss.divisor=40960``), a misspelt key is caught by Hydra's
struct mode, and the YAML files only hold values that differ from the defaults. ``loss/base`` is the
Hydra plugin's own registration (:mod:`hydra_plugins.rl_loss_searchpath`, generated from LossConfig),
so the launcher and every other Hydra app compose the presets on the same base.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from hydra_plugins.rl_loss_searchpath import register_loss_base
from launchers.config import RunConfig

_registered = False


def register_configs() -> None:
    """Store ``base_config`` (every section but loss) and ``loss/base`` in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    run_defaults = RunConfig().model_dump(mode="json", exclude={"loss"})
    store.store(name="base_config", node=run_defaults)
    register_loss_base()
    _registered = True
