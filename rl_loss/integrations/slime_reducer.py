"""slime / miles ``--custom-pg-loss-reducer-function-path``: the served aggregation modes as a pg-loss reducer.

What the call sites do with the reducer (THUDM/slime 624b824a, radixark/miles 31f1ca96):

- ``slime/backends/megatron_utils/loss.py:1095-1105`` (miles: ``miles/backends/training_utils/loss_hub/
  losses.py:276-287``): ``reducer = get_pg_loss_reducer(total_lengths, response_lengths, masks,
  args.calculate_per_token_loss)`` once per micro-batch and CP rank, then ``pg_loss = reducer(pg_loss)``
  with this rank's per-token pg loss (each sample's CP pieces in a row, the zigzag layout of
  docs/cp-layout.md). ``masks`` are the micro-batch's loss masks, full length R_i, **after** rejection
  sampling when ``--use-tis`` / ``--get-mismatch-metrics`` is on. No CP rank, layout or ``max_seq_lens``
  is passed: they are read here from megatron-core's ``parallel_state`` and Megatron-LM's global args.
- ``loss.py:1351-1361`` (miles ``training_utils/loss.py:186-202``): without the per-token flag the loss is
  multiplied by ``num_microbatches / Q * |DP x CP|``, Q = the step's rollout count (``--global-batch-size``,
  rollouts per step; a step holds whole rollouts, ``slime/utils/dp_schedule.py:82-150``); Megatron's schedule
  divides by ``num_microbatches`` and DDP averages over DP x CP, so the gradient is that of
  ``sum_{micro-batch, DP, CP} reducer(...) / Q``. With ``--calculate-per-token-loss`` the loss is multiplied by
  the CP size and returned with ``num_tokens = sum_i max(|o_i|, 1)`` over the micro-batch's pre-RS masks
  (``loss.py:1316``), which every CP rank reports; ``finalize_model_grads`` divides by the DP x CP sum, so
  the gradient is that of ``sum reducer(...) / sum_i max(|o_i|, 1)`` over the step.

Hence the served modes and their reducer outputs (each exact under the condition given):

- sample_mean: ``sum_i sum_t m*l / max(|o_i|, 1)``; divided by Q it is J when every rollout is one
  training sample (Q = N, slime's default) and no rejection sampling edits the masks (the hook's
  denominators come from the masks it receives).
- constant: ``sum_i sum_t m*l / L``; divided by Q it is J when Q = N. Rejection sampling is fine (L is fixed).
- token_mean (needs ``--calculate-per-token-loss``): ``sum_i sum_t m*l``; divided by slime's token count it is
  J when no sample of the step has an all-zero loss mask (slime counts such a sample as one token).

Layouts: ``thd`` at every CP size. ``bshd`` (miles) cuts CP chunks from the padded width ``max_seq_lens``,
which the hook is not given: with context parallelism it is read from :func:`micro_batch_max_seq_lens`,
which the loss-function bridge ``rl_loss.integrations.slime.policy_loss_function`` opens around miles'
own policy loss; without the bridge the hook raises.

This module imports megatron only inside :func:`megatron_cp_layout` / :func:`megatron_qkv_format`.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rl_loss.config import LossConfig
from rl_loss.reducer import TokenReducer, local_reducer
from rl_loss.step import StepBatch

PgLossReducerHook = Callable[..., Callable[[Tensor], Tensor]]
"""``get_pg_loss_reducer(total_lengths, response_lengths, loss_masks, calculate_per_token_loss=False)``."""


_MAX_SEQ_LENS: contextvars.ContextVar[Sequence[int] | None] = contextvars.ContextVar("rl_loss_max_seq_lens", default=None)
"""The micro-batch's ``max_seq_lens`` (miles' bshd padded width) while the loss-function bridge runs."""


@contextlib.contextmanager
def micro_batch_max_seq_lens(batch: Mapping[str, Any]) -> Iterator[None]:
    """Make ``batch["max_seq_lens"]`` (miles, bshd) visible to the pg-loss reducer hook inside the block."""
    token = _MAX_SEQ_LENS.set(batch.get("max_seq_lens"))
    try:
        yield
    finally:
        _MAX_SEQ_LENS.reset(token)


def _bshd_width(cp_size: int) -> int:
    """The bshd padded width of the current micro-batch, from the loss-function bridge (one value for all samples)."""
    lens = _MAX_SEQ_LENS.get()
    if lens is None or not len(lens):
        raise ValueError(
            f"qkv_format: bshd with context parallelism (cp_size={cp_size}) cuts chunks from the padded width "
            "max_seq_lens, which the pg-loss reducer hook does not receive (got qkv_format=bshd); add "
            "--loss-type custom_loss --custom-loss-function-path rl_loss.integrations.slime.policy_loss_function, "
            "which hands it over, or use --qkv-format thd"
        )
    widths = {int(w) for w in (lens.tolist() if isinstance(lens, Tensor) else lens)}
    if len(widths) != 1:
        raise ValueError(f"max_seq_lens: bshd pads a micro-batch to one width (got {sorted(widths)})")
    return widths.pop()


class EmptySampleTokenCountWarning(UserWarning):
    """token_mean under slime: a sample with no loss token counts as one token in slime's denominator."""


def _sample_mean_weights(step: StepBatch, config: LossConfig) -> Tensor:
    """sample_mean under slime: x = sum_i sum_t m*l / max(|o_i|, 1), and x / Q = J when Q = N  ->  w = m / max(|o_i|, 1)."""
    per_sample = torch.repeat_interleave(step.sample_tokens().clamp_min(1), step.response_lengths_t)
    return step.mask_flat / per_sample


def _constant_weights(step: StepBatch, config: LossConfig) -> Tensor:
    """constant under slime: x = sum_i sum_t m*l / L, and x / Q = J = sum m*l / (N * L) when Q = N  ->  w = m / L."""
    return step.mask_flat / float(config.divisor)


def _token_mean_weights(step: StepBatch, config: LossConfig) -> Tensor:
    """token_mean under slime's per-token flag: x = sum_i sum_t m*l; slime divides by sum_i max(|o_i|, 1)  ->  w = m."""
    if bool((step.sample_tokens() == 0).any()):
        warnings.warn(
            "token_mean: a sample of this micro-batch has no loss-mask token; slime counts it as one token in "
            "--calculate-per-token-loss's denominator, so pg_loss is T / (T + empty samples) of token_mean "
            "(exact when such samples were emptied by rejection sampling only)",
            EmptySampleTokenCountWarning,
            stacklevel=3,
        )
    return step.mask_flat.clone()


HOOK_WEIGHTS: dict[str, Callable[[StepBatch, LossConfig], Tensor]] = {
    "sample_mean": _sample_mean_weights,
    "constant": _constant_weights,
    "token_mean": _token_mean_weights,
}
"""Per-token weights of the reducer output for each served mode (see the module docstring)."""


def megatron_cp_layout() -> tuple[int, int]:
    """``(cp_rank, cp_size)`` from megatron-core's ``parallel_state`` (the CP group slime and miles train with).

    Raises:
        ValueError: when megatron-core's process groups are not initialised (the sizes read 0).
    """
    from megatron.core import parallel_state

    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size < 1:
        raise ValueError(
            f"megatron-core's parallel_state is not initialised (context-parallel size {cp_size}); "
            "the slime adapter runs inside slime's or miles' Megatron backend"
        )
    return parallel_state.get_context_parallel_rank(), cp_size


def megatron_qkv_format() -> str:
    """The sequence layout of the job: Megatron-LM's global ``args.qkv_format`` (miles), ``"thd"`` otherwise (slime)."""
    try:
        from megatron.training.global_vars import get_args
    except ImportError:  # megatron-core alone: no global args, and slime packs sequences (thd) only
        return "thd"
    try:
        args = get_args()
    except AssertionError:  # Megatron-LM asserts when its args are not initialised
        return "thd"
    return getattr(args, "qkv_format", None) or "thd"


def check_per_token_flag(config: LossConfig, calculate_per_token_loss: Any) -> None:
    """slime's ``--calculate-per-token-loss`` must be set exactly for token_mean.

    Raises:
        ValueError: naming both settings and the fix when they disagree.
    """
    theirs, ours = bool(calculate_per_token_loss), bool(config.calculate_per_token_loss)
    if theirs == ours:
        return
    fix = "add --calculate-per-token-loss to slime's arguments" if ours else "remove --calculate-per-token-loss"
    raise ValueError(
        f"calculate_per_token_loss: slime's --calculate-per-token-loss is {theirs} but RL_LOSS_CONFIG's "
        f"aggregation={config.aggregation} needs {ours} (got calculate_per_token_loss={calculate_per_token_loss!r}); {fix}"
    )


def _lengths(name: str, values: Sequence[int] | Tensor) -> list[int]:
    if isinstance(values, Tensor):
        return [int(v) for v in values.detach().cpu().reshape(-1).tolist()]
    return [int(v) for v in values]


def pg_loss_reducer_hook(
    config: LossConfig,
    cp_layout: Callable[[], tuple[int, int]] | None = None,
    qkv_format: Callable[[], str] | None = None,
) -> PgLossReducerHook:
    """slime's ``get_pg_loss_reducer`` for a served loss configuration.

    Args:
        config: a LossConfig that :func:`rl_loss.integrations.slime_config.slime_problems` accepts.
        cp_layout: returns ``(cp_rank, cp_size)``; default :func:`megatron_cp_layout`.
        qkv_format: returns ``"thd"`` or ``"bshd"``; default :func:`megatron_qkv_format`.

    Returns:
        ``get_pg_loss_reducer(total_lengths, response_lengths, loss_masks, calculate_per_token_loss=False)``,
        returning this rank's reducer of the micro-batch (a :class:`~rl_loss.TokenReducer`).

    Raises:
        ValueError: for a mode the hook does not serve (here); when the hook is called, for a
            ``calculate_per_token_loss`` that disagrees with the config, bshd with context parallelism
            outside :func:`micro_batch_max_seq_lens` (the hook receives no ``max_seq_lens``), or
            inconsistent lengths and masks.
    """
    if config.custom_pg_reducer is not None or config.aggregation not in HOOK_WEIGHTS:
        raise ValueError(
            f"aggregation: slime's pg-loss reducer hook serves {', '.join(HOOK_WEIGHTS)} "
            f"(got {config.aggregation}); see docs/integrations/slime.md"
        )
    weights_of = HOOK_WEIGHTS[config.aggregation]
    read_cp = cp_layout or megatron_cp_layout
    read_format = qkv_format or megatron_qkv_format

    def get_pg_loss_reducer(
        total_lengths: Sequence[int] | Tensor,
        response_lengths: Sequence[int] | Tensor,
        loss_masks: Sequence[Tensor],
        calculate_per_token_loss: bool = False,
    ) -> TokenReducer:
        check_per_token_flag(config, calculate_per_token_loss)
        cp_rank, cp_size = read_cp()
        layout = read_format()
        # with cp_size == 1 a rank holds whole responses in either layout
        max_seq_len = _bshd_width(cp_size) if layout == "bshd" and cp_size > 1 else None
        step = StepBatch(_lengths("response_lengths", response_lengths), _lengths("total_lengths", total_lengths),
                         list(loss_masks))
        fmt = "bshd" if max_seq_len is not None else "thd"
        return local_reducer(weights_of(step, config), step, None, cp_rank, cp_size, fmt, max_seq_len)

    return get_pg_loss_reducer
