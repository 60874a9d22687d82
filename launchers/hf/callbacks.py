"""Trainer callbacks of ``backend=trl``: the run folder's metrics, the final checkpoint and Ctrl-C.

TRL logs one dict per optimizer step (``logging_steps=1``) through the Hugging Face Trainer's
``on_log`` event; :class:`MetricsCallback` turns it into the launcher's ``metrics.jsonl`` record (the
SPEC §9 names, :data:`TRL_METRIC_NAMES`) and mirrors it to TensorBoard with the toy backend's
:class:`~launchers.run_io.MetricsWriter`. Only the main process writes.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from launchers.run_io import MetricsWriter, Progress

log = logging.getLogger("launchers.train")

TRL_METRIC_NAMES: dict[str, str] = {
    "reward": "reward_mean",
    "completions/mean_length": "response_length_mean",
    "pg_loss": "pg_loss",
    "pg_clipfrac": "pg_clipfrac",
    "ppo_kl": "ppo_kl",
    "entropy": "entropy",
    "kl_loss": "kl_loss",
    "grad_norm": "grad_norm",
    "loss_scale_vs_token_mean": "loss_scale_vs_token_mean",
    "tokens": "tokens",
    "empty_step": "empty_step",
    "learning_rate": "lr",
    "loss": "loss",
}
"""Name of a value in TRL's per-step logs -> its name in metrics.jsonl."""


class MetricsCallback(TrainerCallback):
    """One ``metrics.jsonl`` record (and TensorBoard scalars) per optimizer step, plus the progress display.

    Args:
        run_dir: the run folder.
        aggregation: the loss's aggregation mode (a string: TRL's metrics are numbers only).
        samples_per_step: trainer.global_batch_size (N of a step).
        steps_per_rollout: optimizer steps per rollout (``rollout`` index of a record).
        resume_after_step: the checkpoint's step when resuming (records after it are dropped and rewritten).
        progress: the ``progress`` setting.
        max_steps: steps of the run (progress display).
    """

    def __init__(self, run_dir: Path, aggregation: str, samples_per_step: int, steps_per_rollout: int,
                 resume_after_step: int | None, progress: str, max_steps: int):
        self.run_dir, self.aggregation, self.steps_per_rollout = run_dir, aggregation, steps_per_rollout
        self.samples_per_step = samples_per_step
        self.resume_after_step, self.progress_mode, self.max_steps = resume_after_step, progress, max_steps
        self.writer: MetricsWriter | None = None
        self.progress: Progress | None = None
        self.rollout_values: dict[str, float] = {}
        self._step_started = time.perf_counter()
        self.last_reward = float("nan")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.writer = MetricsWriter(self.run_dir, self.resume_after_step)
            self.progress = Progress(self.max_steps, self.resume_after_step or 0, self.progress_mode)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.writer is None or not logs or "train_runtime" in logs:  # the end-of-training summary is no step
            return
        record = self.record(state.global_step, logs, time.perf_counter() - self._step_started)
        self.writer.write(record)
        if self.progress is not None:
            self.progress.update(record)
        self.last_reward = record.get("reward_mean", self.last_reward)

    def record(self, step: int, logs: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The metrics.jsonl record of optimizer step ``step`` from TRL's logs of that step.

        ``response_length_mean`` is the step's: its masked tokens (``tokens``, all processes) over its
        samples. TRL logs the reward once per rollout (with its first step), so with several steps per
        rollout ``reward_mean`` is the rollout's, repeated on each of its steps.
        """
        values = {ours: float(logs[theirs]) for theirs, ours in TRL_METRIC_NAMES.items() if logs.get(theirs) is not None}
        if "reward_mean" in values:
            self.rollout_values = {"reward_mean": values["reward_mean"]}
        if "tokens" in values:
            values["response_length_mean"] = values["tokens"] / self.samples_per_step
        return {
            "step": step,
            "rollout": (step - 1) // self.steps_per_rollout,
            "aggregation": self.aggregation,
            **self.rollout_values,
            **values,
            "step_seconds": seconds,
        }

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class SaveAtEndCallback(TrainerCallback):
    """A checkpoint after the last step too (the Trainer saves only every ``save_steps``), as the toy backend does."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = True


class StopOnSignal(TrainerCallback):
    """The first signal (Ctrl-C by default) finishes the current step, writes a checkpoint and stops training.

    A second one stops at once. After ``trainer.train()`` returns, ``requested`` tells whether a
    signal ended the run (the launcher then exits 130 with the resume command).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over the signals (restore with :meth:`restore`)."""
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: finishing this step, writing a checkpoint, then stopping (again to abort)",
                    signal.Signals(signum).name)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._anywhere(args):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True

    def _anywhere(self, args: Any) -> bool:
        """Whether any process got the signal: every rank must stop after the same step."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([float(self.requested)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
