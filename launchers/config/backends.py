"""Config sections of the Hydra groups ``backend/`` (which trainer runs) and ``model/`` (which policy it trains).

Each group option is one pydantic model whose ``kind`` literal is its tag: ``backend=toy`` is
:class:`ToyBackendConfig`, ``backend=trl`` :class:`TrlBackendConfig`; ``model=toy`` is
:class:`launchers.config.run_config.ModelConfig`, ``model=hf_tiny`` :class:`HFTinyModelConfig` and ``model=hf``
:class:`HFModelConfig`. Behaviour hangs off the classes, never off string comparisons: a backend names
its entry point, the model kinds it trains and its own cross-section rules; an HF model names its
loader. Entry points and loaders are import paths, so validating a configuration (``dry_run=true``,
``-m`` sweeps, ``import launchers.train``) never imports trl or transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

from launchers.config.trl_rules import TRL_RULES, trl_layout_summary

if TYPE_CHECKING:
    from launchers.config.run_config import RunConfig

_SECTION = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

Rule = Callable[["RunConfig", int], "str | None"]
"""A cross-section rule: (config, world size) -> one problem line, or None."""


# -- backends -------------------------------------------------------------------------------


def _toy_feeds_every_correction(cfg: RunConfig, world_size: int) -> str | None:
    # the embedded trainer samples with the policy itself (no rollout engine) and has no step-level covariance
    # pass, so these corrections would have no input (docs/corrections.md)
    problems = []
    if cfg.loss.cov_penalty != "none":
        problems.append(
            f"loss.cov_penalty: backend=toy has no step-level covariance pass (got {cfg.loss.cov_penalty}); "
            "set cov_penalty=none"
        )
    if cfg.loss.rollout_correction.enabled:
        problems.append(
            "loss.rollout_correction: backend=toy samples with the trained policy itself, so there are no "
            "rollout-engine log-probs to correct from (got is_level/rs set); remove it"
        )
    return "\n".join(problems) or None



class ToyBackendConfig(BaseModel):
    """The embedded trainer (launchers/backends/toy/trainer.py): the toy transformer, DP x CP under torchrun."""

    model_config = _SECTION

    kind: Literal["toy"] = "toy"
    """Backend (set by the group: backend=toy)."""

    entry_point: ClassVar[str] = "launchers.backends.toy.trainer:train"
    model_kinds: ClassVar[tuple[str, ...]] = ("toy",)
    rules: ClassVar[tuple[Rule, ...]] = (_toy_feeds_every_correction,)

    @staticmethod
    def layout_summary(cfg: RunConfig, world_size: int) -> str:
        """How a step is laid out over processes, for the dry-run summary."""
        dp_size = max(world_size // cfg.parallel.cp_size, 1)
        return f"DP={dp_size}, CP={cfg.parallel.cp_size}, {cfg.parallel.qkv_format}"


class TrlBackendConfig(BaseModel):
    """Hugging Face TRL: rl_loss's RLLossGRPOTrainer on a Hugging Face causal LM; DP through accelerate launch."""

    model_config = _SECTION

    kind: Literal["trl"] = "trl"
    """Backend (set by the group: backend=trl)."""

    bf16: bool = False
    """bf16 mixed precision (GRPOConfig.bf16): float32 master weights, bf16 autocast; for GPUs that support it."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (GRPOConfig.activation_checkpointing): less memory, ~30% slower."""

    entry_point: ClassVar[str] = "launchers.backends.hf.train:train"
    model_kinds: ClassVar[tuple[str, ...]] = ("hf_tiny", "hf")
    rules: ClassVar[tuple[Rule, ...]] = TRL_RULES
    layout_summary = staticmethod(trl_layout_summary)


def import_entry(path: str) -> Any:
    """The object at ``'package.module:name'`` (a backend's entry point, a model's loader)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


BACKENDS = (ToyBackendConfig, TrlBackendConfig)
"""Every option of the backend group."""


def backend_for_model(model_kind: str) -> str:
    """The backend option that trains ``model_kind``."""
    return next(b.model_fields["kind"].default for b in BACKENDS if model_kind in b.model_kinds)


# -- Hugging Face models --------------------------------------------------------------------


class HFTinyModelConfig(BaseModel):
    """A tiny randomly initialised Qwen2 causal LM with a word-level tokenizer built in code: no download (tests)."""

    model_config = _SECTION

    kind: Literal["hf_tiny"] = "hf_tiny"
    """Model (set by the group: model=hf_tiny)."""

    hidden_size: int = Field(32, ge=8, le=4096)
    """Width of the residual stream (Qwen2Config.hidden_size)."""

    num_hidden_layers: int = Field(2, ge=1, le=64)
    """Decoder layers."""

    num_attention_heads: int = Field(4, ge=1, le=64)
    """Query heads; must divide hidden_size."""

    num_key_value_heads: int = Field(2, ge=1, le=64)
    """Key/value heads (grouped-query attention); must divide num_attention_heads."""

    intermediate_size: int = Field(64, ge=8, le=16384)
    """Width of the MLP."""

    loader: ClassVar[str] = "launchers.backends.hf.models:tiny_model"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Self:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: must divide hidden_size={self.hidden_size} (got {self.num_attention_heads})"
            )
        return self

    @model_validator(mode="after")
    def _kv_heads_divide_heads(self) -> Self:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: must divide num_attention_heads={self.num_attention_heads} "
                f"(got {self.num_key_value_heads})"
            )
        return self


class HFModelConfig(BaseModel):
    """A pretrained Hugging Face causal LM and its tokenizer, from the Hub or a local folder."""

    model_config = _SECTION

    kind: Literal["hf"] = "hf"
    """Model (set by the group: model=hf)."""

    name_or_path: str = Field(min_length=1)
    """Hub id or local folder of the model and its tokenizer, e.g. Qwen/Qwen2.5-0.5B-Instruct (required)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; null means the default branch."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype of the loaded weights; float32 keeps float32 master weights (combine with backend.bf16=true on a GPU)."""

    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel (transformers' attn_implementation); null lets transformers choose."""

    trust_remote_code: bool = False
    """Allow model code from the Hub repository to run (only for repositories you trust)."""

    chat_template: bool = True
    """Wrap each prompt as a user message in the tokenizer's chat template (instruct models); false: plain text."""

    loader: ClassVar[str] = "launchers.backends.hf.models:pretrained_model"
