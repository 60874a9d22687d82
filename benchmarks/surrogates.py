"""Benchmark of the surrogates against ppo_clip (``make bench``): per-token loss + reduction, forward+backward.

For each surrogate (cispo, sapo, gmpo, dppo_tv, dppo_kl, vespo) and for GSPO's and GSPO-token's sequence
ratios (ppo_clip with ``ratio_level=sequence`` / ``sequence_token``), at 2^20 response tokens with 64 and 4096 samples, without CP and as CP rank 0 of 2 (thd; the CP all-reduce
of the per-sequence reductions is the identity in one process), it times

    loss = pg_reducer(per_token_pg_loss(config, logp, logp_old, A, pg_reducer, cp_all_reduce)); loss.backward()

against the same with ``surrogate=ppo_clip, ratio_level=token`` on the same float32 values and the same
sample_mean weights. Two settings: the reducer built once and reused (the loss and reduction alone), and
a fresh reducer per call (what a training loop pays per micro-batch, including the first-call per-sample
index of the per-sequence reductions). Target: GSPO, GSPO-token and the 2026 surrogates (gmpo, dppo_tv,
dppo_kl, vespo; their per-sequence reductions included) each <= 1.5x ppo_clip.

Method as in :mod:`benchmarks.reducers`: warm-up, interleaved pairs, medians of per-pair ratios (10th
percentile ratio as a cross-check on a busy machine); run with ``make bench`` for the allocator settings.

Usage: ``python -m benchmarks.surrogates [--quick] [--tokens N] [--repeats K] [--samples 64,4096]
[--cp-sizes 1,2] [--threads T] [--json PATH] [--strict]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks._cli import FullRun, add_common_arguments, finish_common_arguments, run_benchmark
from benchmarks._harness import compare, load_average, machine_facts
from benchmarks._workload import make_workload
from rl_loss import LossConfig, ReducerFactory, StepBatch
from rl_loss.surrogates import per_token_pg_loss

SEQUENCE_TARGET = 1.5  # each targeted variant's fwd+bwd / ppo_clip fwd+bwd
FULL_RUN = FullRun(repeats=60, warmup=3)
VARIANTS: dict[str, dict[str, Any]] = {
    "ppo_clip": {},
    "cispo": {"surrogate": "cispo"},
    "sapo": {"surrogate": "sapo"},
    "sequence": {"ratio_level": "sequence"},
    "sequence_token": {"ratio_level": "sequence_token"},
    "gmpo": {"surrogate": "gmpo"},
    "dppo_tv": {"surrogate": "dppo_tv"},
    "dppo_kl": {"surrogate": "dppo_kl"},
    "vespo": {"surrogate": "vespo"},
}
TARGETED = ("sequence", "sequence_token", "gmpo", "dppo_tv", "dppo_kl", "vespo")
"""Variants held to SEQUENCE_TARGET (cispo and sapo are reported only)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.surrogates", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, FULL_RUN)
    args = parser.parse_args(argv)
    finish_common_arguments(parser, args, FULL_RUN)
    return args


def _loss_fn(
    config: LossConfig, make_reducer: Callable[[], Any], logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
    fresh: bool,
) -> Callable[[], None]:
    """One forward+backward of the per-token loss and its reduction (the reducer reused, or built per call)."""
    reused = make_reducer()

    def run() -> None:
        logp.grad = None
        reducer = make_reducer() if fresh else reused
        per_token, _ = per_token_pg_loss(config, logp, old, adv, reducer, cp_all_reduce=lambda t: t)
        reducer(per_token).backward()

    return run


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    timing = dict(repeats=args.repeats, warmup=args.warmup, max_seconds=args.max_seconds, min_pairs=args.min_pairs)
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "settings": {"tokens": args.tokens, "samples": args.samples, "cp_sizes": args.cp_sizes, **timing},
        "rows": [],
    }
    gen = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for num_samples in args.samples:
        work = make_workload(args.tokens, num_samples, seed=args.seed)
        step = StepBatch(response_lengths=work.response_lengths, total_lengths=work.total_lengths,
                         loss_masks=work.mask_flat, group_index=work.group_index)
        factories = {name: ReducerFactory(LossConfig(**fields)) for name, fields in VARIANTS.items()}
        for cp in args.cp_sizes:
            layout = dict(sample_indices=list(range(num_samples)), cp_rank=0, cp_size=cp)
            n = factories["ppo_clip"].pg_reducer(step, **layout).num_local_tokens
            old = -0.1 - 3.0 * torch.rand(n, generator=gen)
            logp = (old + 0.4 * torch.rand(n, generator=gen) - 0.2).requires_grad_()
            adv = torch.randn(n, generator=gen)
            for fresh in (False, True):
                fns = {
                    name: _loss_fn(f.config, lambda f=f, step=step, layout=layout: f.pg_reducer(step, **layout), logp, old, adv, fresh)
                    for name, f in factories.items()
                }
                for name in (v for v in VARIANTS if v != "ppo_clip"):
                    log(f"N={num_samples} cp={cp} {'fresh' if fresh else 'reused'} reducer: {name} vs ppo_clip")
                    timed = compare(fns["ppo_clip"], fns[name], **timing).as_dict()
                    results["rows"].append({"variant": name, "samples": num_samples, "cp": cp, "local_tokens": n,
                                            "reducer": "per call" if fresh else "reused", "time": timed})
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["loadavg_at_end"] = load_average()
    targeted = [r for r in results["rows"] if r["variant"] in TARGETED]
    worst = max(targeted, key=lambda r: r["time"]["ratio"])
    results["target"] = {
        "target": f"{', '.join(TARGETED)} fwd+bwd each <= {SEQUENCE_TARGET:g}x ppo_clip",
        "worst": worst["time"]["ratio"],
        "worst_p10": worst["time"]["ratio_p10"],
        "where": f"{worst['variant']} N={worst['samples']} cp={worst['cp']} reducer {worst['reducer']}",
        "pass": all(r["time"]["ratio"] <= SEQUENCE_TARGET for r in targeted),
    }
    return results


def _cell(c: dict[str, float]) -> str:
    return f"{c['ratio']:.2f} [{c['ratio_q1']:.2f}-{c['ratio_q3']:.2f}] ({c['ratio_p10']:.2f})"


def render(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    out = [
        "# Surrogate benchmark: per-token loss + reduction, forward+backward, against ppo_clip",
        "",
        f"{s['tokens']} response tokens, float32, sample_mean weights; torch {m['torch']}, torch threads "
        f"{m['torch_threads']}, {m['cpus_usable']} usable CPUs ({m['cpu_model']}), load {m['loadavg_at_start']} -> "
        f"{m['loadavg_at_end']}; {s['repeats']} interleaved pairs at most per comparison.",
        "",
        "ratio: median of per-pair candidate / ppo_clip [quartiles] (ratio of 10th percentiles).",
        "",
        "| variant | N | cp | local tokens | reducer | ppo_clip ms | variant ms | variant / ppo_clip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        t = r["time"]
        out.append(f"| {r['variant']} | {r['samples']} | {r['cp']} | {r['local_tokens']} | {r['reducer']} | "
                   f"{t['floor_ms']:.2f} | {t['candidate_ms']:.2f} | {_cell(t)} |")
    t = results["target"]
    out += [
        "",
        "| target | worst ratio (p10 ratio) | where | result |",
        "|---|---|---|---|",
        f"| {t['target']} | {t['worst']:.2f} ({t['worst_p10']:.2f}) | {t['where']} | {'PASS' if t['pass'] else 'FAIL'} |",
        "",
        f"Elapsed {results['elapsed_s']:.0f}s.",
    ]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run, render, passed=lambda results: results["target"]["pass"])


if __name__ == "__main__":
    raise SystemExit(main())
