"""megatron-core adapter: the aggregation modes as the ``loss_func`` of megatron-core's forward-backward schedule.

A Megatron-LM-based RL trainer returns ``(output_tensor, loss_func)`` from its ``forward_step_func``;
:func:`megatron_loss_func` (per-token loss in, pg_loss out) and :func:`megatron_policy_loss_func`
(log-probs in, the full §5 policy loss out) build that ``loss_func`` for one micro-batch on one rank.
The returned tuple is scaled so that, after everything megatron-core does to it, the summed gradient
is the gradient of the step objective J (docs/aggregation.md, docs/exactness.md), whatever the DP x CP x micro-batch partition.

What megatron-core 0.16.1 does to the loss (paths relative to ``megatron/core``):

- ``pipeline_parallel/schedules.py:256-263`` (``forward_step_calc_loss``), 3-tuple
  ``(loss, num_tokens, report)``: unless ``config.calculate_per_token_loss``, the loss is divided by
  ``clamp(num_tokens, min=1)`` and by ``num_microbatches``; with the flag it is left as it is.
- ``schedules.py:264-269``, 2-tuple ``(loss, report)`` (legacy): the loss is multiplied by the CP
  group size and divided by ``num_microbatches``.
- ``schedules.py:596,649,672`` add every micro-batch's ``num_tokens`` into ``total_num_tokens``;
  ``schedules.py:677-685`` hand it to ``finalize_model_grads`` only with ``calculate_per_token_loss``
  (the same at ``schedules.py:1919-1924`` and ``:2311-2316`` for the pipelined schedules).
- ``schedules.py:477-478`` multiply by ``grad_scale_func`` (mixed-precision loss scaling), which the
  optimizer divides out again; it is not part of the objective.
- ``distributed/distributed_data_parallel.py:254-288``: DDP pre-scales gradients by
  ``gradient_scaling_factor = 1 / |DP x CP|`` and sums them over the DP x CP group
  (``distributed/param_and_grad_buffer.py:388-396``; ``average_in_collective`` reaches the same
  ``1 / |DP x CP|`` with an AVG collective); with ``calculate_per_token_loss`` the factor is 1 (a plain
  sum). Megatron-FSDP does the same (``distributed/fsdp/src/megatron_fsdp/megatron_fsdp.py:322-337``).
- ``distributed/finalize_model_grads.py:484-497``: with ``calculate_per_token_loss`` the summed
  gradients are multiplied by ``1 / num_tokens``, where ``num_tokens`` is ``total_num_tokens``
  all-reduced (summed) over the DP x CP group, skipped when that sum is 0.

Which path and why. Both modes use the **3-tuple** return:

- Without ``calculate_per_token_loss`` (sample_mean, prompt_mean, constant, trajectory_mean, custom): return
  ``(partial * num_microbatches * dp_cp_size, 1, report)``. The schedule divides by ``clamp(1, 1) = 1``
  and by ``num_microbatches``; DDP multiplies by ``1 / dp_cp_size`` and sums over DP x CP; the
  micro-batches accumulate. The gradient is ``sum_{micro-batch, DP, CP} grad(partial) = grad J``.
  The 2-tuple path would also work with ``partial * num_microbatches * dp_size`` (CP excluded, since it
  multiplies by the CP size), but it assumes the legacy convention that every CP rank returns the
  whole sequence's loss, and it sends ``num_tokens = 0`` to ``finalize_model_grads`` (which then skips
  its division) if the flag is on; the 3-tuple path has neither trap. docs/exactness.md's
  ``partial * num_microbatches * dp_cp_size`` is exactly the 3-tuple scaling with ``num_tokens = 1``.
- With ``calculate_per_token_loss`` (token_mean only; :class:`~rl_loss.LossConfig` enforces it):
  return ``(partial * max(T, 1), n_local, report)``, where ``partial * T`` is this rank's masked token
  sum and ``n_local`` its masked token count with each token counted once across CP ranks
  (:meth:`~rl_loss.TokenReducer.token_count`). The schedule leaves the loss alone, DDP sums, and
  ``finalize_model_grads`` divides by ``sum n_local = T``: the gradient is ``grad J`` again. Terms that
  are not pg_loss (KL, entropy) ride along with the same ``T`` factor, so they keep their weight.
  The counts come from the pre-RS loss masks, like every denominator (docs/aggregation.md).

Megatron's ``calculate_per_token_loss`` (on its ``TransformerConfig``) must equal
``factory.config.calculate_per_token_loss``: measured through megatron-core's schedule, a token_mean
``loss_func`` under a config without the flag gives a gradient off by 7-46% (30 random steps of 14
samples in 4 micro-batches, ``tests/test_megatron_schedule.py``) with no error. So
``megatron_config=`` is a required argument of both loss funcs, checked by
:func:`check_megatron_config` when the ``loss_func`` is built: a disagreement raises at the first
micro-batch, before any gradient. One :class:`~rl_loss.StepBatch` must describe exactly the
samples of one ``forward_backward_func`` call over all DP ranks (one optimizer step), each sample on
exactly one micro-batch of one DP rank.

The report dict holds, per metric, a detached 2-element tensor ``[partial * k, 1]`` with
``k = num_microbatches * dp_cp_size``. Megatron-LM's training loop reduces 2-element values by summing
over micro-batches, all-reducing over DP x CP and dividing element 0 by element 1: that gives
``(k * sum of partials) / k``, the step value (J for pg_loss); the DP x CP all-reduce also sums the CP
pieces. ``value[0] / k`` is this rank's plain partial.

Example (inside a Megatron-LM ``forward_step_func``)::

    from megatron.core import parallel_state as ps

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], ...)
        loss_func = megatron_policy_loss_func(
            factory, step, sample_indices=batch["sample_indices"],
            old_logprobs=batch["old_logprobs"], advantages=batch["advantages"],
            cp_rank=ps.get_context_parallel_rank(), cp_size=ps.get_context_parallel_world_size(),
            qkv_format="thd", num_microbatches=get_num_microbatches(),
            dp_cp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
            megatron_config=model.config,   # its TransformerConfig: calculate_per_token_loss is checked
            logprobs_from_output=lambda out: gather_response_logprobs(out, batch),
        )
        return output, loss_func

This module does not import megatron-core; it only follows its contract (checked against 0.16.1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rl_loss.aggregation import ReducerFactory, TokenReducer
from rl_loss.extras import require_extra
from rl_loss.policy_loss import policy_loss
from rl_loss.step import StepBatch

# megatron-core is not imported here, but nothing calls these loss functions without its schedule.
require_extra("megatron", ("megatron.core",), "rl_loss.integrations.megatron")

MEGATRON_CORE_CHECKED = "0.16.1"
"""megatron-core release whose schedule, DDP and finalize_model_grads the scaling was derived from."""

MegatronLossReturn = tuple[Tensor, Tensor, dict[str, Tensor]]
"""``(loss, num_tokens, report)``: the 3-tuple contract of ``forward_step_calc_loss``."""

MegatronLossFunc = Callable[[Tensor], MegatronLossReturn]
"""What ``forward_step_func`` returns as its second element; called with the model's output tensor."""


def check_megatron_config(factory: ReducerFactory, megatron_config: Any) -> None:
    """Check that Megatron's ``calculate_per_token_loss`` agrees with the loss configuration.

    The two sides scale the loss in complementary ways; if they disagree the gradient is off by a
    factor of T (the step's masked token count) or ``num_microbatches * |DP x CP|``.

    Args:
        factory: the reducer factory whose ``config.calculate_per_token_loss`` the loss funcs follow.
        megatron_config: Megatron's model config (``TransformerConfig``) or anything with a
            ``calculate_per_token_loss`` attribute.

    Raises:
        ValueError: naming both settings and the fix when they differ.
    """
    ours = bool(factory.config.calculate_per_token_loss)
    theirs = getattr(megatron_config, "calculate_per_token_loss", None)
    if theirs is None:
        raise ValueError(
            f"megatron_config has no calculate_per_token_loss attribute (got {type(megatron_config).__name__}); "
            "pass Megatron's TransformerConfig"
        )
    if bool(theirs) != ours:
        fix = (
            "set Megatron's calculate_per_token_loss=true (aggregation=token_mean needs it)"
            if ours
            else f"set Megatron's calculate_per_token_loss=false or use aggregation=token_mean "
            f"(got aggregation={factory.aggregation})"
        )
        raise ValueError(
            f"calculate_per_token_loss: Megatron's config has {bool(theirs)} but the loss config has {ours}; {fix}"
        )


def megatron_loss_func(
    factory: ReducerFactory,
    step: StepBatch,
    *,
    num_microbatches: int,
    dp_cp_size: int,
    megatron_config: Any,
    sample_indices: Sequence[int] | None = None,
    cp_rank: int = 0,
    cp_size: int = 1,
    qkv_format: str = "thd",
    max_seq_len: int | None = None,
    values_from_output: Callable[[Tensor], Tensor] | None = None,
) -> MegatronLossFunc:
    """Megatron ``loss_func`` reducing a per-token pg loss with the configured aggregation.

    Args:
        factory: builds the step weights (the aggregation mode and Megatron's per-token flag).
        step: every sample of the optimizer step (all DP ranks, all micro-batches).
        num_microbatches: micro-batches per DP rank in this ``forward_backward_func`` call (the value
            the schedule divides by).
        dp_cp_size: size of Megatron's DP x CP group (``get_data_parallel_world_size(with_context_parallel=True)``).
        megatron_config: Megatron's model config (``TransformerConfig``, e.g. ``model.config``), whose
            ``calculate_per_token_loss`` must agree with the loss config (:func:`check_megatron_config`).
        sample_indices: samples of this micro-batch on this DP rank, in the order of the local values;
            ``None`` means every sample of the step.
        cp_rank, cp_size: this rank's place in the context-parallel group.
        qkv_format: ``"thd"`` or ``"bshd"``; max_seq_len: padded width, required for bshd with CP.
        values_from_output: maps the model's output tensor to this rank's 1-D per-token loss values
            (docs/cp-layout.md order); ``None`` means the output already is that tensor.

    Returns:
        ``loss_func(output_tensor) -> (loss, num_tokens, {"pg_loss": [partial * k, 1]})``, see the
        module docstring for the scaling.

    Raises:
        ValueError: for invalid sizes, CP arguments or sample indices, or a ``megatron_config`` whose
            ``calculate_per_token_loss`` disagrees with the loss config (here), or local values of the
            wrong length (when ``loss_func`` is called).
    """
    contract = _MegatronContract(factory, step, sample_indices, cp_rank, cp_size, qkv_format, max_seq_len,
                                 num_microbatches, dp_cp_size, megatron_config)

    def loss_func(output_tensor: Tensor) -> MegatronLossReturn:
        values = output_tensor if values_from_output is None else values_from_output(output_tensor)
        partial = contract.pg_reducer(values)
        return contract.megatron_return(partial, {"pg_loss": partial})

    return loss_func


def megatron_policy_loss_func(
    factory: ReducerFactory,
    step: StepBatch,
    *,
    old_logprobs: Tensor,
    advantages: Tensor,
    num_microbatches: int,
    dp_cp_size: int,
    megatron_config: Any,
    sample_indices: Sequence[int] | None = None,
    cp_rank: int = 0,
    cp_size: int = 1,
    qkv_format: str = "thd",
    max_seq_len: int | None = None,
    ref_logprobs: Tensor | None = None,
    tis_weights: Tensor | None = None,
    rs_mask: Tensor | None = None,
    logprobs_from_output: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]] | None = None,
    cp_all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> MegatronLossFunc:
    """Megatron ``loss_func`` computing the full policy loss (:func:`rl_loss.policy_loss`) of a micro-batch.

    The loss is ``pg_loss + kl_coef * kl_loss - entropy_coef * entropy`` with pg_loss in the configured
    aggregation and the other terms in sample_mean; every term is scaled for Megatron as one.

    Args:
        factory, step, num_microbatches, dp_cp_size, sample_indices, cp_rank, cp_size, qkv_format,
            max_seq_len, megatron_config: as in :func:`megatron_loss_func`.
        old_logprobs, advantages, ref_logprobs, tis_weights, rs_mask: this rank's local per-token
            inputs of :func:`rl_loss.policy_loss` (1-D, docs/cp-layout.md order).
        logprobs_from_output: maps the model's output tensor to the local log-probs, or to
            ``(logprobs, entropy)`` when the model also gives the per-token entropy; ``None`` means the
            output already is the log-prob tensor.
        cp_all_reduce: autograd-aware sum over this rank's CP group, called once per micro-batch by
            ``loss.ratio_level=sequence`` (GSPO: each sample's log-ratio sum spans the CP ranks) and required
            there when ``cp_size > 1``, e.g. ``lambda t: torch.distributed.nn.functional.all_reduce(t,
            group=parallel_state.get_context_parallel_group())``; unused by token-level ratios.

    Returns:
        ``loss_func(output_tensor) -> (loss, num_tokens, report)``; the report holds ``pg_loss``,
        ``pg_clipfrac``, ``ppo_kl`` (and ``kl_loss``, ``entropy`` when given) as ``[partial * k, 1]``.
    """
    contract = _MegatronContract(factory, step, sample_indices, cp_rank, cp_size, qkv_format, max_seq_len,
                                 num_microbatches, dp_cp_size, megatron_config)
    metric_reducer = factory.metric_reducer(step, sample_indices, cp_rank, cp_size, qkv_format, max_seq_len)

    def loss_func(output_tensor: Tensor) -> MegatronLossReturn:
        out = output_tensor if logprobs_from_output is None else logprobs_from_output(output_tensor)
        logprobs, entropy = out if isinstance(out, tuple) else (out, None)
        loss, metrics = policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            contract.pg_reducer,
            metric_reducer,
            factory.config,
            ref_logprobs=ref_logprobs,
            entropy=entropy,
            tis_weights=tis_weights,
            rs_mask=rs_mask,
            cp_all_reduce=cp_all_reduce,
        )
        return contract.megatron_return(loss, metrics)

    return loss_func


class _MegatronContract:
    """The scaling of one micro-batch's loss for megatron-core's 3-tuple ``loss_func`` contract."""

    def __init__(
        self,
        factory: ReducerFactory,
        step: StepBatch,
        sample_indices: Sequence[int] | None,
        cp_rank: int,
        cp_size: int,
        qkv_format: str,
        max_seq_len: int | None,
        num_microbatches: int,
        dp_cp_size: int,
        megatron_config: Any,
    ):
        _check_positive_int("num_microbatches", num_microbatches)
        _check_positive_int("dp_cp_size", dp_cp_size)
        check_megatron_config(factory, megatron_config)  # before any gradient: a disagreement is silent otherwise
        self.pg_reducer: TokenReducer = factory.pg_reducer(
            step, sample_indices, cp_rank, cp_size, qkv_format, max_seq_len
        )
        self.per_token = bool(factory.config.calculate_per_token_loss)
        self.report_share = float(num_microbatches * dp_cp_size)
        if self.per_token:
            # finalize_model_grads divides by the all-reduced count (= T): undo token_mean's 1 / max(T, 1).
            self.loss_scale = float(max(factory.step_weights(step).tokens, 1))
            self.num_tokens = self.pg_reducer.token_count()
        else:
            # the schedule divides by clamp(1, 1) and num_microbatches, DDP by |DP x CP|.
            self.loss_scale = self.report_share
            self.num_tokens = 1

    def megatron_return(self, loss: Tensor, partials: Mapping[str, Tensor]) -> MegatronLossReturn:
        """``(loss * scale, num_tokens, report)`` with a fresh loss tensor (the schedule divides it in place)."""
        num_tokens = torch.tensor(self.num_tokens, dtype=torch.int, device=loss.device)
        report = {name: self._report_value(value) for name, value in partials.items()}
        return loss * self.loss_scale, num_tokens, report

    def _report_value(self, partial: Tensor) -> Tensor:
        dtype = torch.promote_types(partial.dtype, torch.float32)
        one = torch.ones((), dtype=dtype, device=partial.device)
        return torch.stack([partial.detach().to(dtype) * self.report_share, one])


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
