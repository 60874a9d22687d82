"""``backend=trl``: train a Hugging Face causal LM with rl_loss's RLLossGRPOTrainer on the digit-sum task.

The run folder is the toy backend's: ``metrics.jsonl`` and ``tensorboard/`` (:mod:`launchers.hf.callbacks`),
``.hydra/`` (Hydra), and the Trainer's checkpoints under ``checkpoints/checkpoint-STEP/`` (model,
optimizer, scheduler, RNG states, trainer state), every ``trainer.save_every`` steps and at the end.
``resume=true`` continues from the latest of them. Several processes: ``accelerate launch -m
launchers.train backend=trl ...`` (data parallel; accelerate and the Trainer set up the processes).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from launchers.backends import import_entry
from launchers.config import RunConfig
from launchers.hf.callbacks import MetricsCallback, SaveAtEndCallback, StopOnSignal
from launchers.hf.grpo_args import CHECKPOINT_SUBDIR, grpo_config_kwargs, trl_loss_config
from launchers.hf.models import LoadedPolicy, ModelLoadError
from launchers.hf.task import DigitSumReward, prompt_dataset
from launchers.preflight import EXIT_CONFIG_ERROR, world_size_from_env
from launchers.toy.task import DigitSumTask
from launchers.trainer import resolve_device

log = logging.getLogger("launchers.train")

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The Trainer checkpoint with the highest step in ``run_dir`` and its step, or None."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / CHECKPOINT_SUBDIR).glob("checkpoint-*")
             if p.is_dir() and (m := _CHECKPOINT_RE.search(p.name))]
    if not found:
        return None
    step, path = max(found)
    return path, step


def stop_ids(policy: LoadedPolicy) -> list[int]:
    """The ids that end a completion, as TRL collects them: the tokenizer's EOS and the generation config's."""
    configured = policy.model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return [policy.tokenizer.eos_token_id, *configured]


def several_gpus_in_one_process(n_gpu: int) -> str | None:
    """The problem when one process sees several GPUs (the Trainer would use nn.DataParallel, which TRL refuses)."""
    if n_gpu <= 1:
        return None
    return (
        f"device: {n_gpu} GPUs are visible to one process and TRL's GRPOTrainer does not support nn.DataParallel "
        f"(got device=cuda); launch one process per GPU with `accelerate launch --multi_gpu --num_processes {n_gpu} "
        "-m launchers.train ...`, or make one GPU visible with CUDA_VISIBLE_DEVICES=0"
    )


def _fail(*problems: str) -> None:
    print("Invalid configuration:\n  " + "\n  ".join(problems), file=sys.stderr)
    raise SystemExit(EXIT_CONFIG_ERROR)


def train(config: RunConfig, run_dir: str | Path, factory: Any = None) -> float:
    """Train as ``config`` says in ``run_dir`` with TRL; returns the last logged reward mean (for sweepers).

    Args:
        config: the validated run configuration (backend=trl, an HF model section).
        run_dir: Hydra's output folder.
        factory: unused (Hydra's instance of the loss group); RLLossGRPOTrainer builds its reducers
            from ``config.loss``.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig

    from rl_loss.integrations.trl import RLLossGRPOTrainer
    from rl_loss.integrations.trl_checks import grpo_config_problems

    run_dir = Path(run_dir)
    device = resolve_device(config.device)  # exits 2 on device=cuda without CUDA
    torch.set_num_threads(config.torch_threads)
    world = world_size_from_env()
    task = DigitSumTask(
        max_response_len=config.rollout.max_response_len,
        target_min=config.task.target_min,
        target_max=config.task.target_max,
    )
    args = GRPOConfig(**grpo_config_kwargs(config, run_dir, world, cuda_available=device.type == "cuda"))
    loss_config = trl_loss_config(config)
    # RLLossGRPOTrainer's own checks and TRL's refusal of nn.DataParallel, before the model loads
    problems = [*grpo_config_problems(args, loss_config), *filter(None, [several_gpus_in_one_process(args.n_gpu)])]
    if problems:
        _fail(*problems)
    try:
        policy: LoadedPolicy = import_entry(config.model.loader)(config.model, task, config.seed)
    except ModelLoadError as err:
        _fail(str(err))
    rollouts = config.trainer.max_steps // config.steps_per_rollout
    dataset = prompt_dataset(task, rollouts * config.rollout.prompts_per_rollout, policy.prompt_fn, config.seed)

    checkpoint = latest_checkpoint(run_dir) if config.resume else None
    if config.resume and checkpoint is None:
        log.warning("resume=true but %s holds no checkpoint: starting from step 0", run_dir)
    metrics = MetricsCallback(
        run_dir, config.loss.aggregation, config.trainer.global_batch_size, config.steps_per_rollout,
        checkpoint[1] if checkpoint else None,
        config.progress, config.trainer.max_steps,
    )
    stop = StopOnSignal()
    trainer = RLLossGRPOTrainer(
        model=policy.model,
        reward_funcs=[DigitSumReward(task, lambda i: policy.tokenizer.decode([i]), stop_ids(policy))],
        args=args,
        train_dataset=dataset,
        processing_class=policy.tokenizer,
        callbacks=[metrics, SaveAtEndCallback(), stop],
        loss_config=loss_config,
    )
    for printer in (PrinterCallback, ProgressCallback):  # the launcher's own progress display replaces them
        trainer.remove_callback(printer)
    if trainer.is_world_process_zero():
        log.info("task: %s", task.describe())
        log.info("backend=trl model=%s aggregation=%s world=%d (DP through accelerate) run folder: %s",
                 config.model.kind, config.loss.aggregation, world, run_dir)
    stop.install()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint[0]) if checkpoint else None)
    finally:
        stop.restore()
    if stop.requested:
        if trainer.is_world_process_zero():
            log.warning("stopped at step %d; checkpoint in %s. Continue with: resume=true hydra.run.dir=%s",
                        trainer.state.global_step, run_dir / CHECKPOINT_SUBDIR, run_dir)
        raise SystemExit(130)
    return metrics.last_reward
