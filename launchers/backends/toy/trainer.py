"""The GRPO-family training loop of ``python -m launchers.train`` on the embedded digit-sum task.

Per rollout: sample ``n_samples_per_prompt`` responses to each prompt, score them, compute group
advantages over the whole rollout and the old (and reference) log-probs. Per optimizer step: the
step's samples form one :class:`~rl_loss.StepBatch`; each DP rank trains on its share in
micro-batches, each CP rank on its chunks of every sequence; every micro-batch's loss is its partial
of the step objective (rl_loss's reducers), so gradients are summed over micro-batches and ranks.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from launchers.backends.toy import DigitSumTask, ToyPolicy, all_gather_kv, distributed, generate, local_logprobs
from launchers.backends.toy.model import ModelConfig as ToyModelConfig
from launchers.config.run_config import RunConfig
from launchers.runs.checkpoints import prune_checkpoints, resume_newest, save_checkpoint
from launchers.runs.failures import RunStopped
from launchers.runs.preemption import StopRequest
from launchers.runs.run_guard import open_run
from launchers.runs.run_io import MetricsWriter, Progress, checkpoint_path, rng_state, set_rng_state
from launchers.runs.summary import log_run_summary
from rl_loss import ReducerFactory, StepBatch, group_advantages, policy_loss

log = logging.getLogger("launchers.train")

METRIC_KEYS = ("pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "kl_loss")
KEEP_CHECKPOINTS = 3


@dataclass
class PreparedRollout:
    """One rollout, scored and ready to train on; every tensor is in rollout sample order."""

    sequences: list[list[int]]
    response_lengths: list[int]
    total_lengths: list[int]
    group_index: list[int]
    loss_masks: list[Tensor]
    rewards: Tensor
    advantages: Tensor
    old_logprobs: list[Tensor]
    ref_logprobs: list[Tensor] | None


def resolve_device(requested: str) -> torch.device:
    """``auto`` means CUDA when available.

    Raises:
        SystemExit: (code 2, one line) when CUDA is requested on a machine without it.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        print("Invalid configuration:\n  device: no CUDA device is available (got 'cuda'); use device=cpu or device=auto",
              file=sys.stderr)
        raise SystemExit(2)
    return torch.device(requested)


def train(config: RunConfig, run_dir: str | Path, factory: ReducerFactory | None = None) -> float:
    """Train as ``config`` says in ``run_dir``; returns the final reward mean (for sweepers).

    Args:
        config: the validated run configuration.
        run_dir: Hydra's output folder (metrics, TensorBoard, checkpoints).
        factory: the reducer factory (Hydra instantiates it from ``cfg.loss``); built from
            ``config.loss`` when omitted.
    """
    device = resolve_device(config.device)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    ctx = distributed.setup(config.parallel.cp_size, config.parallel.backend, device)
    agree = ctx.all_reduce_sum if ctx.distributed else None
    try:
        with open_run(config, run_dir, is_main=ctx.is_main, agree=agree) as run:  # lock + recipe guard
            trainer = Trainer(run.config, Path(run_dir), ctx, device, factory or ReducerFactory(config.loss))
            # loaded on the CPU: RNG states must stay CPU tensors; load_state_dict copies onto the model's device
            resumed = run.config.resume and resume_newest(run_dir, trainer.restore, "cpu", is_main=ctx.is_main,
                                                          agree=agree)
            if run.config.resume and resumed is None and ctx.is_main:
                log.warning("resume=true but %s holds no checkpoint: starting from step 0", run_dir)
            run.record(trainer.step)
            return trainer.run()
    finally:
        distributed.teardown(ctx)


class Trainer:
    """State and loop of one run (one process of a DP x CP world)."""

    def __init__(self, config: RunConfig, run_dir: Path, ctx: distributed.ParallelContext, device: torch.device,
                 factory: ReducerFactory):
        self.config, self.run_dir, self.ctx, self.device, self.factory = config, run_dir, ctx, device, factory
        torch.set_num_threads(config.torch_threads)
        torch.manual_seed(config.seed)
        self.task = DigitSumTask(
            max_response_len=config.rollout.max_response_len,
            target_min=config.task.target_min,
            target_max=config.task.target_max,
        )
        sizes = config.model.model_dump(exclude={"kind"})
        self.policy = ToyPolicy(ToyModelConfig.for_task(self.task, **sizes)).to(device)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False) if config.loss.kl_coef > 0 else None
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=config.optim.lr, betas=config.optim.betas, weight_decay=config.optim.weight_decay
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.kv_exchange = all_gather_kv(ctx.cp_group) if ctx.cp_size > 1 else None
        self.max_seq_len = self.task.max_total_len if config.parallel.qkv_format == "bshd" else None
        self.step = 0
        self._saved_step = -1  # the step of the last checkpoint written or restored
        self.rollout: PreparedRollout | None = None
        self.stop: StopRequest | None = None  # installed by run(): signal handling belongs to the loop

    # -- rollouts ---------------------------------------------------------------------------

    @torch.no_grad()
    def _token_logprobs(self, model: ToyPolicy, sequences: list[list[int]], response_lengths: list[int]) -> list[Tensor]:
        """Per-sample log-probs of the response tokens under ``model`` (full sequences, no CP)."""
        flat, _ = local_logprobs(model, sequences, response_lengths, temperature=self.config.rollout.temperature)
        return list(torch.split(flat.double().cpu(), response_lengths))

    def _prepare_rollout(self) -> PreparedRollout:
        cfg = self.config
        prompts = self.task.sample_prompts(cfg.rollout.prompts_per_rollout, self.generator)
        rollout = generate(
            self.policy, prompts, cfg.rollout.n_samples_per_prompt, cfg.rollout.max_response_len, self.generator,
            temperature=cfg.rollout.temperature, eos_id=self.task.eos_id,
        )
        rewards = torch.tensor(
            [self.task.reward(p, r) for p, r in zip(rollout.prompts, rollout.responses, strict=True)], dtype=torch.float64
        )
        advantages = group_advantages(rewards, rollout.group_index, cfg.loss.advantage_estimator, cfg.loss.advantage_eps)
        sequences, lengths = rollout.sequences, rollout.response_lengths
        return PreparedRollout(
            sequences=sequences,
            response_lengths=lengths,
            total_lengths=rollout.total_lengths,
            group_index=rollout.group_index,
            loss_masks=rollout.loss_masks,
            rewards=rewards,
            advantages=advantages,
            old_logprobs=self._token_logprobs(self.policy, sequences, lengths),
            ref_logprobs=self._token_logprobs(self.reference, sequences, lengths) if self.reference else None,
        )

    # -- one optimizer step -----------------------------------------------------------------

    def _train_step(self, samples: range) -> dict[str, Any]:
        cfg, ctx, ro = self.config, self.ctx, self.rollout
        started = time.perf_counter()
        lengths = [ro.response_lengths[i] for i in samples]
        step_batch = StepBatch(
            response_lengths=lengths,
            total_lengths=[ro.total_lengths[i] for i in samples],
            loss_masks=[ro.loss_masks[i] for i in samples],
            group_index=[ro.group_index[i] for i in samples],
            trajectory_index=list(samples),  # every sample is its own trajectory: trajectory_mean = sample_mean
        )
        old = torch.cat([ro.old_logprobs[i] for i in samples])
        ref = torch.cat([ro.ref_logprobs[i] for i in samples]) if ro.ref_logprobs is not None else None
        advantages = torch.repeat_interleave(ro.advantages[list(samples)], torch.tensor(lengths))

        per_rank = len(samples) // ctx.dp_size
        mbs = cfg.trainer.micro_batch_size
        partials = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        layout = dict(cp_rank=ctx.cp_rank, cp_size=ctx.cp_size, qkv_format=cfg.parallel.qkv_format,
                      max_seq_len=self.max_seq_len)
        for start in range(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank, mbs):
            micro = list(range(start, start + mbs))  # indices within the step
            pg_reducer = self.factory.pg_reducer(step_batch, micro, **layout)
            metric_reducer = self.factory.metric_reducer(step_batch, micro, **layout)
            logprobs, entropy = local_logprobs(
                self.policy, [ro.sequences[samples[i]] for i in micro], [lengths[i] for i in micro],
                kv_exchange=self.kv_exchange, temperature=cfg.rollout.temperature, **layout,
            )
            index = pg_reducer.token_index
            loss, metrics = policy_loss(
                logprobs.double(), self._local(old, index), self._local(advantages, index), pg_reducer, metric_reducer,
                cfg.loss, ref_logprobs=self._local(ref, index), entropy=entropy.double(), cp_all_reduce=ctx.cp_all_reduce,
            )
            loss.backward()
            partials += torch.stack([metrics[k].cpu() if k in metrics else torch.zeros((), dtype=torch.float64)
                                     for k in METRIC_KEYS])

        stop = self.stop.as_tensor() if self.stop is not None else torch.zeros(0, dtype=torch.float64)
        reduced = ctx.all_reduce_sum(torch.cat([partials, stop]))
        self._all_reduce_grads()
        grad_norm = self._clip_and_step()
        elapsed = time.perf_counter() - started
        tokens = sum(lengths)
        record = {
            "step": self.step,
            "rollout": (self.step - 1) // cfg.steps_per_rollout,
            "aggregation": self.factory.aggregation,
            "reward_mean": float(ro.rewards[list(samples)].mean()),
            "response_length_mean": tokens / len(lengths),
            **{k: float(v) for k, v in zip(METRIC_KEYS, reduced[: len(METRIC_KEYS)], strict=True)},
            "grad_norm": grad_norm,
            **self.factory.step_metrics(step_batch),
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_seconds": elapsed,
            "train_tokens_per_second": tokens / elapsed,
        }
        if ro.ref_logprobs is None:
            record.pop("kl_loss")
        self._stop_everywhere = self.stop is not None and self.stop.adopt(reduced[len(METRIC_KEYS):])
        return record

    def _local(self, per_token: Tensor | None, index: Tensor) -> Tensor | None:
        """This rank's values of a step-ordered per-token tensor, on the model's device."""
        return None if per_token is None else per_token[index].to(self.device)

    def _all_reduce_grads(self) -> None:
        if not self.ctx.distributed:
            return
        params = [p for p in self.policy.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.ctx.all_reduce_sum(flat)  # partials of one objective: their gradients add up
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def _clip_and_step(self) -> float:
        """Clip and apply the step's gradient; a non-finite gradient norm stops the run before it is applied.

        The norm is taken after the all-reduce, so every rank sees the same value and stops together.

        Raises:
            RunStopped: the gradient holds NaN or Inf (one line; the checkpoints written so far are intact).
        """
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise RunStopped(
                f"run stopped at step {self.step + 1}: the gradient norm is {grad_norm} (NaN or Inf in the gradient); "
                f"it was not applied; {self._kept()}. Check the rewards and the loss settings, or lower optim.lr "
                "(resuming with it needs allow_recipe_change=true)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm

    # -- checkpoints ------------------------------------------------------------------------

    def _kept(self) -> str:
        """What a stop leaves: the last checkpoint, for the one line a stop prints."""
        return f"the checkpoints up to step {self._saved_step} are intact" if self._saved_step > 0 else \
            "no checkpoint had been written yet"

    def _save(self) -> Path:
        path = checkpoint_path(self.run_dir, self.step)
        if self.ctx.is_main and self._saved_step != self.step:
            half_used = self.rollout is not None and self.step % self.config.steps_per_rollout
            state = {  # tensors and plain containers only: loadable with weights_only=True
                "step": self.step,
                "policy": self.policy.state_dict(),
                "reference": self.reference.state_dict() if self.reference is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "rng": rng_state(),
                "rollout": {f.name: getattr(self.rollout, f.name) for f in fields(PreparedRollout)} if half_used else None,
            }
            save_checkpoint(state, path)
            prune_checkpoints(self.run_dir, KEEP_CHECKPOINTS)
        self._saved_step = self.step
        if self.ctx.distributed:
            torch.distributed.barrier(group=self.ctx.world_group)
        return path

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (:func:`launchers.runs.checkpoints.resume_newest` calls it)."""
        self.policy.load_state_dict(state["policy"])
        if self.reference is not None and state["reference"] is not None:
            self.reference.load_state_dict(state["reference"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.rollout = PreparedRollout(**state["rollout"]) if state["rollout"] is not None else None
        self.step = self._saved_step = int(state["step"])

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> float:
        cfg, ctx = self.config, self.ctx
        writer = MetricsWriter(self.run_dir, self.step if cfg.resume else None) if ctx.is_main else None
        if ctx.is_main:
            log.info("task: %s", self.task.describe())
            log.info("aggregation=%s world=%d (DP %d x CP %d, %s) run folder: %s", self.factory.aggregation,
                     ctx.world_size, ctx.dp_size, ctx.cp_size, cfg.parallel.qkv_format, self.run_dir)
        progress = Progress(cfg.trainer.max_steps, self.step, cfg.progress, enabled=ctx.is_main,
                            show_kl=cfg.steps_per_rollout > 1)
        self.stop = StopRequest()
        self._stop_everywhere = False
        reward = float("nan")
        first_step, started, outcome = self.step, time.monotonic(), None
        try:
            while self.step < cfg.trainer.max_steps:
                within = self.step % cfg.steps_per_rollout
                if within == 0:
                    self.rollout = self._prepare_rollout()
                gbs = cfg.trainer.global_batch_size
                record = self._train_step(range(within * gbs, (within + 1) * gbs))
                reward = record["reward_mean"]
                if writer is not None:
                    writer.write(record)
                progress.update(record)
                if self.step % cfg.trainer.save_every == 0 or self.step == cfg.trainer.max_steps:
                    self._save()
                if self._stop_everywhere and self.step < cfg.trainer.max_steps:
                    path = self._save()
                    outcome = "stopped"
                    if ctx.is_main:
                        log.warning("stopped at step %d; checkpoint %s", self.step, path)
                    self.stop.finish()  # exits (after submitit's requeue inside a submitit job)
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = "aborted"
            raise
        finally:
            self.stop.restore()
            progress.close()
            if writer is not None:
                writer.close()
            if ctx.is_main and outcome is not None:  # a crash ends on its traceback instead
                log_run_summary(self.run_dir, outcome=outcome, wall_seconds=time.monotonic() - started,
                                first_step=first_step, last_step=self.step, max_steps=cfg.trainer.max_steps,
                                world_size=ctx.world_size)
        return reward
