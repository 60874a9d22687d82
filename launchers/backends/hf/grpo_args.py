"""The one place where a launcher run becomes TRL's ``GRPOConfig`` (``backend=trl``).

:func:`grpo_config_kwargs` maps every launcher field TRL has a counterpart for (README, "Real models
with TRL", shows the same table); :data:`UNSUPPORTED_BY_TRL` (re-exported from
:mod:`launchers.config.trl_rules`, where the run schema's rules that reject them live) lists the
launcher fields it has none for. This module imports neither trl nor transformers: validation and
``dry_run=true`` stay light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from launchers.config.trl_rules import ALSO_HONOURED, UNSUPPORTED_BY_TRL, gradient_accumulation_steps  # noqa: F401 (re-exported)
from rl_loss.config import LossConfig

if TYPE_CHECKING:
    from launchers.config.run_config import RunConfig

CHECKPOINT_SUBDIR = "checkpoints"
KEEP_CHECKPOINTS = 3

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
