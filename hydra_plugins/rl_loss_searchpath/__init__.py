"""Hydra plugin of rl-loss: the loss presets (``loss=grpo|dapo|drgrpo|scalerl|...``) in any Hydra app.

Once rl-loss is installed, Hydra finds this module at every app start (it imports every module under
the ``hydra_plugins`` namespace) and

- appends ``pkg://rl_loss_conf`` (the repository's ``conf/``, installed under that name) to the app's
  config search path, after the app's own configs, so the app's files win;
- stores the ``loss/base`` node (LossConfig's defaults) in Hydra's ConfigStore: the presets start
  their defaults list with ``base``.

Hydra imports it at each start of every Hydra app, so it imports nothing but Hydra itself: no torch
and not ``rl_loss`` (whose ``__init__`` imports torch); the base node is the plain literal in
:mod:`hydra_plugins.rl_loss_searchpath.loss_base`, generated from ``LossConfig``.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin

from hydra_plugins.rl_loss_searchpath.loss_base import LOSS_BASE

PROVIDER = "rl-loss"
"""The name ``python app.py --info searchpath`` shows for this plugin's entries."""

PRESETS_PACKAGE = "rl_loss_conf"
"""The installed package holding the config groups (``loss/*.yaml``)."""

SEARCH_PATH = f"pkg://{PRESETS_PACKAGE}"
"""The search path entry this plugin appends."""


def register_loss_base() -> None:
    """Store ``loss/base`` (LossConfig's defaults) in Hydra's ConfigStore; storing again is harmless."""
    ConfigStore.instance().store(group="loss", name="base", node=dict(LOSS_BASE), provider=PROVIDER)


class RLLossSearchPathPlugin(SearchPathPlugin):
    """Appends the rl-loss config groups to the search path of every Hydra app."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider=PROVIDER, path=SEARCH_PATH)


register_loss_base()
