"""The digit-sum task as text for Hugging Face models: prompts, a prompt dataset and the reward.

The reward is the toy task's (:meth:`launchers.backends.toy.task.DigitSumTask.reward`), not a second copy: a
completion's token ids are read back into the toy task's tokens — every digit character of a token
is that digit, a whitespace-only token is skipped, any other token is a non-digit (reward 0), and an
end-of-sequence id is EOS — and scored by the toy task. A completion that stops without an EOS id
(truncated at ``rollout.max_response_len``) gets 0, as in the toy task.

Prompts: the tiny test model reads the toy layout as words (``<bos> 2 3 <sep>``); a pretrained model
gets an instruction in English, as a chat message when its tokenizer has a chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from launchers.backends.toy.task import NUM_DIGITS, PAD_ID, DigitSumTask

DIGITS = "0123456789"[:NUM_DIGITS]  # ASCII only: str.isdigit() also accepts superscripts and other scripts

PromptFn = Callable[[int], "str | list[dict[str, str]]"]
"""Target -> the prompt of a dataset row (text, or a conversation of one user message)."""


def instruction(target: int) -> str:
    """The English prompt of a pretrained model for ``target``."""
    return (
        f"Write a list of single digits (0-9), separated by spaces, whose sum is exactly {target}. "
        "Reply with the digits only."
    )


def chat_prompt(target: int) -> list[dict[str, str]]:
    """The instruction as one user message (TRL applies the tokenizer's chat template)."""
    return [{"role": "user", "content": instruction(target)}]


def prompt_dataset(task: DigitSumTask, num_prompts: int, prompt_fn: PromptFn, seed: int) -> Any:
    """A ``datasets.Dataset`` of ``num_prompts`` rows ``{"prompt": ..., "target": t}``, targets drawn as the toy task draws them."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    targets = [task.target_of(p) for p in task.sample_prompts(num_prompts, generator)]
    return Dataset.from_dict({"prompt": [prompt_fn(t) for t in targets], "target": targets})


class DigitSumReward:
    """TRL reward function: the toy task's reward of each completion (see the module docstring).

    Args:
        task: the toy task (targets, reward shape).
        token_text: token id -> its text (the tokenizer's ``convert_ids_to_tokens`` + ``convert_tokens_to_string``).
        eos_ids: ids that end a completion (TRL's stop ids: the tokenizer's and the generation config's).
    """

    __name__ = "digit_sum"  # TRL logs rewards/<name>/mean

    def __init__(self, task: DigitSumTask, token_text: Callable[[int], str], eos_ids: Sequence[int]):
        self.task, self.token_text, self.eos_ids = task, token_text, frozenset(int(i) for i in eos_ids)

    def task_tokens(self, completion_ids: Sequence[int]) -> list[int]:
        """The toy task's tokens of one completion: digits, PAD for any non-digit, EOS for a stop id."""
        tokens: list[int] = []
        for token_id in completion_ids:
            if int(token_id) in self.eos_ids:
                tokens.append(self.task.eos_id)
                break
            text = "".join(self.token_text(int(token_id)).split())  # whitespace carries no meaning
            tokens.extend(DIGITS.index(c) if c in DIGITS else PAD_ID for c in text)
        return tokens

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], target: list[int],
                 **_: Any) -> list[float]:
        return [
            self.task.reward(self.task.encode_prompt(t), self.task_tokens(ids))
            for t, ids in zip(target, completion_ids, strict=True)
        ]
