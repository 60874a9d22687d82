"""``backend=trl``: train a Hugging Face causal LM with rl_loss's RLLossGRPOTrainer on the digit-sum task.

The run folder is the toy backend's: ``metrics.jsonl`` and ``tensorboard/`` (:mod:`launchers.backends.hf.callbacks`),
``.hydra/`` (Hydra), ``run_config.json``, and the Trainer's checkpoints under
``checkpoints/checkpoint-STEP/`` (model, optimizer, scheduler, RNG states, trainer state) with
``checkpoint-STEP.sha256`` beside each, every ``trainer.save_every`` steps and at the end. Several
processes: ``accelerate launch -m launchers.train backend=trl ...`` (data parallel; accelerate and the
Trainer set up the processes).

Run safety (docs/run-safety.md) comes from the toy backend's functions: :func:`launchers.runs.run_guard.open_run`
(the lock and the recipe guard), :func:`launchers.runs.checkpoints.resume_newest` over the Trainer's
folders (:data:`launchers.runs.checkpoints.TRAINER_FOLDERS`), :class:`launchers.runs.preemption.StopRequest`
(Ctrl-C, SIGTERM, SIGUSR1: a checkpoint, then exit 130, 143, 138) and
:func:`launchers.runs.summary.log_run_summary`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from launchers.backends.hf.callbacks import (
    ChecksumCallback,
    FiniteGradientCallback,
    MetricsCallback,
    SaveAtEndCallback,
    StopCallback,
    all_processes_sum,
)
from launchers.backends.hf.grpo_args import CHECKPOINT_SUBDIR, grpo_config_kwargs, trl_loss_config
from launchers.backends.hf.models import LoadedPolicy, ModelLoadError
from launchers.backends.hf.task import DigitSumReward, prompt_dataset
from launchers.backends.toy.task import DigitSumTask
from launchers.backends.toy.trainer import resolve_device
from launchers.config.backends import import_entry
from launchers.config.preflight import EXIT_CONFIG_ERROR, world_size_from_env
from launchers.config.run_config import RunConfig
from launchers.runs.checkpoints import TRAINER_FOLDERS, Agree, resume_newest
from launchers.runs.preemption import StopRequest
from launchers.runs.run_guard import open_run
from launchers.runs.summary import log_run_summary

log = logging.getLogger("launchers.train")


def resume_point(run_dir: Path, is_main: bool = True, agree: Agree | None = None) -> tuple[Path, int] | None:
    """The newest Trainer checkpoint of ``run_dir`` that verifies, and its step; None when there is none.

    Each folder skipped is named with its reason; when folders exist but none verifies, one line and exit 2
    (:func:`launchers.runs.checkpoints.resume_newest`).
    """
    chosen: list[Path] = []
    step = resume_newest(run_dir, chosen.append, is_main=is_main, agree=agree, layout=TRAINER_FOLDERS)
    return None if step is None else (chosen[-1], step)


def stop_ids(policy: LoadedPolicy) -> list[int]:
    """The ids that end a completion, as TRL collects them: the tokenizer's EOS and the generation config's."""
    configured = policy.model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return [policy.tokenizer.eos_token_id, *configured]


RENAMED_ARGUMENTS = {"activation_checkpointing": "gradient_checkpointing"}
"""TrainingArguments fields renamed within transformers 5 (new name -> the name releases before 5.2x take)."""


def for_installed_transformers(kwargs: dict[str, Any], config_class: type) -> dict[str, Any]:
    """``kwargs`` with each renamed field under the name the installed ``config_class`` (GRPOConfig) knows.

    transformers 5.24 calls gradient checkpointing ``activation_checkpointing`` (the old name is a deprecated
    alias); earlier 5.x releases (e.g. 5.17) only know ``gradient_checkpointing``.
    """
    fields = {f.name for f in dataclasses.fields(config_class)}
    return {(RENAMED_ARGUMENTS[k] if k in RENAMED_ARGUMENTS and k not in fields else k): v for k, v in kwargs.items()}


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
    from trl import GRPOConfig

    from rl_loss.integrations.trl_checks import grpo_config_problems

    run_dir = Path(run_dir)
    device = resolve_device(config.device)  # exits 2 on device=cuda without CUDA
    torch.set_num_threads(config.torch_threads)
    world = world_size_from_env()
    # under accelerate launch / torchrun, building the arguments sets up the process group
    args = GRPOConfig(**for_installed_transformers(
        grpo_config_kwargs(config, run_dir, world, cuda_available=device.type == "cuda"), GRPOConfig))
    # RLLossGRPOTrainer's own checks and TRL's refusal of nn.DataParallel, before the model loads
    problems = [*grpo_config_problems(args, trl_loss_config(config)),
                *filter(None, [several_gpus_in_one_process(args.n_gpu)])]
    if problems:
        _fail(*problems)
    is_main, agree = args.process_index == 0, all_processes_sum(args.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_run(config, run_dir, is_main=is_main, agree=agree) as run:  # lock + recipe guard
        config = run.config  # resume decided (a requeued job resumes by itself)
        checkpoint = resume_point(run_dir, is_main, agree) if config.resume else None
        if config.resume and checkpoint is None and is_main:
            log.warning("resume=true but %s holds no checkpoint: starting from step 0", run_dir)
        first_step = checkpoint[1] if checkpoint else 0
        metrics = MetricsCallback(
            run_dir, config.loss.aggregation, config.trainer.global_batch_size, config.steps_per_rollout,
            first_step if config.resume else None, config.progress, config.trainer.max_steps,
        )
        trainer = _trainer(config, args, metrics)
        if is_main:
            log.info("backend=trl model=%s aggregation=%s world=%d (DP through accelerate) run folder: %s",
                     config.model.kind, config.loss.aggregation, world, run_dir)
        run.record(first_step)
        return _run(trainer, config, run_dir, checkpoint, metrics, is_main, agree, world)


def _trainer(config: RunConfig, args: Any, metrics: MetricsCallback) -> Any:
    """RLLossGRPOTrainer on the configured model and the digit-sum prompts (exits 2 when the model does not load)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from rl_loss.integrations.trl import RLLossGRPOTrainer

    task = DigitSumTask(
        max_response_len=config.rollout.max_response_len,
        target_min=config.task.target_min,
        target_max=config.task.target_max,
    )
    try:
        policy: LoadedPolicy = import_entry(config.model.loader)(config.model, task, config.seed)
    except ModelLoadError as err:
        _fail(str(err))
    rollouts = config.trainer.max_steps // config.steps_per_rollout
    dataset = prompt_dataset(task, rollouts * config.rollout.prompts_per_rollout, policy.prompt_fn, config.seed)
    trainer = RLLossGRPOTrainer(
        model=policy.model,
        reward_funcs=[DigitSumReward(task, lambda i: policy.tokenizer.decode([i]), stop_ids(policy))],
        args=args,
        train_dataset=dataset,
        processing_class=policy.tokenizer,
        callbacks=[metrics, SaveAtEndCallback(), ChecksumCallback(), FiniteGradientCallback()],
        loss_config=trl_loss_config(config),
    )
    for printer in (PrinterCallback, ProgressCallback):  # the launcher's own progress display replaces them
        trainer.remove_callback(printer)
    if config.progress != "bar":  # no tqdm bars of checkpoint writes between plain log lines
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()
    if trainer.is_world_process_zero():
        log.info("task: %s", task.describe())
    return trainer


def _run(trainer: Any, config: RunConfig, run_dir: Path, checkpoint: tuple[Path, int] | None,
         metrics: MetricsCallback, is_main: bool, agree: Agree | None, world: int) -> float:
    """``trainer.train()`` under the stop signals, then the closing summary; exits 130/143/138 after a stop."""
    stop = StopRequest()
    stopper = StopCallback(stop, config.steps_per_rollout, agree)
    trainer.add_callback(stopper)
    first_step, started, outcome = checkpoint[1] if checkpoint else 0, time.monotonic(), None
    try:
        with warnings.catch_warnings():
            # TRL 1.16 asks transformers 5 for a renamed attribute at every generation: noise between progress lines
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            trainer.train(resume_from_checkpoint=str(checkpoint[0]) if checkpoint else None)
        if stopper.stopped:
            outcome = "stopped"
            if is_main:
                log.warning("stopped at step %d; checkpoint %s", trainer.state.global_step,
                            run_dir / CHECKPOINT_SUBDIR / f"checkpoint-{trainer.state.global_step}")
            stop.finish()  # exits (after submitit's requeue inside a submitit job)
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "aborted"
        raise
    finally:
        stop.restore()
        metrics.close()
        if is_main and outcome is not None:  # a crash ends on its traceback instead
            log_run_summary(run_dir, outcome=outcome, wall_seconds=time.monotonic() - started, first_step=first_step,
                            last_step=trainer.state.global_step, max_steps=config.trainer.max_steps, world_size=world)
    return metrics.last_reward
