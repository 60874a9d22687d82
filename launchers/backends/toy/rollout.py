"""Batched sampled generation from the toy policy, deterministic in a ``torch.Generator``.

All samples decode together. The prompts are run once (prefill); each decode step then feeds only
the newest token of every sample and reuses the keys/values of earlier positions through the
model's ``kv_exchange`` hook (:class:`KVCache`), and samples the next token of every unfinished
sample at ``logits / temperature``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from launchers.backends.toy.model import KVExchange, ToyPolicy
from launchers.backends.toy.task import DigitSumTask


@dataclass
class Rollout:
    """The samples of one rollout, in order: prompt 0's samples first, then prompt 1's, ...

    Attributes:
        prompts: prompt tokens of each sample (P_i tokens).
        responses: response tokens of each sample (R_i >= 1 tokens; ends with EOS unless it hit
            the max response length).
        group_index: prompt group of each sample (the index of its prompt).
        rollout_logprobs: per sample, the sampling log-prob of each response token (length R_i).
        rewards: per-sample reward, filled by :func:`sample_rollout` (None from :func:`generate`).
    """

    prompts: list[list[int]]
    responses: list[list[int]]
    group_index: list[int]
    rollout_logprobs: list[Tensor]
    rewards: Tensor | None = field(default=None)

    @property
    def num_samples(self) -> int:
        """N, samples in the rollout."""
        return len(self.responses)

    @property
    def sequences(self) -> list[list[int]]:
        """Full token ids (prompt then response) of each sample, length T_i."""
        return [p + r for p, r in zip(self.prompts, self.responses, strict=True)]

    @property
    def response_lengths(self) -> list[int]:
        """R_i of each sample."""
        return [len(r) for r in self.responses]

    @property
    def total_lengths(self) -> list[int]:
        """T_i = P_i + R_i of each sample."""
        return [len(p) + len(r) for p, r in zip(self.prompts, self.responses, strict=True)]

    @property
    def loss_masks(self) -> list[Tensor]:
        """1 for every generated token, EOS included (float64, length R_i)."""
        return [torch.ones(len(r), dtype=torch.float64) for r in self.responses]


class KVCache:
    """A ``kv_exchange`` that appends each call's keys/values to a per-layer cache.

    The model calls its exchange once per layer, in layer order, on every forward; the cache counts
    calls to know the layer. Each forward sees the keys of every earlier forward plus its own, so
    decoding one token per forward attends to the whole sequence so far.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.layers: list[tuple[Tensor, Tensor, Tensor, Tensor] | None] = [None] * num_layers
        self.calls = 0

    def __call__(self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        layer = self.calls % self.num_layers
        self.calls += 1
        cached = self.layers[layer]
        if cached is not None:
            k = torch.cat([cached[0], k], dim=2)
            v = torch.cat([cached[1], v], dim=2)
            positions = torch.cat([cached[2], positions], dim=1)
            valid = torch.cat([cached[3], valid], dim=1)
        self.layers[layer] = (k, v, positions, valid)
        return k, v, positions, valid


@torch.no_grad()
def generate(
    model: ToyPolicy,
    prompts: Sequence[Sequence[int]],
    samples_per_prompt: int,
    max_response_len: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    eos_id: int = 10,
) -> Rollout:
    """Sample ``samples_per_prompt`` responses to each prompt, all in one batch.

    Args:
        model: the policy (sampling uses its current weights; mode is left unchanged).
        prompts: prompt tokens of each prompt.
        samples_per_prompt: responses per prompt (one prompt group each).
        max_response_len: most response tokens, EOS included; longer responses are truncated.
        generator: the source of randomness (CPU generator); same state, same rollout.
        temperature: sampling temperature (> 0).
        eos_id: the token that ends a response.

    Returns:
        A :class:`Rollout` without rewards.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if samples_per_prompt < 1 or max_response_len < 1:
        raise ValueError("samples_per_prompt and max_response_len must be >= 1")
    device = next(model.parameters()).device
    pad_id = model.config.pad_id
    expanded = [list(p) for p in prompts for _ in range(samples_per_prompt)]
    group_index = [g for g in range(len(prompts)) for _ in range(samples_per_prompt)]
    n = len(expanded)
    prompt_lens = torch.tensor([len(p) for p in expanded], dtype=torch.long)
    if int(prompt_lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    width = int(prompt_lens.max())
    prefill = torch.full((n, width), pad_id, dtype=torch.long)
    for i, p in enumerate(expanded):
        prefill[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    positions = torch.arange(width).expand(n, width)
    cache: KVExchange = KVCache(model.config.n_layers)
    logits = model(prefill.to(device), positions.to(device), (positions < prompt_lens[:, None]).to(device), cache)
    rows = torch.arange(n)
    last_logits = logits.cpu()[rows, prompt_lens - 1]  # predicts each sample's first response token

    responses = torch.full((n, max_response_len), pad_id, dtype=torch.long)
    logprobs = torch.zeros(n, max_response_len, dtype=torch.float64)
    resp_lens = torch.zeros(n, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for step in range(max_response_len):
        # sample on CPU in float64 so the draw depends only on the generator and the logits
        logp = torch.log_softmax(last_logits.to(torch.float64) / temperature, dim=-1)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        active = ~done
        responses[active, step] = nxt[active]
        logprobs[active, step] = logp[rows, nxt][active]
        resp_lens += active.long()
        done = done | (nxt == eos_id)
        if bool(done.all()) or step == max_response_len - 1:
            break
        # feed each new token at its own position; finished samples feed an invalid pad slot
        new_pos = (prompt_lens + step)[:, None]
        new_tok = torch.where(active, nxt, torch.full_like(nxt, pad_id))[:, None]
        logits = model(new_tok.to(device), new_pos.to(device), active[:, None].to(device), cache)
        last_logits = logits.cpu()[:, 0]
    responses_list = [responses[i, : int(resp_lens[i])].tolist() for i in range(n)]
    rollout_logprobs = [logprobs[i, : int(resp_lens[i])].clone() for i in range(n)]
    return Rollout(expanded, responses_list, group_index, rollout_logprobs)


def sample_rollout(
    model: ToyPolicy,
    task: DigitSumTask,
    num_prompts: int,
    samples_per_prompt: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> Rollout:
    """Draw ``num_prompts`` prompts from ``task``, sample responses and score them."""
    prompts = task.sample_prompts(num_prompts, generator)
    rollout = generate(model, prompts, samples_per_prompt, task.max_response_len, generator, temperature, task.eos_id)
    rollout.rewards = torch.tensor(
        [task.reward(p, r) for p, r in zip(rollout.prompts, rollout.responses, strict=True)], dtype=torch.float64
    )
    return rollout
