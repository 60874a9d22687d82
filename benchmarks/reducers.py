"""Benchmark of the loss reducers against a bare masked sum (``make bench``).

For every aggregation mode, at ~1M response tokens per micro-batch with 64 and 4096 samples, without
CP and as CP rank 0 of 2 (thd), it times forward+backward of ``pg_reducer(...)(values)`` against

- the floor, ``(values * mask).sum()`` forward+backward on the same values, and
- a per-sample Python-loop reducer of the usual Megatron-RL design (split, masked sum per sample,
  scale, stack, sum);

and, relative to the same floor, the cost of building a step's weights (``StepBatch(...)`` plus
``factory.step_weights(step)`` on a fresh step, flat mask; list-of-tensors masks too for the largest
sample count), of constructing a reducer per micro-batch, and of construction plus first call (cold:
includes the float32 cast of the weights). Allocator peaks are reported in bytes per token.

Method: torch threads as the process has them (``--threads`` to change); warm-up; the runs compared are
interleaved pair by pair; each figure is the median of the per-pair ratios (absolute times: medians in
ms), with the ratio of the 10th percentiles as a cross-check for busy machines. Run it with
``make bench`` (glibc then keeps freed memory in the heap, so no run pays for fresh pages).

Usage: ``python -m benchmarks.reducers [--quick] [--tokens N] [--repeats K] [--samples 64,4096]
[--cp-sizes 1,2] [--modes ...] [--sections reducer,cold,build] [--threads T] [--json PATH] [--profile]
[--strict]``
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks._cli import FullRun, add_common_arguments, finish_common_arguments, run_benchmark
from benchmarks._harness import (
    MEMORY_METHOD,
    Comparison,
    MemoryPeak,
    compare,
    load_average,
    machine_facts,
    memory_peak,
    profile_table,
)
from benchmarks._workload import LocalLayout, LoopReducer, Workload, local_layout, make_workload, sample_scales
from rl_loss import AGGREGATIONS, LossConfig, ReducerFactory, StepBatch

REDUCER_TARGET = 1.2  # reducer fwd+bwd / floor fwd+bwd, every mode
BUILD_TARGET = 10.0  # step weights build / floor fwd+bwd
SECTIONS = ("reducer", "cold", "build")
FULL_RUN = FullRun(repeats=200, warmup=5)


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reducers", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, FULL_RUN)
    parser.add_argument("--modes", type=_csv, default=list(AGGREGATIONS), help="aggregation modes (default all)")
    parser.add_argument("--sections", type=_csv, default=list(SECTIONS), help="reducer,cold,build (default all)")
    parser.add_argument("--profile", action="store_true", help="append per-op profiles of a build and a construction")
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode not in AGGREGATIONS:
            parser.error(f"--modes: unknown aggregation {mode!r} (choose from {', '.join(AGGREGATIONS)})")
    for section in args.sections:
        if section not in SECTIONS:
            parser.error(f"--sections: unknown section {section!r} (choose from {', '.join(SECTIONS)})")
    finish_common_arguments(parser, args, FULL_RUN)
    return args


def _factory(mode: str, work: Workload) -> ReducerFactory:
    return ReducerFactory(LossConfig(aggregation=mode, divisor=work.divisor if mode == "constant" else None))


def _new_step(work: Workload, masks: str, mode: str) -> StepBatch:
    # the trajectory ids only where they are used, so the other modes time what their callers pass
    return StepBatch(
        response_lengths=work.response_lengths,
        total_lengths=work.total_lengths,
        loss_masks=work.mask_flat if masks == "flat" else work.mask_list,
        group_index=work.group_index,
        trajectory_index=work.trajectory_index if mode == "trajectory_mean" else None,
    )


def _fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    """One training-loop use: forward through ``loss_fn``, backward into a fresh ``x.grad``."""

    def run() -> None:
        x.grad = None
        loss_fn(x).backward()

    return run


def _memory(fn: Callable[[], object], x: torch.Tensor | None = None) -> MemoryPeak | None:
    if x is not None:
        x.grad = None  # freed before the region, so the region sees only its own allocations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memory_peak(fn)


def _bytes_per_token(peak: MemoryPeak | None, tokens: int) -> dict[str, float | None]:
    if peak is None:
        return {"peak": None, "allocated": None}
    return {"peak": peak.peak_bytes / max(tokens, 1), "allocated": peak.allocated_bytes / max(tokens, 1)}


def _agree(reducer: Callable, loop: LoopReducer, x: torch.Tensor) -> tuple[bool, float]:
    """Does the library reducer give the loop's value and gradient (float32 tolerance)?"""
    outs = []
    for fn in (reducer, loop):
        x.grad = None
        value = fn(x)
        value.backward()
        outs.append((float(value.detach()), x.grad.clone()))
    x.grad = None
    (a, grad_a), (b, grad_b) = outs
    # relative to sum |w x| (weights are >= 0): x has both signs, so the objective itself can nearly cancel
    size = float(loop(x.detach().abs()))
    rel = abs(a - b) / max(size, 1e-30)
    return rel <= 1e-4 and torch.allclose(grad_a, grad_b, rtol=1e-4, atol=1e-12), rel


def run(args: argparse.Namespace, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every comparison of the suite; returns the results as plain data."""
    timing = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "min_pairs": args.min_pairs,
    }

    def cmp(floor: Callable[[], object], cand: Callable[[], object]) -> dict[str, float]:
        result: Comparison = compare(floor, cand, **timing)
        return result.as_dict()

    def say(text: str) -> None:
        if log is not None:
            log(f"[{time.perf_counter() - started:5.0f}s] {text}")

    results: dict[str, Any] = {
        "machine": machine_facts(),
        "settings": {
            "tokens": args.tokens,
            "samples": args.samples,
            "cp_sizes": args.cp_sizes,
            "modes": args.modes,
            "sections": args.sections,
            "quick": args.quick,
            "seed": args.seed,
            **timing,
        },
        "memory_method": MEMORY_METHOD,
        "reducer": [],
        "cold": [],
        "build": [],
        "profiles": {},
    }
    gen = torch.Generator().manual_seed(args.seed)
    largest = max(args.samples)
    started = time.perf_counter()
    for num_samples in args.samples:
        work = make_workload(args.tokens, num_samples, seed=args.seed)
        full_x = torch.randn(work.tokens, generator=gen).requires_grad_()
        full_floor = _fwd_bwd(lambda v, m=work.mask_flat: (v * m).sum(), full_x)
        microbatch = list(range(num_samples))
        layouts: dict[int, LocalLayout] = {cp: local_layout(work, 0, cp) for cp in args.cp_sizes}
        values = {cp: torch.randn(layouts[cp].tokens, generator=gen).requires_grad_() for cp in args.cp_sizes}

        for mode in args.modes:
            factory = _factory(mode, work)
            if "build" in args.sections:
                say(f"N={num_samples} {mode}: step weights build")
                floor_peak = _memory(lambda x=full_x, m=work.mask_flat: (x * m).sum().backward(), full_x)
                for masks in ["flat", "list"] if num_samples == largest else ["flat"]:

                    def build(masks=masks, factory=factory, work=work, mode=mode) -> object:
                        return factory.step_weights(_new_step(work, masks, mode))

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        timed = cmp(full_floor, build)
                    results["build"].append(
                        {
                            "mode": mode,
                            "samples": num_samples,
                            "masks": masks,
                            "tokens": work.tokens,
                            "time": timed,
                            "bytes_per_token": _bytes_per_token(_memory(build), work.tokens),
                            "floor_bytes_per_token": _bytes_per_token(floor_peak, work.tokens),
                            "pass": timed["ratio"] <= BUILD_TARGET,
                        }
                    )
                if args.profile and num_samples == largest:
                    results["profiles"][f"step weights build, {mode}, N={num_samples}, flat mask"] = profile_table(
                        lambda factory=factory, work=work, mode=mode: factory.step_weights(_new_step(work, "flat", mode))
                    )
            if "reducer" not in args.sections and "cold" not in args.sections:
                continue

            step = _new_step(work, "flat", mode)
            factory.step_weights(step)  # built once per step and cached on it; reducers slice it
            scales = sample_scales(work, mode)
            for cp in args.cp_sizes:
                layout, x = layouts[cp], values[cp]
                floor = _fwd_bwd(lambda v, m=layout.mask: (v * m).sum(), x)
                floor_peak = _memory(lambda m=layout.mask, x=x: (x * m).sum().backward(), x)
                row = {"mode": mode, "samples": num_samples, "cp": cp, "local_tokens": layout.tokens}

                def make(
                    cp=cp, factory=factory, step=step, samples=microbatch
                ) -> Callable[[torch.Tensor], torch.Tensor]:
                    return factory.pg_reducer(step, sample_indices=samples, cp_rank=0, cp_size=cp)

                if "reducer" in args.sections:
                    say(f"N={num_samples} {mode} cp={cp}: reducer and loop fwd+bwd")
                    reducer = make()
                    if reducer.num_local_tokens != layout.tokens:
                        raise RuntimeError(
                            f"{mode} N={num_samples} cp={cp}: the reducer expects {reducer.num_local_tokens} local "
                            f"values; the layout of docs/cp-layout.md gives {layout.tokens}"
                        )
                    loop = LoopReducer(layout, scales)
                    agree, rel = _agree(reducer, loop, x)
                    results["reducer"].append(
                        {
                            **row,
                            "reducer": cmp(floor, _fwd_bwd(reducer, x)),
                            "loop": cmp(floor, _fwd_bwd(loop, x)),
                            "agree_with_loop": agree,
                            "rel_diff_vs_loop": rel,
                            "floor_bytes_per_token": _bytes_per_token(floor_peak, layout.tokens),
                            "reducer_bytes_per_token": _bytes_per_token(
                                _memory(lambda r=reducer, x=x: r(x).backward(), x), layout.tokens
                            ),
                            "loop_bytes_per_token": _bytes_per_token(
                                _memory(lambda loop=loop, x=x: loop(x).backward(), x), layout.tokens
                            ),
                        }
                    )
                    results["reducer"][-1]["pass"] = results["reducer"][-1]["reducer"]["ratio"] <= REDUCER_TARGET
                if "cold" in args.sections:
                    say(f"N={num_samples} {mode} cp={cp}: reducer construction and cold call")

                    def cold(make=make, x=x) -> None:
                        x.grad = None
                        make()(x).backward()

                    def make_all(factory=factory, step=step) -> object:
                        return factory.pg_reducer(step)

                    results["cold"].append(
                        {
                            **row,
                            "construct": cmp(floor, make),
                            "construct_all": cmp(floor, make_all) if cp == 1 else None,
                            "cold": cmp(floor, cold),
                            "construct_bytes_per_token": _bytes_per_token(_memory(make), layout.tokens),
                            "cold_bytes_per_token": _bytes_per_token(
                                _memory(lambda make=make, x=x: make()(x).backward(), x), layout.tokens
                            ),
                        }
                    )
                    if args.profile and num_samples == largest and cp == max(args.cp_sizes):
                        results["profiles"][f"reducer construction, {mode}, N={num_samples}, cp={cp}"] = profile_table(
                            make
                        )
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["loadavg_at_end"] = load_average()
    _flag_unreliable(results)
    results["targets"] = _targets(results)
    return results


STALL_FACTOR = 4.0  # a floor median this many times the run's fastest floor of that size means stalled runs


def _flag_unreliable(results: dict[str, Any]) -> None:
    """Mark comparisons whose floor runs were mostly stalled by outside work (``unreliable``).

    The sign: a floor median far above the fastest floor of the same size in the whole run. (Floors next
    to a heavy candidate run up to ~2-3x slower from cache misses alone, and the order flips every pair,
    so the floor's own spread is no sign; stalls on a busy machine are ~10-100x.)
    """
    tagged: list[tuple[int, dict[str, Any]]] = []
    for r in results["reducer"]:
        tagged += [(r["local_tokens"], r["reducer"]), (r["local_tokens"], r["loop"])]
    for r in results["cold"]:
        tagged += [(r["local_tokens"], c) for c in (r["construct"], r["construct_all"], r["cold"]) if c is not None]
    tagged += [(r["tokens"], r["time"]) for r in results["build"]]
    fastest: dict[int, float] = {}
    for tokens, c in tagged:
        fastest[tokens] = min(fastest.get(tokens, float("inf")), c["floor_p10_ms"])
    for tokens, c in tagged:
        c["unreliable"] = c["floor_ms"] > STALL_FACTOR * fastest[tokens]


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    checks = (
        ("reducer", f"reducer fwd+bwd <= {REDUCER_TARGET:g}x floor", lambda r: r["reducer"], "cp"),
        ("build", f"step weights build <= {BUILD_TARGET:g}x floor", lambda r: r["time"], "masks"),
    )
    for section, label, timed, where in checks:
        # the build is judged per mask layout: one flat mask is the vectorized path; a list of per-sample
        # masks adds the caller's per-sample concatenation, reported on its own line
        kinds = [(m, r.get("masks")) for r in results[section] for m in [r["mode"]]]
        for mode, masks in dict.fromkeys(kinds if section == "build" else [(m, None) for m, _ in kinds]):
            rows = [r for r in results[section] if r["mode"] == mode and (section != "build" or r["masks"] == masks)]
            worst = max(rows, key=lambda r: timed(r)["ratio"])
            suffix = f" ({masks} masks)" if section == "build" else ""
            out.append(
                {
                    "target": f"{mode}: {label}{suffix}",
                    "worst": timed(worst)["ratio"],
                    "worst_p10": timed(worst)["ratio_p10"],
                    "unreliable": any(timed(r)["unreliable"] for r in rows),
                    "where": f"N={worst['samples']} {where}={worst[where]}",
                    "pass": all(r["pass"] for r in rows),
                }
            )
    return out


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(c: dict[str, float] | None, digits: int = 2) -> str:
    """``median [q1-q3] (p10 ratio)`` of a comparison."""
    if c is None:
        return "-"
    mark = " †" if c.get("unreliable") else ""
    return (
        f"{c['ratio']:.{digits}f} [{c['ratio_q1']:.{digits}f}-{c['ratio_q3']:.{digits}f}] ({c['ratio_p10']:.{digits}f})"
        + mark
    )


def _bpt(*entries: dict[str, float | None]) -> str:
    return " / ".join(_f(e["peak"], 1) for e in entries)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    """The results as markdown."""
    m, s = results["machine"], results["settings"]
    out = [
        "# rl_loss reducer benchmark",
        "",
        f"torch {m['torch']}, python {m['python']}, {m['cpu_model'] or 'cpu'}: {m['cpu_count']} CPUs "
        f"({m['cpus_usable']} usable), torch threads {m['torch_threads']} (interop {m['torch_interop_threads']}); "
        f"load average {m['loadavg_at_start']} at start, {m.get('loadavg_at_end')} at end; "
        f"OMP_NUM_THREADS={m['OMP_NUM_THREADS']} OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']} "
        f"MALLOC_MMAP_THRESHOLD_={m['MALLOC_MMAP_THRESHOLD_']} MALLOC_TRIM_THRESHOLD_={m['MALLOC_TRIM_THRESHOLD_']}.",
        "",
        f"{s['tokens']} response tokens per step; samples {s['samples']}; CP sizes {s['cp_sizes']} (the reducer of "
        f"CP rank 0, thd). Per comparison up to {s['repeats']} interleaved pairs (at least {s['min_pairs']}, about "
        f"{s['max_seconds']:g}s at most) after {s['warmup']} warm-up pairs. Ratios: median of the per-pair "
        "candidate/floor [quartiles] (ratio of the 10th percentiles); ms: median of one run. "
        "Floor: `(x * mask).sum()` forward+backward on the same values.",
        "",
    ]
    if m["MALLOC_MMAP_THRESHOLD_"] is None:
        out += ["**Note:** not run through `make bench` (MALLOC_* thresholds unset): fresh pages are timed too.", ""]
    loads = [x for x in (m["loadavg_at_start"], m.get("loadavg_at_end")) if x]
    rows_all = [c for r in results["reducer"] for c in (r["reducer"], r["loop"])]
    rows_all += [r["time"] for r in results["build"]]
    rows_all += [c for r in results["cold"] for c in (r["construct"], r["cold"])]
    unreliable = sum(bool(c.get("unreliable")) for c in rows_all)
    if loads and max(x[0] for x in loads) >= 0.75 * (m["cpus_usable"] or 1) or unreliable:
        out += [
            f"**Note: busy machine** (1-min load up to {max((x[0] for x in loads), default=0)} on "
            f"{m['cpus_usable']} CPUs; {unreliable} of {len(rows_all)} comparisons marked †): runs wait for the CPU, "
            "and with more torch threads than free CPUs the OpenMP workers also spin after each parallel region and "
            "take the CPU from the main thread, so ops stall for whole scheduler slices. † marks a comparison whose "
            f"floor median is over {STALL_FACTOR:g}x the run's fastest floor of that size: its ratios compare "
            "delays, not code. Rerun on a quiet machine, with `--threads 1` or with `OMP_WAIT_POLICY=PASSIVE`.",
            "",
        ]
    if results["reducer"]:
        out += ["## Reducer forward+backward (one reducer per micro-batch, reused)", ""]
        rows = [
            [
                r["mode"],
                str(r["samples"]),
                str(r["cp"]),
                str(r["local_tokens"]),
                _f(r["reducer"]["floor_ms"], 3),
                _f(r["reducer"]["candidate_ms"], 3),
                _ratio(r["reducer"]),
                "PASS" if r["pass"] else "FAIL",
                _f(r["loop"]["candidate_ms"], 2),
                _ratio(r["loop"], 1),
                "yes" if r["agree_with_loop"] else f"NO ({r['rel_diff_vs_loop']:.1e})",
                _bpt(r["floor_bytes_per_token"], r["reducer_bytes_per_token"], r["loop_bytes_per_token"]),
            ]
            for r in results["reducer"]
        ]
        out += [
            _table(
                [
                    "mode",
                    "N",
                    "cp",
                    "local tokens",
                    "floor ms",
                    "reducer ms",
                    "reducer/floor",
                    f"<= {REDUCER_TARGET:g}x",
                    "loop ms",
                    "loop/floor",
                    "= loop",
                    "peak B/token floor / reducer / loop",
                ],
                rows,
            ),
            "",
        ]
    if results["cold"]:
        out += [
            "## Reducer construction per micro-batch (step weights cached on the step), and the cold call",
            "",
            "construct: `pg_reducer(step, sample_indices=[0..N), cp_rank=0, cp_size)`; all: `pg_reducer(step)` "
            "(sample_indices=None, cp 1 only); cold: construct + first forward+backward (includes the float32 cast).",
            "",
        ]
        rows = [
            [
                r["mode"],
                str(r["samples"]),
                str(r["cp"]),
                _f(r["construct"]["floor_ms"], 3),
                _f(r["construct"]["candidate_ms"], 3),
                _ratio(r["construct"], 1),
                "-" if r["construct_all"] is None else _ratio(r["construct_all"], 1),
                _f(r["cold"]["candidate_ms"], 3),
                _ratio(r["cold"], 1),
                _bpt(r["construct_bytes_per_token"], r["cold_bytes_per_token"]),
            ]
            for r in results["cold"]
        ]
        out += [
            _table(
                [
                    "mode",
                    "N",
                    "cp",
                    "floor ms",
                    "construct ms",
                    "construct/floor",
                    "all/floor",
                    "cold ms",
                    "cold/floor",
                    "peak B/token construct / cold",
                ],
                rows,
            ),
            "",
        ]
    if results["build"]:
        out += ["## Step weights build (`StepBatch(...)` + `factory.step_weights(step)`, fresh step, no cache)", ""]
        rows = [
            [
                r["mode"],
                str(r["samples"]),
                r["masks"],
                str(r["tokens"]),
                _f(r["time"]["floor_ms"], 3),
                _f(r["time"]["candidate_ms"], 2),
                _ratio(r["time"], 1),
                "PASS" if r["pass"] else "FAIL",
                f"{_f(r['bytes_per_token']['peak'], 1)} ({_f(r['bytes_per_token']['allocated'], 1)})",
                _f(r["floor_bytes_per_token"]["peak"], 1),
            ]
            for r in results["build"]
        ]
        out += [
            _table(
                [
                    "mode",
                    "N",
                    "masks",
                    "tokens",
                    "floor ms",
                    "build ms",
                    "build/floor",
                    f"<= {BUILD_TARGET:g}x",
                    "peak B/token (allocated)",
                    "floor peak B/token",
                ],
                rows,
            ),
            "",
        ]
    if results["targets"]:
        out += ["## Targets", ""]
        if s["tokens"] < 1 << 18:
            out += [
                f"(Only {s['tokens']} tokens: fixed per-call costs dominate, so these targets, set for ~1M tokens, "
                "say little here.)",
                "",
            ]
        out += [
            _table(
                ["target", "worst ratio (p10 ratio)", "where", "result"],
                [
                    [
                        t["target"],
                        f"{t['worst']:.2f} ({t['worst_p10']:.2f})" + (" †" if t["unreliable"] else ""),
                        t["where"],
                        "PASS" if t["pass"] else "FAIL",
                    ]
                    for t in results["targets"]
                ],
            ),
            "",
        ]
    out += [
        f"Memory: {results['memory_method']}. Bytes per token are over the values a call reduces (a rank's local "
        "tokens for reducers, the step's tokens for the build); a forward+backward includes the float32 gradient of "
        "the values (4 B/token) that any reducer produces.",
        "",
        f"Elapsed {results['elapsed_s']:.0f}s.",
    ]
    for name, table in results["profiles"].items():
        out += ["", f"### Profile: {name}", "", "```", table.rstrip(), "```"]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run, render, passed=lambda results: all(t["pass"] for t in results["targets"]))


if __name__ == "__main__":
    raise SystemExit(main())
