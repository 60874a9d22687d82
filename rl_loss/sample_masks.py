"""Off-policy sequence masking, OPSM (DeepSeek-V3.2, arXiv:2512.02556; TRL's ``off_policy_mask_threshold``).

A sample with a negative advantage whose tokens the current policy has moved far from the policy that
sampled them teaches little and destabilises: OPSM drops its pg numerator (docs/corrections.md). The
test is a mean over the sample's loss-mask tokens on every CP rank, so under CP it needs the
caller-supplied all-reduce (the same one as GSPO's sequence ratio) and is refused without it.
"""

from __future__ import annotations

import math

from torch import Tensor

from rl_loss.inputs import describe, instance_of, same_length_floats
from rl_loss.reducer import TokenReducer
from rl_loss.rollout_correction import sample_means
from rl_loss.surrogates import CpAllReduce


def off_policy_sequence_mask(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    delta: float,
    pg_reducer: TokenReducer,
    cp_all_reduce: CpAllReduce | None = None,
) -> Tensor:
    """OPSM's keep mask per local token: 0 for every token of a sample i with A_i < 0 and
    KL_i = (1 / max(|o_i|, 1)) * sum_t m[i,t] * (logp_behaviour - logp) > delta, else 1.

    ``KL_i`` is the sample's mean of the per-token estimate ``log pi_behaviour - log pi_theta`` of
    KL(pi_behaviour || pi_theta) over its loss-mask tokens (pre-RS masks, every CP rank); everything is
    detached. ``behaviour_logprobs`` are the log-probs of the policy that sampled the responses: the
    rollout engine's when available, else the trainer's old log-probs (TRL's choice). Advantages are
    per token; a sample's tokens share its advantage, and A = 0 is kept (TRL: keep when A >= 0).

    Raises:
        ValueError: under CP (``pg_reducer.cp_size > 1``) without ``cp_all_reduce``.
    """
    n = instance_of("pg_reducer", pg_reducer, TokenReducer).num_local_tokens
    same_length_floats(n, logprobs=logprobs, behaviour_logprobs=behaviour_logprobs, advantages=advantages)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta (off_policy_mask_delta) must be a finite number >= 0 (got {describe(delta)})")
    kl = sample_means(behaviour_logprobs.detach() - logprobs.detach(), pg_reducer, cp_all_reduce,
                      "off_policy_mask_delta (OPSM)")
    drop = (advantages.detach() < 0) & (kl > delta)
    return (~drop).to(logprobs.dtype)
