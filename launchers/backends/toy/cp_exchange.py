"""Key/value exchanges for context-parallel attention: simulated in one process, or over torch.distributed.

A :data:`~launchers.backends.toy.model.KVExchange` maps a CP rank's local keys/values to those of the whole
sequence. :func:`run_simulated_cp` runs every rank of a CP group as a thread of one process (tests);
:func:`all_gather_kv` gathers over a real CP process group (the trainer).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from launchers.backends.toy.model import KVExchange


class _SimulatedGroup:
    """A CP group of threads: each exchange waits until every rank has posted its keys/values."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.lock = threading.Lock()
        self.slots: dict[int, list[tuple[Tensor, ...] | None]] = {}

    def exchange_for(self, rank: int) -> KVExchange:
        calls = itertools.count()  # the n-th exchange of every rank is the same layer

        def exchange(k: Tensor, v: Tensor, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            key = next(calls)
            with self.lock:
                self.slots.setdefault(key, [None] * self.size)[rank] = (k, v, positions, valid)
            self.barrier.wait()
            parts = self.slots[key]
            # Concatenate in rank order; the autograd graph spans threads, so a loss on one rank
            # back-propagates into every rank's keys/values, as all_gather's backward does.
            return (
                torch.cat([p[0] for p in parts], dim=2),
                torch.cat([p[1] for p in parts], dim=2),
                torch.cat([p[2] for p in parts], dim=1),
                torch.cat([p[3] for p in parts], dim=1),
            )

        return exchange


def run_simulated_cp(cp_size: int, fn: Callable[[int, KVExchange], Any]) -> list[Any]:
    """Run ``fn(cp_rank, kv_exchange)`` for every CP rank of a simulated group in one process.

    Ranks run in threads that meet at each attention layer, like ranks of a real CP group.
    Backward through the results (e.g. ``sum(losses).backward()``) gives the gradient a distributed
    run would after its all-gather backward.

    Returns:
        The results of ``fn`` in rank order.
    """
    group = _SimulatedGroup(cp_size)
    results: list[Any] = [None] * cp_size
    errors: list[BaseException] = []
    grad_enabled = torch.is_grad_enabled()  # grad mode is thread-local

    def worker(rank: int) -> None:
        try:
            with torch.set_grad_enabled(grad_enabled):
                results[rank] = fn(rank, group.exchange_for(rank))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            errors.append(err)
            group.barrier.abort()  # release ranks waiting for this one

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(cp_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and keeps this
    rank's slice (all_reduce + slice: works on gloo, which lacks reduce_scatter)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> tuple[Tensor, ...]:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor.contiguous(), group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=ctx.group)
        return stacked[ctx.rank], None


def all_gather_kv(group: Any = None) -> KVExchange:
    """A ``kv_exchange`` that all-gathers keys/values over a torch.distributed CP process group.

    Local slot counts may differ between ranks: each rank pads to the largest, and the padded slots
    are marked invalid. Gradients flow back to each rank's own keys/values (summed over the ranks
    whose queries used them), so every rank must run backward.

    Args:
        group: the CP process group (``None`` = the default group).
    """

    def exchange(k: Tensor, v: Tensor, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        world = dist.get_world_size(group)
        if world == 1:
            return k, v, positions, valid
        local = torch.tensor([k.shape[2]], dtype=torch.long, device=k.device)
        sizes = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(sizes, local, group=group)
        pad = int(torch.stack(sizes).max()) - k.shape[2]
        kv = F.pad(torch.stack([k, v]), (0, 0, 0, pad))  # [2, B, H, S_max, Dh]
        meta = torch.stack([positions, valid.to(torch.long)])  # [2, B, S]
        meta = F.pad(meta, (0, pad), value=0)  # padded slots: invalid
        kv_parts = _AllGather.apply(kv, group)
        meta_parts = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(meta_parts, meta.contiguous(), group=group)
        kv_all = torch.cat(kv_parts, dim=3)
        meta_all = torch.cat(meta_parts, dim=2)
        return kv_all[0], kv_all[1], meta_all[0], meta_all[1].to(torch.bool)

    return exchange
