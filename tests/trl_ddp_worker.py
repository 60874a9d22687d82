"""Worker of test_trl_integration's two-process test: ``torchrun --nproc-per-node 2 -m tests.trl_ddp_worker OUT``.

Each process trains one optimizer step (DDP on gloo, CPU) of
- RLLossGRPOTrainer with prompt_mean, where prompt group 1 straddles the two processes and the
  micro-batches; its gradient is compared with the independent reference of tests/trl_reference.py
  over every process's batches (gathered);
- RLLossGRPOTrainer with token_mean and TRL's GRPOTrainer with loss_type="dapo" (steps_per_generation
  = GA, where TRL's normaliser is the step's token count), compared parameter by parameter.
Rank 0 writes the largest relative errors to OUT as JSON.
"""

from __future__ import annotations

import copy
import gc
import json
import sys
import tempfile

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from trl import GRPOTrainer

from benchmarks import _trl_workload as workload
from rl_loss import LossConfig
from rl_loss.integrations.trl import RLLossGRPOTrainer
from tests.trl_reference import reference_gradients, relative_errors

# 3 rows per micro-batch x GA 2 x 2 processes = 12 rows = 3 prompts x 4: process 0 holds rows 0-5
# (group 0 and half of group 1), process 1 rows 6-11 (the other half of group 1 and group 2).
SETTINGS = dict(per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=1)


class GradRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def run(cls: type, base: torch.nn.Module, out: str, **extra) -> tuple[dict[str, torch.Tensor], list[dict]]:
    batches: list[dict] = []

    class Recording(cls):
        def _compute_loss(self, model, inputs):
            batches.append({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
            return super()._compute_loss(model, inputs)

    recorder = GradRecorder()
    loss_type = extra.pop("loss_type", None)
    args = workload.grpo_config(out, **SETTINGS, **({} if loss_type is None else {"loss_type": loss_type}))
    trainer = Recording(model=copy.deepcopy(base), reward_funcs=workload.reward, args=args,
                        train_dataset=workload.prompts(), processing_class=workload.tokenizer(),
                        callbacks=[recorder], **extra)
    trainer.train()
    return recorder.grads, batches


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    gc.freeze()
    base = workload.model()
    out = tempfile.mkdtemp()
    results: dict[str, float] = {}

    grads, batches = run(RLLossGRPOTrainer, base, out, loss_config=LossConfig(aggregation="prompt_mean"))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, batches)
    step_batches = [batch for rank_batches in every for batch in rank_batches]
    groups = [{tuple(r.tolist()) for r in batch["prompt_ids"]} for batch in step_batches]
    results["groups_in_step"] = len(set().union(*groups))
    results["groups_on_both_processes"] = len(set().union(*groups[:2]) & set().union(*groups[2:]))
    _, reference = reference_gradients(copy.deepcopy(base), step_batches, "prompt_mean")
    results["prompt_mean_vs_reference"] = max(relative_errors(grads, reference).values())

    ours, _ = run(RLLossGRPOTrainer, base, out, loss_config=LossConfig(aggregation="token_mean"))
    theirs, _ = run(GRPOTrainer, base, out, loss_type="dapo")
    results["token_mean_vs_trl_dapo"] = max(relative_errors(ours, theirs).values())
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
