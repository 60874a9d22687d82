"""Schema of a training run: one pydantic model per config section, cross-section rules on the root.

These models are the single source of truth for the launcher's types, bounds and defaults; Hydra's
base config is generated from them (:mod:`launchers.config.conf_store`) and ``conf/*.yaml`` only hold the
values that differ, each with the reason above it. The loss section is the library's
:class:`rl_loss.LossConfig`.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from typing_extensions import Self

from launchers.config.backends import (
    HFModelConfig,
    HFTinyModelConfig,
    ToyBackendConfig,
    TrlBackendConfig,
    backend_for_model,
)
from rl_loss.config import DivisorBelowMaxLength, LossConfig

_SECTION = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RolloutConfig(BaseModel):
    """How each rollout is sampled from the policy."""

    model_config = _SECTION

    prompts_per_rollout: int = Field(16, ge=1, le=65536)
    """Distinct prompts sampled per rollout (one prompt group each)."""

    n_samples_per_prompt: int = Field(8, ge=1, le=1024)
    """Responses sampled per prompt (the group size of GRPO-family advantages)."""

    max_response_len: int = Field(12, ge=1, le=4096)
    """Generation budget: a response stops at EOS or after this many tokens."""

    temperature: float = Field(1.0, gt=0, le=10)
    """Sampling temperature of the rollout."""


class TaskConfig(BaseModel):
    """The embedded verifiable-reward task (no download)."""

    model_config = _SECTION

    name: Literal["digit_sum"] = "digit_sum"
    """Task: respond with digits whose sum equals the target in the prompt, then EOS."""

    target_min: int = Field(1, ge=1, le=99)
    """Smallest target sum in a prompt."""

    target_max: int = Field(40, ge=1, le=99)
    """Largest target sum; needs responses of up to ceil(target_max / 9) digits plus EOS."""

    @model_validator(mode="after")
    def _target_range_ordered(self) -> Self:
        if self.target_min > self.target_max:
            raise ValueError(f"target_min: must not exceed target_max={self.target_max} (got {self.target_min})")
        return self


class ModelConfig(BaseModel):
    """The small causal transformer policy trained by the embedded trainer (backend=toy)."""

    model_config = _SECTION

    kind: Literal["toy"] = "toy"
    """Model (set by the group: model=toy)."""

    d_model: int = Field(64, ge=8, le=4096)
    """Width of the residual stream."""

    n_layers: int = Field(2, ge=1, le=64)
    """Transformer blocks."""

    n_heads: int = Field(4, ge=1, le=64)
    """Attention heads; must divide d_model."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Self:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: must divide d_model={self.d_model} (got {self.n_heads})")
        return self


class OptimConfig(BaseModel):
    """AdamW and gradient clipping."""

    model_config = _SECTION

    lr: float = Field(7e-4, gt=0, le=1)
    """AdamW learning rate (1e-3 and above destabilises the default policy: its entropy collapses)."""

    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW moment decay rates, each in [0, 1)."""

    weight_decay: float = Field(0.0, ge=0, le=1)
    """AdamW decoupled weight decay."""

    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value before each step; null disables."""

    @model_validator(mode="after")
    def _betas_in_unit_interval(self) -> Self:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1) (got {list(self.betas)})")
        return self


class TrainerConfig(BaseModel):
    """Optimizer steps, batch sizes and checkpoints."""

    model_config = _SECTION

    global_batch_size: int = Field(128, ge=1)
    """Samples per optimizer step (N of the aggregation modes); must divide the samples of a rollout."""

    micro_batch_size: int = Field(32, ge=1)
    """Samples per forward/backward pass on one DP rank."""

    max_steps: int = Field(300, ge=1)
    """Optimizer steps of the run (a whole number of rollouts)."""

    save_every: int = Field(100, ge=1)
    """Write a checkpoint every this many optimizer steps (and at the end)."""


class ParallelConfig(BaseModel):
    """Context and data parallelism; the world size comes from torchrun."""

    model_config = _SECTION

    cp_size: int = Field(1, ge=1, le=64)
    """Context-parallel group size; the world size must be a multiple of it (DP = world / cp_size)."""

    qkv_format: Literal["thd", "bshd"] = "thd"
    """Sequence layout: thd (packed, chunks per sample) or bshd (padded micro-batch width)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl on CUDA, gloo on CPU."""


BackendSection = Annotated[ToyBackendConfig | TrlBackendConfig, Field(discriminator="kind")]
"""The ``backend`` group: one model per option, tagged by ``kind``."""

ModelSection = Annotated[ModelConfig | HFTinyModelConfig | HFModelConfig, Field(discriminator="kind")]
"""The ``model`` group: one model per option, tagged by ``kind``."""


class RunConfig(BaseModel):
    """A whole training run: every section plus the run-level switches."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    loss: LossConfig = LossConfig()
    """Loss aggregation and policy-loss terms (a conf/loss preset)."""

    rollout: RolloutConfig = RolloutConfig()
    """Rollout sampling."""

    task: TaskConfig = TaskConfig()
    """The embedded task."""

    backend: BackendSection = ToyBackendConfig()
    """The trainer: toy (embedded, DP x CP) or trl (Hugging Face TRL, DP through accelerate)."""

    model: ModelSection = ModelConfig()
    """The policy model: toy, hf_tiny (tiny random Hugging Face model) or hf (pretrained)."""

    optim: OptimConfig = OptimConfig()
    """Optimizer."""

    trainer: TrainerConfig = TrainerConfig()
    """Steps, batch sizes, checkpoints."""

    parallel: ParallelConfig = ParallelConfig()
    """Data and context parallelism."""

    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of every random stream (prompts, sampling, initialisation); at most 2^32 - 1, the range of
    numpy's seed, which ``transformers.set_seed`` (backend=trl) passes it to."""

    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Where the model runs; auto picks CUDA when available."""

    dry_run: bool = False
    """Validate the whole configuration (every sweep job), print a summary and exit before any work."""

    resume: bool = False
    """Continue from the newest usable checkpoint in the run folder (refused if the recipe changed)."""

    allow_recipe_change: bool = False
    """On resume, continue even though fields that alter the run's mathematics changed (each is logged)."""

    progress: Literal["auto", "bar", "log"] = "auto"
    """Progress display: a bar on a terminal, log lines otherwise (auto)."""

    torch_threads: int = Field(1, ge=1, le=1024)
    """torch intra-op threads per process: 1 is fastest for the small default policy and fixes float results."""

    @property
    def rollout_samples(self) -> int:
        """Samples per rollout: prompts_per_rollout * n_samples_per_prompt."""
        return self.rollout.prompts_per_rollout * self.rollout.n_samples_per_prompt

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps taken on each rollout."""
        return self.rollout_samples // self.trainer.global_batch_size

    def whole_rollouts(self, steps: int) -> bool:
        """Do ``steps`` optimizer steps end between two rollouts (a multiple of :attr:`steps_per_rollout`)?"""
        return not self.steps_per_rollout or steps % self.steps_per_rollout == 0

    @model_validator(mode="after")
    def _cross_section_rules(self, info: ValidationInfo) -> Self:
        # Every rule runs so that one message lists every problem, one line each.
        world_size = int((info.context or {}).get("world_size", 1))
        rules = (*CROSS_SECTION_RULES, *self.backend.rules)
        problems = [message for rule in rules if (message := rule(self, world_size))]
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _backend_trains_model(cfg: RunConfig, world_size: int) -> str | None:
    if cfg.model.kind not in cfg.backend.model_kinds:
        trains = " or ".join(f"model={kind}" for kind in cfg.backend.model_kinds)
        return (
            f"model: backend={cfg.backend.kind} trains {trains} (got model={cfg.model.kind}); "
            f"use {trains}, or backend={backend_for_model(cfg.model.kind)} for model={cfg.model.kind}"
        )
    return None


def _steps_per_rollout_whole(cfg: RunConfig, world_size: int) -> str | None:
    if cfg.rollout_samples % cfg.trainer.global_batch_size:
        return (
            f"trainer.global_batch_size: {cfg.rollout_samples} samples per rollout (rollout.prompts_per_rollout "
            f"* rollout.n_samples_per_prompt) do not split into steps of {cfg.trainer.global_batch_size} "
            f"(got {cfg.trainer.global_batch_size}); use a divisor of {cfg.rollout_samples}"
        )
    return None


def _groups_stay_in_one_step(cfg: RunConfig, world_size: int) -> str | None:
    if cfg.trainer.global_batch_size % cfg.rollout.n_samples_per_prompt:
        return (
            f"trainer.global_batch_size: steps of {cfg.trainer.global_batch_size} samples would split prompt "
            f"groups of rollout.n_samples_per_prompt={cfg.rollout.n_samples_per_prompt} across steps "
            f"(got {cfg.trainer.global_batch_size}); use a multiple of {cfg.rollout.n_samples_per_prompt}"
        )
    return None


def _prompt_mean_one_step_per_rollout(cfg: RunConfig, world_size: int) -> str | None:
    if cfg.loss.aggregation == "prompt_mean" and cfg.steps_per_rollout > 1:
        return (
            f"loss.aggregation: prompt_mean needs one optimizer step per rollout so that no prompt group "
            f"straddles steps (got {cfg.steps_per_rollout} steps: trainer.global_batch_size="
            f"{cfg.trainer.global_batch_size} of {cfg.rollout_samples} samples); "
            f"set trainer.global_batch_size={cfg.rollout_samples}"
        )
    return None


def _micro_batches_divide_step(cfg: RunConfig, world_size: int) -> str | None:
    dp_size = max(world_size // cfg.parallel.cp_size, 1)
    if cfg.trainer.global_batch_size % (cfg.trainer.micro_batch_size * dp_size):
        return (
            f"trainer.micro_batch_size: a step of {cfg.trainer.global_batch_size} samples over {dp_size} DP "
            f"rank(s) does not split into micro-batches of {cfg.trainer.micro_batch_size} "
            f"(got {cfg.trainer.micro_batch_size}); global_batch_size must be a multiple of "
            f"micro_batch_size * DP size"
        )
    return None


def _cp_divides_world(cfg: RunConfig, world_size: int) -> str | None:
    if world_size % cfg.parallel.cp_size:
        return (
            f"parallel.cp_size: {world_size} process(es) do not split into CP groups of {cfg.parallel.cp_size} "
            f"(got {cfg.parallel.cp_size}); launch a multiple of it with torchrun --nproc-per-node"
        )
    return None


def _whole_rollouts(cfg: RunConfig, world_size: int) -> str | None:
    if not cfg.whole_rollouts(cfg.trainer.max_steps):
        return (
            f"trainer.max_steps: must be a multiple of the {cfg.steps_per_rollout} optimizer steps per rollout "
            f"(got {cfg.trainer.max_steps})"
        )
    return None


def _nccl_needs_cuda(cfg: RunConfig, world_size: int) -> str | None:
    if cfg.parallel.backend == "nccl" and cfg.device == "cpu":
        return "parallel.backend: nccl needs CUDA tensors (got nccl with device=cpu); use gloo or device=cuda"
    return None


def _targets_reachable(cfg: RunConfig, world_size: int) -> str | None:
    needed = -(-cfg.task.target_max // 9) + 1  # nine per digit, then EOS
    if cfg.rollout.max_response_len < needed:
        return (
            f"rollout.max_response_len: task.target_max={cfg.task.target_max} needs responses of {needed} tokens "
            f"(digits of at most 9, then EOS) (got {cfg.rollout.max_response_len}); raise it or lower task.target_max"
        )
    return None


def _divisor_covers_max_response(cfg: RunConfig, world_size: int) -> str | None:
    # Accepted on purpose (a smaller L is a legitimate choice), but never silently.
    divisor = cfg.loss.divisor
    if cfg.loss.aggregation == "constant" and divisor is not None and divisor < cfg.rollout.max_response_len:
        warnings.warn(
            f"loss.divisor={divisor:g} is below rollout.max_response_len={cfg.rollout.max_response_len}: a "
            "full-length response then weighs more than under token_mean (loss_scale_vs_token_mean can exceed 1); "
            "Dr.GRPO divides by the generation budget",
            DivisorBelowMaxLength,
            stacklevel=2,
        )
    return None


CROSS_SECTION_RULES = (
    _backend_trains_model,
    _steps_per_rollout_whole,
    _groups_stay_in_one_step,
    _prompt_mean_one_step_per_rollout,
    _micro_batches_divide_step,
    _cp_divides_world,
    _whole_rollouts,
    _targets_reachable,
    _nccl_needs_cuda,
    _divisor_covers_max_response,
)
