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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_loss.config import LossConfig

if TYPE_CHECKING:
    from launchers.config.run_config import RunConfig

CHECKPOINT_SUBDIR = "checkpoints"
KEEP_CHECKPOINTS = 3

UNSUPPORTED_BY_TRL: dict[str, str] = {
    "parallel.cp_size": "TRL's GRPOTrainer has no context parallelism; use data parallelism (accelerate launch)",
    "parallel.qkv_format": "TRL packs no sequences across CP ranks, so the CP layout has no meaning there",
    "parallel.backend": "accelerate picks the torch.distributed backend; configure it with `accelerate config`",
    "loss.advantage_eps": "TRL computes the advantages and adds a fixed 1e-4 to the group std",
}
"""Launcher fields (dotted paths) that TRL cannot honour: rejected with backend=trl unless at their default."""

ALSO_HONOURED: dict[str, tuple[Any, ...]] = {"loss.advantage_eps": (1e-4,)}
"""Values besides the default that TRL does honour for a field of :data:`UNSUPPORTED_BY_TRL`."""


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


GRPO_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "rollout.prompts_per_rollout": ("generation_batch_size",),
    "rollout.n_samples_per_prompt": ("num_generations", "generation_batch_size"),
    "rollout.max_response_len": ("max_completion_length",),
    "rollout.temperature": ("temperature",),
    "trainer.global_batch_size": ("gradient_accumulation_steps",),
    "trainer.micro_batch_size": ("per_device_train_batch_size", "gradient_accumulation_steps"),
    "trainer.max_steps": ("max_steps",),
    "trainer.save_every": ("save_steps",),
    "optim.lr": ("learning_rate",),
    "optim.betas": ("adam_beta1", "adam_beta2"),
    "optim.weight_decay": ("weight_decay",),
    "optim.grad_clip": ("max_grad_norm",),
    "loss.kl_coef": ("beta",),
    "loss.advantage_estimator": ("scale_rewards",),
    "loss.ratio_level": ("importance_sampling_level",),
    "seed": ("seed",),
    "device": ("use_cpu",),
    "backend.bf16": ("bf16",),
    "backend.gradient_checkpointing": ("activation_checkpointing",),
}
"""Launcher field -> the GRPOConfig fields :func:`grpo_config_kwargs` sets from it (the README table)."""

HONOURED_OUTSIDE_GRPO_CONFIG: dict[str, str] = {
    "loss": "RLLossGRPOTrainer(loss_config=...): every loss field, through trl_loss_config()",
    "task": "the prompt dataset and the reward (launchers.backends.hf.task)",
    "model": "the model loader the model section names (launchers.backends.hf.models)",
    "dry_run": "the launcher's preflight",
    "resume": "launchers.runs.checkpoints.resume_newest: the newest checkpoint folder that verifies, then "
              "trainer.train(resume_from_checkpoint=it)",
    "allow_recipe_change": "launchers.runs.run_guard.open_run, the recipe guard on resume",
    "progress": "launchers.runs.run_io.Progress, driven by the metrics callback",
    "torch_threads": "torch.set_num_threads",
}
"""Launcher sections/fields that TRL honours through something other than GRPOConfig."""

SCALE_REWARDS = {"grpo": "group", "drgrpo": "none", "grpo_batch_std": "none"}
"""loss.advantage_estimator -> GRPOConfig.scale_rewards: TRL computes the advantages (std + 1e-4 for group; for
grpo_batch_std TRL centres them and RLLossGRPOTrainer divides by the batch std)."""

_CUDA_REQUESTED = {"cpu": False, "cuda": True}


def grpo_config_kwargs(cfg: RunConfig, run_dir: str | Path, world_size: int = 1,
                       cuda_available: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``trl.GRPOConfig`` for ``cfg`` (validated) in ``run_dir`` on ``world_size`` processes.

    The loss section goes to ``RLLossGRPOTrainer(loss_config=trl_loss_config(cfg))``; here only
    ``beta`` (TRL builds its reference model when beta > 0) and ``scale_rewards`` (TRL computes the
    advantages) come from it. ``cuda_available`` resolves ``device=auto``.
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
        # the prompts are random draws already; in drawing order a shorter run's prompts are a prefix of a
        # longer one's, so resume=true with a higher trainer.max_steps continues on the same prompts
        "shuffle_dataset": False,
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
        # loss.*: the rest of the loss is loss_config's
        "beta": cfg.loss.kl_coef,
        "scale_rewards": SCALE_REWARDS[cfg.loss.advantage_estimator],
        # RLLossGRPOTrainer checks that TRL's ratio level names the loss's (token, or sequence for GSPO)
        # (TRL has no sequence_token level: RLLossGRPOTrainer computes GSPO-token itself from TRL's default "token")
        "importance_sampling_level": "sequence" if getattr(cfg.loss, "ratio_level", "token") == "sequence" else "token",
        # run level
        "seed": cfg.seed,
        "use_cpu": not _CUDA_REQUESTED.get(cfg.device, cuda_available),
        "bf16": cfg.backend.bf16,
        "activation_checkpointing": cfg.backend.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        "logging_steps": 1,
        "report_to": "none",  # metrics.jsonl and TensorBoard come from launchers.backends.hf.callbacks
        "disable_tqdm": True,  # the launcher's own progress display (progress=bar|log|auto)
    }


def trl_loss_config(cfg: RunConfig) -> LossConfig:
    """The ``loss_config`` of RLLossGRPOTrainer: the loss section, with only its non-default fields marked as set.

    RLLossGRPOTrainer checks the fields a user set against GRPOConfig; Hydra's composed loss section
    sets every field, so the defaults are passed as defaults.
    """
    return LossConfig.model_validate(cfg.loss.model_dump(by_alias=True, exclude_defaults=True))


@functools.cache
def _defaults() -> RunConfig:
    from launchers.config.run_config import RunConfig

    return RunConfig()


def _value_at(cfg: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), cfg)


def _unsupported_fields_at_default(cfg: RunConfig, world_size: int) -> str | None:
    problems = []
    for path, reason in UNSUPPORTED_BY_TRL.items():
        value, default = _value_at(cfg, path), _value_at(_defaults(), path)
        if value != default and value not in ALSO_HONOURED.get(path, ()):
            problems.append(f"{path}: backend=trl cannot honour it: {reason} (got {value!r}); remove it (default {default!r})")
    return "\n".join(problems) or None


def _two_samples_per_prompt(cfg: RunConfig, world_size: int) -> str | None:
    if cfg.rollout.n_samples_per_prompt < 2:
        return (
            f"rollout.n_samples_per_prompt: TRL's GRPOTrainer needs at least 2 samples per prompt for group advantages "
            f"(got {cfg.rollout.n_samples_per_prompt}); set 2 or more"
        )
    return None


def _checkpoints_between_rollouts(cfg: RunConfig, world_size: int) -> str | None:
    # TRL keeps a rollout's unused micro-batches in memory only: a checkpoint inside a rollout would
    # resume on a fresh rollout, not on the rest of the saved one.
    if not cfg.whole_rollouts(cfg.trainer.save_every):
        return (
            f"trainer.save_every: with backend=trl a checkpoint must fall between rollouts, every multiple of the "
            f"{cfg.steps_per_rollout} optimizer steps per rollout (got {cfg.trainer.save_every}); "
            f"use a multiple of {cfg.steps_per_rollout}"
        )
    return None


TRL_RULES = (_unsupported_fields_at_default, _two_samples_per_prompt, _checkpoints_between_rollouts)
"""Cross-section rules that only apply with backend=trl (rl_loss's launcher runs them from the run schema)."""
