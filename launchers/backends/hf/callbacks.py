"""Trainer callbacks of ``backend=trl``: the run folder's metrics, verified checkpoints and stop requests.

TRL logs one dict per optimizer step (``logging_steps=1``) through the Hugging Face Trainer's
``on_log`` event; :class:`MetricsCallback` turns it into the launcher's ``metrics.jsonl`` record (the
names of docs/launcher.md, :data:`TRL_METRIC_NAMES`) and mirrors it to TensorBoard with the toy backend's
:class:`~launchers.runs.run_io.MetricsWriter`. Only the main process writes. :class:`ChecksumCallback`
writes the checksum of each checkpoint folder once the Trainer has saved it, :class:`StopCallback`
turns the launcher's :class:`~launchers.runs.preemption.StopRequest` (Ctrl-C, SIGTERM, SIGUSR1) into a
checkpoint and the end of training, on every process after the same step.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from launchers.runs.checkpoints import Agree, prune_checksums, write_checksum
from launchers.runs.failures import RunStopped
from launchers.runs.preemption import StopRequest
from launchers.runs.run_io import MetricsWriter, Progress

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
        resume_after_step: the step a resumed run continues from (records after it are dropped and
            rewritten); None for a new run.
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
            self.progress = Progress(self.max_steps, self.resume_after_step or 0, self.progress_mode,
                                     show_kl=self.steps_per_rollout > 1)

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
        self.close()

    def close(self) -> None:
        """Close the progress display and the metrics files (also after an aborted training)."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class SaveAtEndCallback(TrainerCallback):
    """A checkpoint after the last step too (the Trainer saves only every ``save_steps``), as the toy backend does."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = True


def all_processes_sum(device: Any) -> Agree | None:
    """Sum a CPU tensor over every process of the launch (None for a single process), on ``device``
    for the collective (NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def agree(tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.to(device)
        dist.all_reduce(summed)
        return summed.cpu()

    return agree


class ChecksumCallback(TrainerCallback):
    """``checkpoint-N.sha256`` beside each checkpoint folder, once every process has written its files into it.

    The Trainer saves the folder in place (every process writes its own RNG state file) and then
    calls ``on_save``: after a barrier the saving process checksums the complete folder. A folder
    without its checksum (a crash while saving) is skipped on resume. Checksums of folders the
    Trainer has rotated away are deleted.
    """

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if args.should_save:
            write_checksum(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            prune_checksums(Path(args.output_dir).parent)


class FiniteGradientCallback(TrainerCallback):
    """Stop the run before the optimizer applies a gradient holding NaN or Inf (one line, exit 1).

    ``on_pre_optimizer_step`` comes after the gradients are synchronised across processes (DDP) and
    clipped, so every process sees the same norm and stops at the same step; the checkpoints written
    so far are left as they are.
    """

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads:
            return
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        if not math.isfinite(norm):
            raise RunStopped(
                f"run stopped at step {state.global_step + 1}: the gradient norm is {norm} (NaN or Inf in the gradient); "
                "it was not applied, and the checkpoints written before are intact. Check the rewards and the loss "
                "settings, or lower optim.lr (resuming with it needs allow_recipe_change=true)")


class StopCallback(TrainerCallback):
    """A stop request (:class:`~launchers.runs.preemption.StopRequest`) ends training after a step, with a checkpoint.

    Every process shares its request at the end of each optimizer step (one all-reduce), so all stop
    after the same step even when only one got the signal. A checkpoint must fall between rollouts
    (TRL keeps a rollout's unused micro-batches in memory only), so a request that arrives inside a
    rollout of several optimizer steps is honoured at the end of that rollout. A request at the last
    step lets the run finish. After ``trainer.train()`` returns, ``stopped`` tells whether it ended that way.

    Args:
        stop: the installed stop request.
        steps_per_rollout: optimizer steps per rollout.
        agree: sums a tensor over every process; None for a single process.
    """

    def __init__(self, stop: StopRequest, steps_per_rollout: int, agree: Agree | None):
        self.stop, self.steps_per_rollout, self.agree = stop, steps_per_rollout, agree
        self.stopped = False
        self._announced = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        flags = self.stop.as_tensor()
        if not self.stop.adopt(self.agree(flags) if self.agree is not None else flags):
            return
        if state.global_step >= state.max_steps:
            return  # the run ends here anyway
        if state.global_step % self.steps_per_rollout:
            if not self._announced and state.is_world_process_zero:
                end = (state.global_step // self.steps_per_rollout + 1) * self.steps_per_rollout
                log.warning("stopping at the end of this rollout, after step %d: a TRL checkpoint must fall between "
                            "rollouts", end)
            self._announced = True
            return
        self.stopped = True
        control.should_save = True
        control.should_training_stop = True
