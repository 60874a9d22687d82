"""One optimizer step driven through verl's own data path, as verl's trainer and FSDP engine run it (CPU).

Driver: a padded ``DataProto`` -> ``to_tensordict`` -> ``left_right_2_no_padding`` (``RayPPOTrainer._update_actor``).
Engine (``FSDPEngine.forward_backward_batch``), per simulated DP rank: its shard of the samples, the
non-tensor counts it assigns (``dp_size``, ``batch_num_tokens`` summed over DP, and the trainer's
``global_batch_size``), verl's ``prepare_micro_batches``, then the loss function per micro-batch with
``model_output["log_probs"]`` in verl's no-padding layout, and one backward each. DDP/FSDP average the
gradients over DP: the step's gradient is the per-rank sum, averaged over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from verl import DataProto
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding

from rl_loss import ReducerFactory, StepBatch
from rl_loss.integrations.verl import RLLossPolicyLossConfig, actor_loss_config, add_step_scales, make_loss_fn
from rl_loss.surrogates import per_token_pg_loss

PROMPT_WIDTH, RESPONSE_WIDTH = 4, 5
UIDS = ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]  # 4 prompt groups of 2
TRAJECTORIES = ["t0", "t0", "t1", "t2", "t3", "t3", "t4", "t5"]  # t0 and t3 are two-segment trajectories
PROMPT_LENGTHS = [2, 4, 1, 3, 2, 4, 3, 1]
RESPONSE_LENGTHS = [5, 3, 1, 2, 5, 4, 2, 3]
ADVANTAGES = [1.0, -0.5, 0.7, -1.2, 0.3, -0.8, 1.5, -0.1]
DP_SHARDS = ([0, 3, 5, 6], [1, 2, 4, 7])  # DP=2, each rank's samples not in step order
N = len(UIDS)


@dataclass
class Step:
    """One step's samples: response masks, the trained log-probs (a leaf), the rollout's, advantages."""

    mask: torch.Tensor
    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor


def make_step(seed: int = 0) -> Step:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(N, RESPONSE_WIDTH, dtype=torch.float64)
    for i, length in enumerate(RESPONSE_LENGTHS):
        mask[i, :length] = 1
    mask[3] = 0  # a fully masked sample: still one of the N samples, adds no token
    mask[4, 1] = 0  # a masked token inside a response (e.g. a tool output)
    log_prob = (-(torch.rand(N, RESPONSE_WIDTH, generator=gen, dtype=torch.float64) * 2 + 0.05)).requires_grad_()
    # ratios exp(+-0.4): PPO's clip at 0.2 binds on some tokens, not all
    old = log_prob.detach() + (torch.rand(N, RESPONSE_WIDTH, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)[:, None].expand(N, RESPONSE_WIDTH).clone()
    return Step(mask, log_prob, old, advantages)


def actor_config(rl_loss: dict | None = None, loss_mode: str = "rl_loss", **actor_fields) -> ActorConfig:
    policy_loss = RLLossPolicyLossConfig(loss_mode=loss_mode, rl_loss=rl_loss or {})
    fields = {"strategy": "fsdp", "rollout_n": 2, "ppo_micro_batch_size_per_gpu": 2, "ppo_mini_batch_size": 4}
    return ActorConfig(**{**fields, **actor_fields, "policy_loss": policy_loss})


def data_proto(step: Step) -> DataProto:
    """The step as verl's trainer holds it: left-padded prompts, right-padded responses."""
    width = PROMPT_WIDTH + RESPONSE_WIDTH
    attention = torch.zeros(N, width, dtype=torch.int64)
    for i, (p, r) in enumerate(zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)):
        attention[i, PROMPT_WIDTH - p : PROMPT_WIDTH + r] = 1
    input_ids = (torch.arange(N * width).reshape(N, width) % 97 + 3) * attention
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp_min(0),
        "prompts": input_ids[:, :PROMPT_WIDTH],
        "responses": input_ids[:, PROMPT_WIDTH:],
        "response_mask": step.mask.clone(),
        "old_log_probs": step.old_log_prob.clone(),
        "advantages": step.advantages.clone(),
        "sample_id": torch.arange(N),
    }
    non_tensors = {"uid": np.array(UIDS, dtype=object), "trajectory": np.array(TRAJECTORIES, dtype=object)}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def model_log_probs(step: Step, sample_ids: torch.Tensor) -> torch.Tensor:
    """``model_output["log_probs"]`` of a micro-batch in verl's no-padding layout: one value per position of
    each sample's prompt + response, where the value at position p scores token p + 1."""
    pieces = []
    for i in sample_ids.tolist():
        p, r = PROMPT_LENGTHS[i], RESPONSE_LENGTHS[i]
        zeros = torch.zeros(p - 1, dtype=torch.float64)
        pieces += [zeros, step.log_prob[i, :r], torch.zeros(1, dtype=torch.float64)]
    return torch.cat(pieces)


def run_verl_step(
    config: ActorConfig, step: Step, micro_batch_size: int, whole_loss: bool = False, trajectory_key: str | None = None,
    max_token_len: int | None = None,
) -> tuple[list[float], torch.Tensor]:
    """Every micro-batch loss (in order) and the step's gradient w.r.t. ``step.log_prob``.

    ``max_token_len``: verl's dynamic batch size (``use_dynamic_bsz``): micro-batches of at most that many
    tokens, samples regrouped and reordered by length, instead of ``micro_batch_size`` samples in order.
    """
    batch = data_proto(step)
    if whole_loss:
        add_step_scales(batch, actor_loss_config(config), trajectory_key)
    data = left_right_2_no_padding(batch.to_tensordict())
    step_tokens = int(data["loss_mask"].sum())  # the engine all-reduces this over DP: the whole step's
    loss_fn = make_loss_fn(config) if whole_loss else partial(ppo_loss, config=config)
    step.log_prob.grad = None
    losses = []
    for shard in DP_SHARDS:
        local = tu.index_select_tensor_dict(data, shard)
        tu.assign_non_tensor(
            local, dp_size=len(DP_SHARDS), batch_num_tokens=step_tokens, global_batch_size=N,
            micro_batch_size_per_gpu=micro_batch_size, use_dynamic_bsz=max_token_len is not None,
            max_token_len_per_gpu=max_token_len,
        )
        micro_batches, _ = prepare_micro_batches(local, dp_group=None)
        for micro in micro_batches:
            output = {"log_probs": model_log_probs(step, micro["sample_id"])}
            loss, _ = loss_fn(model_output=output, data=micro, dp_group=None)
            loss.backward()
            losses.append(float(loss.detach()))
    return losses, step.log_prob.grad / len(DP_SHARDS)


def reference_objective(config: ActorConfig, step: Step) -> torch.Tensor:
    """J of the whole step from rl-loss's core (docs/aggregation.md): token weights of the step times the
    surrogate's per-token loss, with no micro-batches, no DP and no verl code."""
    loss_cfg = actor_loss_config(config)
    full = StepBatch(
        response_lengths=[RESPONSE_WIDTH] * N, total_lengths=[RESPONSE_WIDTH + PROMPT_WIDTH] * N,
        loss_masks=step.mask.reshape(-1), group_index=[UIDS.index(u) for u in UIDS],
        trajectory_index=[TRAJECTORIES.index(t) for t in TRAJECTORIES],
    )
    factory = ReducerFactory(loss_cfg)
    weights = factory.step_weights(full).weights
    per_token, _ = per_token_pg_loss(
        loss_cfg, step.log_prob.reshape(-1), step.old_log_prob.reshape(-1), step.advantages.reshape(-1),
        factory.pg_reducer(full),
    )
    return (torch.where(weights != 0, per_token, 0.0) * weights).sum()


def reference_gradient(config: ActorConfig, step: Step) -> torch.Tensor:
    step.log_prob.grad = None
    reference_objective(config, step).backward()
    grad = step.log_prob.grad.clone()
    step.log_prob.grad = None
    return grad
