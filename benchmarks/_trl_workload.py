"""A tiny TRL GRPO workload built in code, no download: tokenizer, Qwen2 model, prompts, reward.

Shared by the TRL step benchmark and the TRL parity tests. The model is a randomly initialised
``Qwen2ForCausalLM`` from a config, the tokenizer a ``tokenizers`` WordLevel vocabulary wrapped in
``PreTrainedTokenizerFast``; the task is "a + b =" with a reward that also varies with the completion's
length, so the completions of one prompt get different advantages and the aggregation modes differ.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig

SPECIALS = ["<pad>", "<eos>", "<unk>"]
WORDS = [str(d) for d in range(10)] + ["+", "="]


def tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over digits, '+' and '=' (pad 0, eos 1), split on whitespace."""
    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> Qwen2ForCausalLM:
    """A randomly initialised float32 Qwen2 causal LM over the tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def prompts(count: int = 32) -> Dataset:
    """``count`` distinct prompts "a + b =" (every prompt a different pair, so a prompt names its group)."""
    pairs = [(a, b) for a in range(10) for b in range(10)][:count]
    return Dataset.from_dict({"prompt": [f"{a} + {b} =" for a, b in pairs]})


def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1 for a completion starting with the last digit of a + b, plus 0.1 per completion token."""
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        a, b = int(prompt.split()[0]), int(prompt.split()[2])
        words = completion.split()
        scores.append(float(bool(words) and words[0] == str((a + b) % 10)) + 0.1 * len(words))
    return scores


def grpo_config(output_dir: str, **overrides: Any) -> GRPOConfig:
    """A CPU GRPOConfig for the tiny workload: float32, no logging backends or checkpoints, plain SGD, no clipping."""
    fields: dict[str, Any] = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        num_generations=4,
        max_completion_length=6,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=1,
        logging_steps=1,
        learning_rate=0.1,
        optim="sgd",
        max_grad_norm=0.0,
        gradient_checkpointing=False,  # TRL's default recomputes activations: pointless on a tiny model
    )
    fields.update(overrides)
    return GRPOConfig(**fields)
