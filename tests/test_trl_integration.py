"""RLLossGRPOTrainer against TRL 1.16's real GRPOTrainer on CPU (docs/integrations/trl.md).

A tiny Qwen2 built from a config, a tokenizer built in code, distinct "a + b =" prompts and a Python
reward (benchmarks/_trl_workload.py): no download. Both trainers run ``train()`` from the same
initial weights and seed, so they generate the same completions (checked) and their losses and
gradients can be compared parameter by parameter. SGD with ``num_iterations=2`` and two optimizer
steps: the second step reuses the first step's completions, so its ratio differs from 1 and the clip
binds on some tokens.
"""

from __future__ import annotations

import copy
import gc
import json
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from benchmarks import _trl_workload as workload
from rl_loss import LossConfig
from rl_loss.integrations.trl import RLLossGRPOTrainer
from tests.trl_reference import first_pass_objective, reference_gradients, relative_errors

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-6  # float32, per parameter: ||g - g_trl|| / ||g_trl||
# Losses: per-token terms are O(0.1-1), so 1e-7 absolute is ~1e-6 of their scale. A step loss can be far
# smaller than its terms (a sample_mean loss at ratio 1 is -(1/N) sum_i A_i ~ 1e-7: group advantages sum to
# 0), where a relative tolerance would only measure float32 summation order.
LOSS_ATOL = 1e-7
REF_RTOL = 5e-6  # against tests/trl_reference.py: log-probs from the logits instead of TRL's fused LM head


class _GradRecorder(TrainerCallback):
    """Every parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})


def _recording(cls: type) -> type:
    class Recording(cls):
        """Keeps the batch of every micro-step (TRL's own keys are what both trainers read)."""

        def _compute_loss(self, model, inputs):
            self.batches.append(dict(inputs))
            return super()._compute_loss(model, inputs)

    return Recording


@dataclass
class Run:
    losses: list[float]
    grads: list[dict[str, torch.Tensor]]
    batches: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(repr=False)
    trainer: Any = field(repr=False)


@dataclass
class Tiny:
    tokenizer: Any
    model: torch.nn.Module
    data: Any
    out: str


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    # Speed only: the Trainer gc.collect()s at every train() start, which walks every object of the
    # imported libraries unless they are frozen; one thread avoids spinning against other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield Tiny(workload.tokenizer(), workload.model(), workload.prompts(), str(tmp_path_factory.mktemp("trl")))
    gc.unfreeze()
    torch.set_num_threads(threads)


def train(tiny: Tiny, loss_config: LossConfig | None = None, model: Any = None, **overrides: Any) -> Run:
    """Train TRL's GRPOTrainer (``loss_config=None``) or RLLossGRPOTrainer and record what it did."""
    recorder = _GradRecorder()
    kwargs = dict(
        model=copy.deepcopy(tiny.model) if model is None else model,
        reward_funcs=workload.reward,
        args=workload.grpo_config(tiny.out, **overrides),
        train_dataset=tiny.data,
        processing_class=tiny.tokenizer,
        callbacks=[recorder],
    )
    if loss_config is None:
        trainer = _recording(GRPOTrainer)(**kwargs)
    else:
        trainer = _recording(RLLossGRPOTrainer)(**kwargs, loss_config=loss_config)
    trainer.batches = []
    trainer.train()
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return Run(losses, recorder.grads, trainer.batches, history, trainer)


def largest_error(run: Run, reference: Run) -> float:
    return max(max(relative_errors(mine, ref).values()) for mine, ref in zip(run.grads, reference.grads, strict=True))


def assert_same_completions(run: Run, reference: Run) -> None:
    # the premise of every comparison: both trainers trained on the same samples
    assert len(run.batches) == len(reference.batches)
    for mine, ref in zip(run.batches, reference.batches, strict=True):
        assert torch.equal(mine["completion_ids"], ref["completion_ids"])
        assert torch.equal(mine["advantages"], ref["advantages"])


PARITY = {
    "sample_mean=grpo": ("grpo", LossConfig(aggregation="sample_mean")),
    "token_mean=dapo": ("dapo", LossConfig(aggregation="token_mean")),
    # Dr.GRPO with L = max_completion_length (6 in the workload)
    "constant=dr_grpo": ("dr_grpo", LossConfig(aggregation="constant", divisor=6.0)),
}
BATCHING = {
    "GA1x8": dict(gradient_accumulation_steps=1, per_device_train_batch_size=8),
    "GA2x4": dict(gradient_accumulation_steps=2, per_device_train_batch_size=4),
}


@pytest.mark.parametrize("batching", list(BATCHING))
@pytest.mark.parametrize("mode", list(PARITY))
def test_same_loss_and_gradient_as_trl(tiny, mode, batching):
    loss_type, loss_config = PARITY[mode]
    settings = dict(BATCHING[batching], num_iterations=2, max_steps=2)
    theirs = train(tiny, loss_type=loss_type, **settings)
    ours = train(tiny, loss_config, **settings)
    assert_same_completions(ours, theirs)
    assert len(ours.grads) == len(theirs.grads) == 2
    assert largest_error(ours, theirs) <= RTOL
    assert ours.losses == pytest.approx(theirs.losses, rel=RTOL, abs=LOSS_ATOL)


GENERATIONS = {
    # each optimizer step trains on half of a shuffled generation batch
    "generation over 2 steps": dict(steps_per_generation=2, gradient_accumulation_steps=1),
    # each optimizer step takes 2 generation batches, the second generated after the first trained
    "step over 2 generations": dict(steps_per_generation=1, gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("generations", list(GENERATIONS))
@pytest.mark.parametrize("mode", ["sample_mean=grpo", "constant=dr_grpo"])
def test_same_gradient_as_trl_whatever_steps_per_generation(tiny, mode, generations):
    loss_type, loss_config = PARITY[mode]
    settings = dict(GENERATIONS[generations], per_device_train_batch_size=4, max_steps=2)
    theirs = train(tiny, loss_type=loss_type, **settings)
    ours = train(tiny, loss_config, **settings)
    assert_same_completions(ours, theirs)
    assert largest_error(ours, theirs) <= RTOL
    assert ours.losses == pytest.approx(theirs.losses, rel=RTOL, abs=LOSS_ATOL)


def test_kl_through_sample_mean_matches_trl_grpo(tiny, tmp_path):
    # With loss_type="grpo" TRL's per-token beta * k3 is averaged per sample, then over samples: that is
    # the sample_mean KL of docs/objectives.md, so the two agree (without TRL's importance-ratio factor on the KL).
    path = str(tmp_path / "policy")
    tiny.model.save_pretrained(path)  # TRL builds the reference model from the policy's path
    settings = dict(beta=0.05, use_bias_correction_kl=False, num_iterations=2, max_steps=2,
                    gradient_accumulation_steps=2, per_device_train_batch_size=4)
    theirs = train(tiny, model=path, loss_type="grpo", **settings)
    ours = train(tiny, LossConfig(aggregation="sample_mean", kl_coef=0.05, kl_estimator="k3"), model=path, **settings)
    assert_same_completions(ours, theirs)
    assert largest_error(ours, theirs) <= RTOL
    assert ours.losses == pytest.approx(theirs.losses, rel=RTOL, abs=LOSS_ATOL)
    # (TRL's logged "kl" is a token mean; rl-loss logs kl_loss as a sample mean, like every metric)
    first, second = [entry["kl_loss"] for entry in ours.history if "kl_loss" in entry]
    assert first < 1e-9 < second  # the policy equals the reference until the first update


def test_prompt_mean_gradient_equals_the_independent_reference(tiny):
    # two prompts x 4 completions in 2 micro-batches of 4 shuffled rows: groups are split across
    # micro-batches, and each group's denominator is its token count over the whole step
    ours = train(tiny, LossConfig(aggregation="prompt_mean"), gradient_accumulation_steps=2,
                 per_device_train_batch_size=4)
    groups = {tuple(row.tolist()) for batch in ours.batches for row in batch["prompt_ids"]}
    assert len(groups) == 2 and len(ours.batches) == 2
    objective, reference = reference_gradients(copy.deepcopy(tiny.model), ours.batches, "prompt_mean")
    assert max(relative_errors(ours.grads[0], reference).values()) <= REF_RTOL
    assert ours.losses[0] == pytest.approx(objective, rel=REF_RTOL, abs=LOSS_ATOL)


def test_token_mean_divides_by_the_steps_own_tokens_when_a_generation_spans_two_steps(tiny):
    # steps_per_generation=2, GA=1: step 1 holds 4 of the 8 generated rows. TRL's dapo divides by half
    # of the generation's tokens instead (its normaliser assumes both halves have as many).
    ours = train(tiny, LossConfig(aggregation="token_mean"), steps_per_generation=2, gradient_accumulation_steps=1,
                 per_device_train_batch_size=4)
    objective, reference = reference_gradients(copy.deepcopy(tiny.model), ours.batches[:1], "token_mean")
    assert max(relative_errors(ours.grads[0], reference).values()) <= REF_RTOL
    assert ours.losses[0] == pytest.approx(objective, rel=REF_RTOL)
    assert ours.history[0]["tokens"] == int(ours.batches[0]["completion_mask"].sum())


@pytest.mark.parametrize("aggregation", ["prompt_mean", "constant", "token_mean"])
def test_gradient_is_the_same_for_every_accumulation_split(tiny, aggregation):
    # one generation batch of 8 completions as 1 x 8, 2 x 4 and 4 x 2 micro-batches: the summed
    # micro-step gradients equal the one-micro-batch gradient
    config = LossConfig(aggregation=aggregation, divisor=6.0 if aggregation == "constant" else None)
    runs = [train(tiny, config, gradient_accumulation_steps=ga, per_device_train_batch_size=8 // ga) for ga in (1, 2, 4)]
    whole = runs[0]
    for split in runs[1:]:
        rows = torch.cat([b["completion_ids"] for b in split.batches])
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, whole.batches[0]["completion_ids"].tolist()))
        assert largest_error(split, whole) <= RTOL
        assert split.losses == pytest.approx(whole.losses, rel=RTOL, abs=LOSS_ATOL)


def test_step_metrics_are_logged_through_trl_with_the_aggregation(tiny):
    ours = train(tiny, LossConfig(aggregation="constant", divisor=6.0), gradient_accumulation_steps=2,
                 per_device_train_batch_size=4)
    logged = ours.history[0]
    masks = [batch["completion_mask"].double() for batch in ours.batches]
    tokens = sum(float(m.sum()) for m in masks)
    assert logged["aggregation"] == "constant"
    assert logged["tokens"] == tokens
    # constant: sum w = T / (N L) with N = 8 samples, L = 6
    assert logged["loss_scale_vs_token_mean"] == pytest.approx(tokens / (8 * 6), rel=1e-12)
    assert logged["pg_loss"] == pytest.approx(logged["loss"], rel=1e-6)
    assert logged["pg_clipfrac"] == 0.0  # ratio 1 at a step's first pass
    # entropy: a sample_mean of the per-token entropy, recomputed from the initial model's logits
    model = copy.deepcopy(tiny.model)
    per_sample = []
    with torch.no_grad():
        for batch, mask in zip(ours.batches, masks, strict=True):
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)).logits
            start = batch["prompt_ids"].size(1) - 1
            logp = torch.log_softmax(logits[:, start : start + mask.size(1)].double(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
            per_sample += [float((entropy[r] * mask[r]).sum() / mask[r].sum()) for r in range(mask.size(0))]
    assert logged["entropy"] == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-5)


def test_step_figures_add_up_when_a_step_spans_two_generations(tiny):
    ours = train(tiny, LossConfig(aggregation="constant", divisor=6.0), **GENERATIONS["step over 2 generations"],
                 per_device_train_batch_size=4)
    logged = ours.history[0]
    tokens = sum(float(batch["completion_mask"].sum()) for batch in ours.batches)
    assert len(ours.batches) == 2 and logged["tokens"] == tokens
    # constant: sum w = T / (N L) with N = 2 x 4 samples, L = 6
    assert logged["loss_scale_vs_token_mean"] == pytest.approx(tokens / (8 * 6), rel=1e-6)
    assert logged["empty_step"] == 0.0 and logged["aggregation"] == "constant"


def test_evaluation_treats_each_eval_batch_as_one_step(tiny):
    trainer = _recording(RLLossGRPOTrainer)(
        model=copy.deepcopy(tiny.model), reward_funcs=workload.reward, processing_class=tiny.tokenizer,
        args=workload.grpo_config(tiny.out, per_device_eval_batch_size=8), train_dataset=tiny.data,
        eval_dataset=workload.prompts(4), loss_config=LossConfig(aggregation="prompt_mean"),
    )
    trainer.batches = []
    metrics = trainer.evaluate()
    # 4 prompts x 4 completions: two eval batches of two whole groups each
    assert len(trainer.batches) == 2
    objectives = [first_pass_objective(copy.deepcopy(tiny.model), [batch], "prompt_mean").item()
                  for batch in trainer.batches]
    assert metrics["eval_pg_loss"] == pytest.approx(sum(objectives) / 2, rel=REF_RTOL, abs=LOSS_ATOL)
    # prompt_mean: each of the P groups' weights sum to 1/P, so sum w = 1
    assert metrics["eval_loss_scale_vs_token_mean"] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.slow
def test_two_processes_give_the_step_objectives_gradient(tmp_path):
    # DDP on gloo: prompt group 1 straddles the processes (tests/trl_ddp_worker.py)
    out = tmp_path / "ddp.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
           "-m", "tests.trl_ddp_worker", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["groups_in_step"] == 3 and found["groups_on_both_processes"] == 1
    assert found["prompt_mean_vs_reference"] <= REF_RTOL
    assert found["token_mean_vs_trl_dapo"] <= RTOL


def test_step_benchmark_runs_and_prints_its_table(tiny, capsys):
    from benchmarks import trl_step

    assert trl_step.main(["--pairs", "2", "--modes", "token_mean", "--hidden", "32"]) == 0
    text = capsys.readouterr().out
    assert "| token_mean | dapo |" in text and "Target: optimizer step <= 1.05x" in text
