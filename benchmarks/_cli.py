"""The command line every comparison benchmark shares (``benchmarks.reducers``, ``benchmarks.surrogates``).

The common options (quick mode, tokens, repeats, samples, CP sizes, time cap, seed, threads, JSON output,
strict targets) with their checks and quick-mode defaults, and the ``main`` around a benchmark's
``run`` and ``render``. A benchmark adds its own options to the same parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Results = dict[str, Any]


@dataclass(frozen=True)
class FullRun:
    """Interleaved pairs and warm-up pairs of a full run (``--quick``: 5 and 1)."""

    repeats: int
    warmup: int


def csv_ints(text: str) -> list[int]:
    """``"64,4096"`` -> ``[64, 4096]`` (an argparse type)."""
    return [int(v) for v in text.split(",") if v.strip()]


def add_common_arguments(parser: argparse.ArgumentParser, full: FullRun) -> None:
    """--quick, --tokens, --repeats, --samples, --cp-sizes, --max-seconds, --seed, --threads, --json, --strict."""
    add = parser.add_argument
    add("--quick", action="store_true", help="short run on small sizes (smoke test)")
    add("--tokens", type=int, default=None, help="response tokens per step (default 2**20; quick 2048)")
    add("--repeats", type=int, default=None, help=f"interleaved pairs per comparison (default {full.repeats}; quick 5)")
    add("--samples", type=csv_ints, default=None, help="sample counts (default 64,4096; quick 4,16)")
    add("--cp-sizes", type=csv_ints, default=[1, 2], help="CP sizes, reducer of rank 0 (default 1,2)")
    add("--max-seconds", type=float, default=None, help="time cap per comparison (default 4; quick 0.05)")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=None, help="torch threads for the run (default: as the process has)")
    add("--json", metavar="PATH", default=None, help="also write every figure as JSON")
    add("--strict", action="store_true", help="exit 1 when a target fails")


def finish_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, full: FullRun) -> None:
    """Reject bad common options (``parser.error``) and fill in the defaults: quick ones under ``--quick``."""
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if any(cp < 1 for cp in args.cp_sizes):
        parser.error("--cp-sizes must be >= 1")
    quick = args.quick
    args.tokens = args.tokens or (2048 if quick else 1 << 20)
    args.repeats = args.repeats or (5 if quick else full.repeats)
    args.samples = args.samples or ([4, 16] if quick else [64, 4096])
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (0.05 if quick else 4.0)
    args.warmup = 1 if quick else full.warmup
    args.min_pairs = 3 if quick else 15
    if any(n < 1 or n > args.tokens for n in args.samples):
        parser.error(f"--samples must be between 1 and --tokens={args.tokens}")


def run_benchmark(
    args: argparse.Namespace,
    run: Callable[..., Results],
    render: Callable[[Results], str],
    passed: Callable[[Results], bool],
) -> int:
    """Run under ``--threads``, print the markdown, write ``--json``; 1 under ``--strict`` when a target fails."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        results = run(args, log=lambda text: print(text, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)  # the smoke tests run inside a pytest process
    sys.stdout.write(render(results))
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return 1 if args.strict and not passed(results) else 0
