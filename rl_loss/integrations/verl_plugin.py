"""Entry point of the ``verl.plugins`` group: ``import verl`` runs this module (VERL_USE_EXTERNAL_PLUGINS=auto).

It registers rl-loss's policy loss (``loss_mode=rl_loss``) by importing :mod:`rl_loss.integrations.verl`.
verl logs a plugin that fails to load at DEBUG only, which hides the failure until a run asks for
``loss_mode=rl_loss``; so this module logs its own failure at WARNING, then re-raises for verl.
Standard library only at import time. See ``docs/integrations/verl.md``.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

PLUGIN_MODULE = "rl_loss.integrations.verl"

try:
    importlib.import_module(PLUGIN_MODULE)
except Exception as err:
    logger.warning(
        "rl-loss verl plugin not loaded: importing %s failed (%s: %s); loss_mode=rl_loss is unavailable. "
        "Install rl-loss[verl] (verl>=0.9.1,<0.10)", PLUGIN_MODULE, type(err).__name__, err,
    )
    raise
