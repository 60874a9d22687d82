"""rl-loss aggregation inside slime and miles (not on PyPI): the module slime loads by its path.

    RL_LOSS_CONFIG="loss=drgrpo loss.divisor=4096" python train.py ... \\
        --custom-pg-loss-reducer-function-path rl_loss.integrations.slime.get_pg_loss_reducer

Loading this module (slime does it at the first micro-batch, before any gradient) reads ``RL_LOSS_CONFIG``,
validates it as ``rl-loss-validate`` does and checks that slime's hook can serve it exactly
(:mod:`rl_loss.integrations.slime_config`); a bad configuration raises :class:`~rl_loss.ConfigError`
with one line per problem and the job stops. ``rl-loss-validate --slime-env`` runs the same check in CI.
:data:`get_pg_loss_reducer` is the hook (:mod:`rl_loss.integrations.slime_reducer` says what it computes and
why). megatron-core is imported when the hook is first called; ``import rl_loss`` never imports this
module. Checked against THUDM/slime 624b824a and radixark/miles 31f1ca96; see docs/integrations/slime.md.
"""

from __future__ import annotations

import warnings

from rl_loss.integrations.slime_config import SlimeNotice, load_env_config
from rl_loss.integrations.slime_reducer import PgLossReducerHook, pg_loss_reducer_hook

LOSS_CONFIG, _NOTICES = load_env_config()
for _line in _NOTICES:
    warnings.warn(_line, SlimeNotice, stacklevel=2)

get_pg_loss_reducer: PgLossReducerHook = pg_loss_reducer_hook(LOSS_CONFIG)
"""slime's ``--custom-pg-loss-reducer-function-path`` hook for the loss configuration in ``RL_LOSS_CONFIG``."""

__all__ = ["LOSS_CONFIG", "get_pg_loss_reducer"]
