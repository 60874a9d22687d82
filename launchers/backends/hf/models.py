"""Policies for ``backend=trl``: the tiny test model built in code (``model=hf_tiny``) and pretrained models (``model=hf``).

Each loader returns a :class:`LoadedPolicy`: the causal LM, its tokenizer, and how the digit-sum
task is put to it (the prompt of a target). The model section names its loader
(``HFTinyModelConfig.loader``, ``HFModelConfig.loader``), so no code here branches on the option name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from launchers.backends.hf.task import DIGITS, PromptFn, chat_prompt, instruction
from launchers.backends.toy.task import BOS_ID, EOS_ID, PAD_ID, SEP_ID, DigitSumTask
from launchers.config.backends import HFModelConfig, HFTinyModelConfig

UNK_ID = PAD_ID + 1
TINY_SPECIAL = {EOS_ID: "<eos>", BOS_ID: "<bos>", SEP_ID: "<sep>", PAD_ID: "<pad>", UNK_ID: "<unk>"}
"""The tiny tokenizer's words: the toy task's ids (digits 0-9, EOS, BOS, SEP, PAD), plus an unknown word."""


class ModelLoadError(Exception):
    """A model or tokenizer that cannot be loaded; the message is one line naming the field and the fix."""


@dataclass
class LoadedPolicy:
    """A causal LM ready for TRL, its tokenizer and the prompt of each target."""

    model: Any
    tokenizer: Any
    prompt_fn: PromptFn


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over the toy task's vocabulary, built in code: ``"<bos> 2 3 <sep>"`` -> ``[11, 2, 3, 12]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**{d: i for i, d in enumerate(DIGITS)}, **{word: i for i, word in TINY_SPECIAL.items()}}
    words = Tokenizer(models.WordLevel(vocab, unk_token=TINY_SPECIAL[UNK_ID]))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        bos_token=TINY_SPECIAL[BOS_ID],
        eos_token=TINY_SPECIAL[EOS_ID],
        pad_token=TINY_SPECIAL[PAD_ID],
        unk_token=TINY_SPECIAL[UNK_ID],
        additional_special_tokens=[TINY_SPECIAL[SEP_ID]],
    )


def tiny_prompt(target: int) -> str:
    """The toy task's prompt as words: ``BOS d d SEP``."""
    return " ".join([TINY_SPECIAL[BOS_ID], *f"{int(target):02d}", TINY_SPECIAL[SEP_ID]])


def tiny_model(section: HFTinyModelConfig, task: DigitSumTask, seed: int) -> LoadedPolicy:
    """A randomly initialised ``Qwen2ForCausalLM`` of ``section``'s sizes (deterministic in ``seed``)."""
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=section.hidden_size,
        intermediate_size=section.intermediate_size,
        num_hidden_layers=section.num_hidden_layers,
        num_attention_heads=section.num_attention_heads,
        num_key_value_heads=section.num_key_value_heads,
        max_position_embeddings=max(64, 2 * task.max_total_len),
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    transformers.set_seed(seed)
    return LoadedPolicy(Qwen2ForCausalLM(config), tokenizer, tiny_prompt)


def pretrained_model(section: HFModelConfig, task: DigitSumTask, seed: int) -> LoadedPolicy:
    """``section.name_or_path``'s causal LM and tokenizer (Hub id or local folder).

    Raises:
        ModelLoadError: when either does not load, or when a chat template is asked for and the
            tokenizer has none.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"revision": section.revision, "trust_remote_code": section.trust_remote_code}
    with _load_errors(section):
        tokenizer = AutoTokenizer.from_pretrained(section.name_or_path, **source)
    if section.chat_template and not tokenizer.chat_template:
        raise ModelLoadError(
            f"model.chat_template: the tokenizer of {section.name_or_path!r} has no chat template (got true); "
            "set model.chat_template=false to prompt it with plain text"
        )
    transformers.set_seed(seed)
    with _load_errors(section):
        model = AutoModelForCausalLM.from_pretrained(
            section.name_or_path,
            dtype="auto" if section.dtype == "auto" else getattr(torch, section.dtype),
            attn_implementation=section.attn_implementation,
            **source,
        )
    return LoadedPolicy(model, tokenizer, chat_prompt if section.chat_template else instruction)


@contextlib.contextmanager
def _load_errors(section: HFModelConfig) -> Iterator[None]:
    """Turn what transformers raises for a missing or broken model (OSError, ValueError) into one line."""
    try:
        yield
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ModelLoadError(
            f"model.name_or_path: cannot load {section.name_or_path!r} ({reason}); give a Hub id such as "
            "Qwen/Qwen2.5-0.5B-Instruct or a local folder written by save_pretrained"
        ) from None
