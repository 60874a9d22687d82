"""RLLossGRPOTrainer's training step against TRL's GRPOTrainer's, same tiny model and batch (``make bench``).

Two figures per mode, each the median of per-pair ratios of interleaved runs (benchmarks/_harness.py):

- **optimizer step**: what a ``train()`` step does -- ``training_step`` (TRL's: ``_prepare_inputs``,
  which generates and scores the completions at the step's first micro-step, then forward, loss and
  backward) for each of the GA micro-steps, then ``optimizer.step()``. Both trainers start every step
  from the same seed and, with a zero learning rate, the same weights, so they generate the same
  completions.
- **loss + backward**: ``compute_loss`` and ``backward`` alone on one micro-batch that is already
  generated, the part where the two trainers differ (rl-loss: the step's weights, reducers and
  metrics; TRL: its normalisation and metrics).

The rl-loss mode is compared with the TRL ``loss_type`` that means the same (prompt_mean, which TRL
lacks, with ``grpo``). The model is the tiny Qwen2 of benchmarks/_trl_workload.py on CPU.

Times are this thread's CPU time by default (``--clock wall`` for elapsed time): on a shared machine
other processes stretch the elapsed time of either run of a pair at random, not its CPU time.

Usage: ``python -m benchmarks.trl_step [--pairs N] [--threads T] [--hidden H] [--clock cpu|wall] [--json OUT]``
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks import _trl_workload as workload
from benchmarks._harness import compare, load_average, machine_facts

MODES = {  # rl-loss aggregation -> (TRL loss_type, extra LossConfig fields)
    "sample_mean": ("grpo", {}),
    "token_mean": ("dapo", {}),
    "constant": ("dr_grpo", {"divisor": None}),  # divisor = max_completion_length, filled in below
    "prompt_mean": ("grpo", {}),
}
TARGET = 1.05
CLOCKS = {"cpu": time.thread_time_ns, "wall": time.perf_counter_ns}


def _trainers(mode: str, base: torch.nn.Module, out: str, settings: dict[str, Any]) -> tuple[Any, Any]:
    from trl import GRPOTrainer

    from rl_loss import LossConfig
    from rl_loss.integrations.trl import RLLossGRPOTrainer

    loss_type, extra = MODES[mode]
    extra = {k: (float(settings["max_completion_length"]) if v is None else v) for k, v in extra.items()}
    common = dict(reward_funcs=workload.reward, train_dataset=workload.prompts(), processing_class=workload.tokenizer())
    theirs = GRPOTrainer(model=copy.deepcopy(base), args=workload.grpo_config(out, loss_type=loss_type, **settings),
                         **common)
    ours = RLLossGRPOTrainer(model=copy.deepcopy(base), args=workload.grpo_config(out, **settings),
                             loss_config=LossConfig(aggregation=mode, **extra), **common)
    for trainer in (theirs, ours):
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
        trainer.model.train()
    return theirs, ours


def _generation_batch(trainer: Any) -> list[dict[str, str]]:
    """The prompts of one generation batch, each repeated num_generations times (as TRL's sampler does)."""
    rows = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    prompts = workload.prompts(rows // trainer.num_generations)["prompt"]
    return [{"prompt": p} for p in prompts for _ in range(trainer.num_generations)]


def _optimizer_step(trainer: Any, batch: list[dict[str, str]], seed: int) -> None:
    torch.manual_seed(seed)
    for _ in range(trainer.args.gradient_accumulation_steps):
        trainer.training_step(trainer.model, batch, None)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def _loss_and_backward(trainer: Any, inputs: dict[str, Any]) -> None:
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    trainer.model.zero_grad(set_to_none=True)


def measure(mode: str, pairs: int, hidden: int, out: str, clock: Callable[[], int]) -> dict[str, Any]:
    settings = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_completion_length=12,
                    learning_rate=0.0)
    theirs, ours = _trainers(mode, workload.model(hidden_size=hidden), out, settings)
    batch = _generation_batch(theirs)
    seeds = iter(range(10**9))
    # the optimizer step, both trainers from the same seed each time (lr 0: same weights, same completions)
    state = {"theirs": 0, "ours": 0}

    def step_of(trainer: Any, key: str):
        def run() -> None:
            state[key] += 1
            _optimizer_step(trainer, batch, seed=state[key])
        return run

    step = compare(step_of(theirs, "theirs"), step_of(ours, "ours"), repeats=pairs, warmup=2,
                   max_seconds=120.0, min_pairs=min(pairs, 10), clock=clock)
    # loss + backward on one already generated micro-batch (GA=1 view: the step is this micro-batch's slice)
    torch.manual_seed(next(seeds))
    theirs_inputs = theirs._prepare_inputs(batch)
    torch.manual_seed(0)
    ours_inputs = ours._prepare_inputs(batch)
    loss = compare(lambda: _loss_and_backward(theirs, theirs_inputs), lambda: _loss_and_backward(ours, ours_inputs),
                   repeats=pairs * 5, warmup=3, max_seconds=60.0, min_pairs=min(pairs * 5, 20), clock=clock)
    return {"mode": mode, "trl_loss_type": MODES[mode][0], "optimizer_step": step.as_dict(),
            "loss_and_backward": loss.as_dict()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_step", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30, help="interleaved optimizer-step pairs per mode (default 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Qwen2 (default 64)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                        help="cpu: this thread's CPU time (default; other processes on a shared machine do not "
                        "inflate it, torch runs on this thread with --threads 1); wall: elapsed time")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated rl-loss modes")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    gc.freeze()  # the Trainer's gc.collect() would otherwise walk every object of transformers and trl
    results = []
    with tempfile.TemporaryDirectory() as out:
        for mode in args.modes.split(","):
            results.append(measure(mode, args.pairs, args.hidden, out, CLOCKS[args.clock]))
    gc.unfreeze()
    print(f"## RLLossGRPOTrainer / GRPOTrainer (tiny Qwen2, hidden {args.hidden}, 2 x 8 completions of <= 12 "
          f"tokens per optimizer step, CPU, torch threads {args.threads}, {args.clock} time, load average "
          f"{load_average()})\n")
    print("| rl-loss mode | TRL loss_type | optimizer step: TRL ms / ratio (q1-q3) | loss+backward: TRL ms / ratio (q1-q3) |")
    print("|---|---|---|---|")
    worst = 0.0
    for r in results:
        s, lb = r["optimizer_step"], r["loss_and_backward"]
        worst = max(worst, s["ratio"])
        print(f"| {r['mode']} | {r['trl_loss_type']} | {s['floor_ms']:.1f} / {s['ratio']:.3f} "
              f"({s['ratio_q1']:.3f}-{s['ratio_q3']:.3f}) | {lb['floor_ms']:.2f} / {lb['ratio']:.3f} "
              f"({lb['ratio_q1']:.3f}-{lb['ratio_q3']:.3f}) |")
    verdict = "met" if worst <= TARGET else "NOT met"
    print(f"\nTarget: optimizer step <= {TARGET}x GRPOTrainer's: {verdict} (worst {worst:.3f}).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_facts(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
