"""Process groups for DP x CP training, from megatron-core's ``parallel_state`` (gloo on CPU, NCCL on GPU).

A plain ``python -m launchers.train`` is a world of one process and creates no process group.
Under ``torchrun`` the world is split into CP groups of ``parallel.cp_size`` consecutive ranks (as
megatron-core lays them out); the DP rank picks which samples of a step this rank trains on.

Collectives a training step issues (and why; none inside the loss reducers):
1. per micro-batch and layer, an all-gather of K/V inside the CP group (the attention of a CP rank's
   query chunks needs every earlier position of the sequence); its backward reduces the K/V
   gradients back to their owners;
2. per optimizer step, one all-reduce (sum) of the gradients over the DP x CP world: every rank's
   loss is a partial of the step objective, so the sum of their gradients is the step's gradient;
3. per optimizer step, one all-reduce (sum) of a small vector of metric partials and the stop-signal flags;
4. with ``loss.ratio_level=sequence`` (GSPO), per micro-batch one autograd-aware all-reduce (sum) over the
   CP group of each sample's partial log-ratio sum (:meth:`ParallelContext.cp_all_reduce`); its backward
   is the same all-reduce of the gradients.
Rollouts, rewards and advantages need no collective: every rank samples the same rollout from the
same seed and identical weights (the all-reduce leaves every replica bit-identical).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    """Where this process sits in the DP x CP world."""

    world_size: int = 1
    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    cp_group: Any = None
    world_group: Any = None

    @property
    def is_main(self) -> bool:
        """True on the process that writes metrics, checkpoints and the progress display."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    def cp_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over this rank's CP group, out of place and differentiable (identity without CP).

        The backward pass all-reduces the gradients the same way, so a value every CP rank uses (GSPO's
        sequence ratio) sends its gradient back to every rank's share of it.
        """
        if self.cp_size == 1:
            return tensor
        return _AllReduceSum.apply(tensor, self.cp_group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over every process, in place (no-op for a single process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.world_group)
        return tensor


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group of x; the gradient of every rank's x is the group's sum of dL/dy."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def backend_for(requested: str, device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA, unless set explicitly."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def setup(cp_size: int, backend: str, device: torch.device) -> ParallelContext:
    """Initialise torch.distributed and megatron-core's DP x CP groups when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ParallelContext()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(backend, device))
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its import logs its fallbacks at INFO
    with warnings.catch_warnings():
        # megatron-core announces its fallbacks when Transformer Engine / Apex are absent
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=cp_size
    )
    return ParallelContext(
        world_size=world_size,
        rank=dist.get_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        cp_group=parallel_state.get_context_parallel_group(),
        world_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
    )


def teardown(ctx: ParallelContext) -> None:
    """Destroy the process groups created by :func:`setup`."""
    if not ctx.distributed:
        return
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
