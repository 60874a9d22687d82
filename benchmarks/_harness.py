"""Measurement helpers of the benchmark suite: interleaved timing and allocator peaks.

Timing: the runs compared are interleaved (floor, candidate, candidate, floor, ... the order flipping
every pair so neither side always runs on a warm cache), and a comparison is summarised by the median
of the per-pair ratios. On a shared machine a burst of outside load hits both runs of a pair, so the
per-pair ratio is far steadier than the ratio of two separately taken medians.

Memory: ``tracemalloc`` does not see torch's allocations, and the peak RSS is useless with the
``MALLOC_*_THRESHOLD_`` settings of ``make bench`` (freed memory stays in the heap). What works is the
profiler of torch with ``profile_memory=True``: every allocation and free through c10's CPU allocator is
recorded with the running total of allocated bytes, so the peak over a region is exact.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

Fn = Callable[[], object]


@dataclass
class Comparison:
    """Interleaved timing of a candidate against the floor.

    Attributes:
        floor_ms, candidate_ms: median wall time of one run (milliseconds).
        ratio: median over the pairs of ``candidate / floor`` (the figure the targets are checked on).
        ratio_q1, ratio_q3: quartiles of the per-pair ratios (spread of the measurement).
        pairs: pairs measured.
        floor_p10_ms, candidate_p10_ms: 10th percentiles, the runs that no outside work delayed.
        ratio_p10: ``candidate_p10_ms / floor_p10_ms``, a cross-check that holds up when most runs of a
            busy machine are delayed (then the per-pair medians compare delays, not the code).
        delayed: share of the floor runs slower than twice the floor's 10th percentile (with a heavy
            candidate about half are, from cache misses after it; near 1 when outside work delays them).
    """

    floor_ms: float
    candidate_ms: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    pairs: int
    floor_p10_ms: float
    candidate_p10_ms: float
    ratio_p10: float
    delayed: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _once(fn: Fn, clock: Callable[[], int] = time.perf_counter_ns) -> float:
    start = clock()
    fn()
    return (clock() - start) / 1e6


def compare(floor: Fn, candidate: Fn, *, repeats: int, warmup: int, max_seconds: float, min_pairs: int,
            clock: Callable[[], int] = time.perf_counter_ns) -> Comparison:
    """Time ``candidate`` against ``floor``, interleaved, for ``repeats`` pairs.

    Stops early once ``min_pairs`` pairs are measured and ``max_seconds`` have passed (a slow
    candidate, e.g. a Python loop over 4096 samples). The garbage collector is off while timing.
    ``clock`` (nanoseconds) is wall time by default; ``time.thread_time_ns`` counts only this thread's
    CPU time, which other processes on a busy machine do not inflate (single-threaded work only).
    """
    for _ in range(warmup):
        floor()
        candidate()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    floor_ms: list[float] = []
    cand_ms: list[float] = []
    try:
        deadline = time.perf_counter() + max_seconds
        for i in range(max(repeats, 1)):
            if i % 2 == 0:
                f = _once(floor, clock)
                c = _once(candidate, clock)
            else:
                c = _once(candidate, clock)
                f = _once(floor, clock)
            floor_ms.append(f)
            cand_ms.append(c)
            if i + 1 >= min_pairs and time.perf_counter() > deadline:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    ratios = sorted(c / max(f, 1e-9) for f, c in zip(floor_ms, cand_ms, strict=True))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
    floor_p10, cand_p10 = _p10(floor_ms), _p10(cand_ms)
    return Comparison(
        floor_ms=statistics.median(floor_ms),
        candidate_ms=statistics.median(cand_ms),
        ratio=statistics.median(ratios),
        ratio_q1=q1,
        ratio_q3=q3,
        pairs=len(ratios),
        floor_p10_ms=floor_p10,
        candidate_p10_ms=cand_p10,
        ratio_p10=cand_p10 / max(floor_p10, 1e-9),
        delayed=sum(f > 2 * floor_p10 for f in floor_ms) / len(floor_ms),
    )


def _p10(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[(len(ordered) - 1) // 10]


@dataclass
class MemoryPeak:
    """Allocations through torch's CPU allocator while one region ran.

    Attributes:
        peak_bytes: highest live total above the level at the start of the region.
        allocated_bytes: sum of every allocation in the region (freed or not).
        end_bytes: live total at the end, above the start (e.g. a ``.grad`` that stays).
    """

    peak_bytes: int
    allocated_bytes: int
    end_bytes: int


MEMORY_METHOD = (
    "torch.profiler.profile(profile_memory=True): allocation events of c10's CPU allocator with their "
    "running total (experimental_event_tree); peak = max running total - total at region start"
)


def memory_peak(fn: Fn) -> MemoryPeak | None:
    """Peak of torch CPU-allocator bytes while ``fn`` runs; ``None`` if the profiler cannot say.

    Tensors that exist before the region and are freed inside it count as negative, so set e.g.
    ``x.grad = None`` before calling this, not inside ``fn``.
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - private API moved
        return None
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except Exception:  # pragma: no cover - private API changed
        return None
    events: list[tuple[int, int, int]] = []
    stack = list(tree)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, int(fields.alloc_size), int(fields.total_allocated)))
        stack.extend(node.children)
    if not events:
        return MemoryPeak(0, 0, 0)
    events.sort()
    base = events[0][2] - events[0][1]
    return MemoryPeak(
        peak_bytes=max(0, max(total for _, _, total in events) - base),
        allocated_bytes=sum(size for _, size, _ in events if size > 0),
        end_bytes=events[-1][2] - base,
    )


def profile_table(fn: Fn, repeats: int = 5, rows: int = 15) -> str:
    """The profiler's per-op table (self CPU time) of ``repeats`` runs of ``fn``, for investigation."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on a shared machine shows here)."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        return None


def machine_facts() -> dict[str, object]:
    """Cores, threads, versions and allocator settings the figures were taken under."""
    import os
    import platform

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_at_start": load_average(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
    }
