"""rl-loss aggregation inside slime and miles (not on PyPI): the module slime loads by its path.

    RL_LOSS_CONFIG="loss=drgrpo loss.divisor=4096" python train.py ... \\
        --custom-pg-loss-reducer-function-path rl_loss.integrations.slime.get_pg_loss_reducer

Loading this module (slime does it at the first micro-batch, before any gradient) reads ``RL_LOSS_CONFIG``,
validates it as ``rl-loss-validate`` does and checks that slime's hook can serve it exactly
(:mod:`rl_loss.integrations.slime_config`); a bad configuration raises :class:`~rl_loss.ConfigError`
with one line per problem and the job stops. ``rl-loss-validate --slime-env`` runs the same check in CI.
:data:`get_pg_loss_reducer` is the hook (:mod:`rl_loss.integrations.slime_reducer` says what it computes and
why). For miles with ``--qkv-format bshd`` and context parallelism, :func:`policy_loss_function` is the
``--custom-loss-function-path`` bridge that hands the hook the padded width. megatron-core is imported when the hook is first called; ``import rl_loss`` never imports this
module. Checked against THUDM/slime 624b824a and radixark/miles 31f1ca96; see docs/integrations/slime.md.
"""

from __future__ import annotations

import warnings
from typing import Any

from rl_loss.integrations.slime_config import SlimeNotice, load_env_config
from rl_loss.integrations.slime_reducer import PgLossReducerHook, micro_batch_max_seq_lens, pg_loss_reducer_hook

LOSS_CONFIG, _NOTICES = load_env_config()
for _line in _NOTICES:
    warnings.warn(_line, SlimeNotice, stacklevel=2)

get_pg_loss_reducer: PgLossReducerHook = pg_loss_reducer_hook(LOSS_CONFIG)
"""slime's ``--custom-pg-loss-reducer-function-path`` hook for the loss configuration in ``RL_LOSS_CONFIG``."""



def policy_loss_function(args: Any, batch: Any, logits: Any, sum_of_sample_mean: Any) -> Any:
    """miles' ``--custom-loss-function-path`` bridge for bshd with context parallelism.

    ``--loss-type custom_loss --custom-loss-function-path rl_loss.integrations.slime.policy_loss_function``:
    runs miles' own ``policy_loss_function`` (``miles/backends/training_utils/loss_hub/losses.py``) unchanged,
    with the micro-batch's ``max_seq_lens`` visible to :data:`get_pg_loss_reducer`, which needs the padded
    width to find a CP rank's tokens under bshd. Same signature and return as miles' function.
    """
    from miles.backends.training_utils.loss_hub.losses import policy_loss_function as miles_policy_loss

    with micro_batch_max_seq_lens(batch):
        return miles_policy_loss(args, batch, logits, sum_of_sample_mean)


__all__ = ["LOSS_CONFIG", "get_pg_loss_reducer", "policy_loss_function"]
