"""A synthetic task with a verifiable reward: write digits whose sum hits the target in the prompt.

Prompt: ``BOS d1 d0 SEP`` spells a target ``t`` in ``[target_min, target_max]`` as two decimal digits
(zero-padded: a fixed place for the tens digit is much easier for a tiny model to read). Response:
digit tokens followed by ``EOS``, at most ``max_response_len`` tokens in all (EOS included); a
response that reaches the limit without EOS is truncated.

Reward, in ``[0, 1]``, with ``s`` the sum of the response digits:

    r = (1 - exact_bonus) * exp(-|s - t| / scale) + exact_bonus * [s == t]

and ``r = 0`` for a truncated response (no EOS), so the policy first learns to stop, then to stop at
the right sum. The exponential keeps the reward dense (no flat zero region where a whole prompt group
ties and GRPO gets no signal) while paying most near the target. Different targets need different
numbers of digits (at least ``ceil(t / 9)``), so a policy that has learned the task writes responses
of clearly different lengths, and the aggregation modes (sample_mean / token_mean / constant) weight
tokens differently.

Token ids: digits ``0..9`` are ids ``0..9``, then ``EOS``, ``BOS``, ``SEP``, ``PAD``. The first
``num_actions`` ids (digits and EOS) are the only tokens a policy emits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NUM_DIGITS = 10
EOS_ID = 10
BOS_ID = 11
SEP_ID = 12
PAD_ID = 13
VOCAB_SIZE = 14
NUM_ACTIONS = 11  # digits and EOS: what a response may contain


@dataclass(frozen=True)
class DigitSumTask:
    """The digit-sum task.

    Args:
        max_response_len: most response tokens, EOS included.
        target_min: smallest target (>= 1, so an empty answer is never exact).
        target_max: largest target (<= 9 * (max_response_len - 1), so every target is reachable; < 100).
        scale: distance from the target at which the closeness part of the reward falls to 1/e.
        exact_bonus: share of the reward given only for an exact hit.
    """

    max_response_len: int = 12
    target_min: int = 1
    target_max: int = 40
    scale: float = 5.0
    exact_bonus: float = 0.25

    vocab_size: int = VOCAB_SIZE
    num_actions: int = NUM_ACTIONS
    eos_id: int = EOS_ID
    bos_id: int = BOS_ID
    sep_id: int = SEP_ID
    pad_id: int = PAD_ID

    def __post_init__(self) -> None:
        if self.max_response_len < 2:
            raise ValueError(f"max_response_len must be >= 2 (one digit and EOS) (got {self.max_response_len})")
        reachable = 9 * (self.max_response_len - 1)
        if not 1 <= self.target_min <= self.target_max <= min(reachable, 99):
            raise ValueError(
                f"targets must satisfy 1 <= target_min <= target_max <= min(9 * (max_response_len - 1), 99) = "
                f"{min(reachable, 99)} (got target_min={self.target_min}, target_max={self.target_max})"
            )
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0 (got {self.scale})")
        if not 0 <= self.exact_bonus <= 1:
            raise ValueError(f"exact_bonus must be in [0, 1] (got {self.exact_bonus})")

    @property
    def max_prompt_len(self) -> int:
        """Prompt length (every prompt): BOS, two digits, SEP."""
        return 4

    @property
    def max_total_len(self) -> int:
        """Longest prompt plus response: the padded width of a bshd micro-batch."""
        return self.max_prompt_len + self.max_response_len

    def encode_prompt(self, target: int) -> list[int]:
        """``[BOS, tens digit, ones digit, SEP]``."""
        return [self.bos_id, *(int(c) for c in f"{int(target):02d}"), self.sep_id]

    def target_of(self, prompt: Sequence[int]) -> int:
        """Decode the target from a prompt made by :meth:`encode_prompt`."""
        digits = [int(t) for t in prompt if 0 <= int(t) < NUM_DIGITS]
        return int("".join(map(str, digits)))

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[list[int]]:
        """``n`` prompts with targets drawn uniformly from ``[target_min, target_max]`` (deterministic in ``generator``)."""
        targets = torch.randint(self.target_min, self.target_max + 1, (n,), generator=generator)
        return [self.encode_prompt(int(t)) for t in targets]

    def reward(self, prompt: Sequence[int], response_tokens: Sequence[int]) -> float:
        """Reward of one response (see the module docstring); 0 for a response without EOS."""
        response = [int(t) for t in response_tokens]
        if not response or response[-1] != self.eos_id:
            return 0.0
        body = response[:-1]
        if any(not 0 <= t < NUM_DIGITS for t in body):
            return 0.0  # only digits may precede EOS; a policy over num_actions never breaks this
        target = self.target_of(prompt)
        total = sum(body)
        closeness = math.exp(-abs(total - target) / self.scale)
        return (1.0 - self.exact_bonus) * closeness + self.exact_bonus * float(total == target)

    def describe(self) -> str:
        """One paragraph for the README and the run log."""
        return (
            f"digit-sum: the prompt spells a target in [{self.target_min}, {self.target_max}]; the policy writes "
            f"digits then EOS (at most {self.max_response_len} tokens) and earns "
            f"{1 - self.exact_bonus:g} * exp(-|sum - target| / {self.scale:g}) + {self.exact_bonus:g} * [exact hit] "
            "(0 without EOS). Targets need different numbers of digits, so response lengths vary."
        )
