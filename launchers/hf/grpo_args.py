"""The one place where a launcher run becomes TRL's ``GRPOConfig`` (``backend=trl``), and what TRL cannot honour.

:func:`grpo_config_kwargs` maps every launcher field TRL has a counterpart for (README, "Real models
with TRL", shows the same table); :data:`UNSUPPORTED_BY_TRL` lists the launcher fields it has none
for. A field of that table set to anything but its default is rejected before any model work
(:data:`TRL_RULES`, run by the run schema's cross-section validator), so no setting is silently
ignored. This module imports neither trl nor transformers: validation and ``dry_run=true`` stay light.

World size: under ``accelerate launch`` (which starts its processes through torchrun) ``WORLD_SIZE``
is the number of data-parallel processes; TRL has no context parallelism, so DP = world size, and
``trainer.global_batch_size = micro_batch_size * gradient_accumulation_steps * world size``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launchers.config import RunConfig

CHECKPOINT_SUBDIR = "checkpoints"
KEEP_CHECKPOINTS = 3

UNSUPPORTED_BY_TRL: dict[str, str] = {
    "parallel.cp_size": "TRL's GRPOTrainer has no context parallelism; use data parallelism (accelerate launch)",
    "parallel.qkv_format": "TRL packs no sequences across CP ranks, so the CP layout has no meaning there",
    "parallel.backend": "accelerate picks the torch.distributed backend; configure it with `accelerate config`",
}
"""Launcher fields (dotted paths) that TRL cannot honour: rejected with backend=trl unless at their default."""


def gradient_accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each process: global_batch_size / (micro_batch_size * world_size)."""
    return cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * max(world_size, 1))


def steps_per_generation(cfg: RunConfig, world_size: int) -> int:
    """TRL's steps_per_generation: micro-batches per process in one rollout (GA * steps per rollout)."""
    return cfg.rollout_samples // (cfg.trainer.micro_batch_size * max(world_size, 1))


def trl_layout_summary(cfg: RunConfig, world_size: int) -> str:
    """The GRPOConfig batch figures of ``cfg`` on ``world_size`` processes, for the dry-run summary."""
    return (
        f"DP={max(world_size, 1)} through accelerate; GRPOConfig num_generations={cfg.rollout.n_samples_per_prompt} "
        f"generation_batch_size={cfg.rollout_samples} per_device_train_batch_size={cfg.trainer.micro_batch_size} "
        f"gradient_accumulation_steps={gradient_accumulation_steps(cfg, world_size)} "
        f"steps_per_generation={steps_per_generation(cfg, world_size)}"
    )


def _show_bar(progress: str) -> bool:
    return progress == "bar" or (progress == "auto" and sys.stderr.isatty())


def grpo_config_kwargs(cfg: RunConfig, run_dir: str | Path, world_size: int = 1, use_cpu: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``trl.GRPOConfig`` for ``cfg`` (validated) in ``run_dir`` on ``world_size`` processes.

    The loss section is not here: it goes to ``RLLossGRPOTrainer(loss_config=cfg.loss)`` whole.
    ``use_cpu`` is the resolved ``device`` (``auto`` -> CUDA when available).
    """
    max_grad_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")  # inf: norm, no clip
    return {
        "output_dir": str(Path(run_dir) / CHECKPOINT_SUBDIR),
        # rollout.*: one generation batch is one rollout
        "num_generations": cfg.rollout.n_samples_per_prompt,
        "generation_batch_size": cfg.rollout_samples,
        "max_completion_length": cfg.rollout.max_response_len,
        "temperature": cfg.rollout.temperature,
        "top_p": 1.0,  # plain sampling at the temperature, as the toy backend samples
        "top_k": 0,
        "num_iterations": 1,  # each rollout is trained on once, in steps_per_rollout optimizer steps
        # trainer.*
        "per_device_train_batch_size": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, world_size),
        "max_steps": cfg.trainer.max_steps,
        "save_strategy": "steps",
        "save_steps": cfg.trainer.save_every,
        "save_total_limit": KEEP_CHECKPOINTS,
        # optim.*: AdamW at a constant learning rate, as the toy backend
        "optim": "adamw_torch",
        "learning_rate": cfg.optim.lr,
        "adam_beta1": cfg.optim.betas[0],
        "adam_beta2": cfg.optim.betas[1],
        "weight_decay": cfg.optim.weight_decay,
        "max_grad_norm": max_grad_norm,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        # run level
        "seed": cfg.seed,
        "use_cpu": use_cpu,
        "bf16": cfg.backend.bf16,
        "gradient_checkpointing": cfg.backend.gradient_checkpointing,
        "logging_steps": 1,
        "report_to": "none",  # metrics.jsonl and TensorBoard come from launchers.hf.callbacks
        "disable_tqdm": not _show_bar(cfg.progress),
    }


@functools.cache
def _defaults() -> RunConfig:
    from launchers.config import RunConfig

    return RunConfig()


def _value_at(cfg: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), cfg)


def _unsupported_fields_at_default(cfg: RunConfig, world_size: int) -> str | None:
    problems = []
    for path, reason in UNSUPPORTED_BY_TRL.items():
        value, default = _value_at(cfg, path), _value_at(_defaults(), path)
        if value != default:
            problems.append(f"{path}: backend=trl cannot honour it: {reason} (got {value!r}); remove it (default {default!r})")
    return "\n".join(problems) or None


def _two_samples_per_prompt(cfg: RunConfig, world_size: int) -> str | None:
    if cfg.rollout.n_samples_per_prompt < 2:
        return (
            f"rollout.n_samples_per_prompt: TRL's GRPOTrainer needs at least 2 samples per prompt for group advantages "
            f"(got {cfg.rollout.n_samples_per_prompt}); set 2 or more"
        )
    return None


TRL_RULES = (_unsupported_fields_at_default, _two_samples_per_prompt)
"""Cross-section rules that only apply with backend=trl (rl_loss's launcher runs them from the run schema)."""
