"""Independent references for the TRL tests: the objectives of docs/aggregation.md by explicit per-sample loops.

Nothing here uses rl_loss: the per-token log-probs come from the model's logits (log_softmax and a
gather), the per-token loss at a step's first pass is the on-policy PPO term ``-A * exp(logp - sg(logp))``
(value -A, gradient -A * grad logp; the clip does not bind at ratio 1), and the step objective is
written out from the table of docs/aggregation.md, one sample and one group at a time. Prompt groups are keyed by
the prompt's token ids (the test prompts are all distinct), not by any index the trainer adds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor


def completion_logprobs(model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
    """log pi(completion token | prefix) of every completion position, B x C, from the model's logits."""
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    start = prompt_ids.size(1) - 1  # the logit at position p scores token p + 1
    scored = logits[:, start : start + completion_ids.size(1)]
    return torch.log_softmax(scored, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def first_pass_objective(model: torch.nn.Module, batches: list[dict[str, Any]], aggregation: str,
                         divisor: float | None = None) -> Tensor:
    """J of one optimizer step whose micro-batches (on every process) are ``batches``, at ratio 1."""
    samples = []  # (group key, mask, per-token loss)
    for batch in batches:
        logp = completion_logprobs(model, batch)
        ratio = torch.exp(logp - logp.detach())
        for row in range(logp.size(0)):
            key = tuple(batch["prompt_ids"][row].tolist())
            mask = batch["completion_mask"][row].float()
            samples.append((key, mask, -batch["advantages"][row] * ratio[row]))
    n = len(samples)
    if aggregation == "sample_mean":  # (1/N) sum_i sum_t m l / max(|o_i|, 1)
        return sum((m * loss).sum() / m.sum().clamp_min(1) for _, m, loss in samples) / n
    if aggregation == "token_mean":  # sum_{i,t} m l / max(T, 1)
        return sum((m * loss).sum() for _, m, loss in samples) / sum(m.sum() for _, m, _ in samples).clamp_min(1)
    if aggregation == "constant":  # sum_{i,t} m l / (N L)
        return sum((m * loss).sum() for _, m, loss in samples) / (n * divisor)
    if aggregation == "prompt_mean":  # (1/P) sum_g [ sum_{i in g} sum_t m l / max(sum_{i in g} |o_i|, 1) ]
        sums: dict[tuple, Tensor] = defaultdict(lambda: torch.zeros(()))
        tokens: dict[tuple, Tensor] = defaultdict(lambda: torch.zeros(()))
        for key, m, loss in samples:
            sums[key] = sums[key] + (m * loss).sum()
            tokens[key] = tokens[key] + m.sum()
        return sum(sums[key] / tokens[key].clamp_min(1) for key in sums) / len(sums)
    raise ValueError(f"no reference for aggregation={aggregation!r}")


def reference_gradients(model: torch.nn.Module, batches: list[dict[str, Any]], aggregation: str,
                        divisor: float | None = None) -> tuple[float, dict[str, Tensor]]:
    """(J, dJ/dparameter for every parameter) of :func:`first_pass_objective`."""
    model.zero_grad(set_to_none=True)
    objective = first_pass_objective(model, batches, aggregation, divisor)
    objective.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(objective), grads


def relative_errors(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """Per parameter: ||g - g_ref|| / ||g_ref|| (0 where both are 0)."""
    errors = {}
    for name, ref in reference.items():
        scale = float(ref.norm())
        diff = float((grads[name] - ref).norm())
        errors[name] = diff / scale if scale > 0 else diff
    return errors
