"""End-to-end throughput of the default training step (``make bench`` runs it after the reducers).

Builds the trainer of ``python -m launchers.train`` on its default config (or overrides given on the
command line), then alternates: prepare a rollout (sample, score, advantages, old log-probs) and take
the optimizer steps on it. Reports response tokens per second of the training step alone and of
rollout + training, as medians over the measured rollouts after a warm-up.

Usage: ``python -m benchmarks.train_step [--rollouts K] [--warmup W] [OVERRIDE ...]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from launchers.backends.toy.distributed import ParallelContext
from launchers.backends.toy.trainer import Trainer, resolve_device
from launchers.config.preflight import compose_job
from rl_loss import ReducerFactory


def measure(overrides: Sequence[str], rollouts: int, warmup: int) -> dict[str, float]:
    """Median seconds and tokens of ``rollouts`` rollouts (after ``warmup``) of the default run."""
    config = compose_job(list(overrides)).config
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir), ParallelContext(), resolve_device(config.device),
                          ReducerFactory(config.loss))
        rollout_s, train_s, tokens = [], [], []
        gbs, spr = config.trainer.global_batch_size, config.steps_per_rollout
        for k in range(warmup + rollouts):
            started = time.perf_counter()
            trainer.rollout = trainer._prepare_rollout()
            prepared = time.perf_counter()
            for within in range(spr):
                trainer._train_step(range(within * gbs, (within + 1) * gbs))
            done = time.perf_counter()
            if k >= warmup:
                rollout_s.append(prepared - started)
                train_s.append(done - prepared)
                tokens.append(sum(trainer.rollout.response_lengths))
    return {
        "threads": torch.get_num_threads(),
        "samples_per_rollout": config.rollout_samples,
        "tokens_per_rollout": statistics.median(tokens),
        "rollout_seconds": statistics.median(rollout_s),
        "train_seconds": statistics.median(train_s),
        "train_tokens_per_second": statistics.median(t / s for t, s in zip(tokens, train_s, strict=True)),
        "end_to_end_tokens_per_second": statistics.median(
            t / (r + s) for t, r, s in zip(tokens, rollout_s, train_s, strict=True)
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=20, help="measured rollouts (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rollouts first (default 3)")
    parser.add_argument("overrides", nargs="*", help="launcher overrides, e.g. loss=dapo")
    args = parser.parse_args(argv)
    r = measure(args.overrides, args.rollouts, args.warmup)
    print("| default training step | value |\n|---|---:|")
    print(f"| torch threads | {r['threads']} |")
    print(f"| samples / response tokens per rollout (median) | {r['samples_per_rollout']} / {r['tokens_per_rollout']:.0f} |")
    print(f"| rollout (sample, score, old log-probs), s | {r['rollout_seconds']:.4f} |")
    print(f"| optimizer steps on it, s | {r['train_seconds']:.4f} |")
    print(f"| training tokens/s (without rollout) | {r['train_tokens_per_second']:.0f} |")
    print(f"| end-to-end tokens/s (with rollout) | {r['end_to_end_tokens_per_second']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
