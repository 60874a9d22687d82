"""megatron-core's own schedule drives the Megatron loss funcs on CPU: the gradient is grad J (docs/exactness.md, docs/integrations/megatron.md).

One process, world size 1, a gloo process group. megatron-core 0.16.1's real
``forward_backward_no_pipelining`` (``forward_step`` -> ``forward_step_calc_loss`` -> ``backward_step``
over several micro-batches) calls our ``loss_func``; its real ``finalize_model_grads`` is
``config.finalize_model_grads_func`` and divides by the token count under ``calculate_per_token_loss``.

Patched: only the ``total_num_tokens`` accumulator, ``torch.zeros([], dtype=torch.int, device="cuda")``
in ``pipeline_parallel/schedules.py`` (the one CUDA-only line of the schedule), which is made on the CPU;
see :class:`CpuTokenAccumulator`. Nothing else of megatron-core is changed or copied.

megatron-core's ``DistributedDataParallel`` cannot run on CPU: ``_ParamAndGradBuffer.__init__``
allocates the contiguous gradient buffer with ``device=torch.cuda.current_device()``
(``distributed/param_and_grad_buffer.py:803-807``), which raises on a CPU build of torch
(:func:`test_megatron_ddp_needs_cuda`). So the model chunk itself provides the two DDP methods that
``finalize_model_grads`` calls (``finish_grad_sync``, ``scale_gradients``), doing what DDP does with
them on DP x CP = 1 rank. The CUDA test in ``tests/test_megatron_integration.py`` runs the real DDP.
"""

from __future__ import annotations

import inspect
import socket
import warnings
from collections.abc import Callable
from typing import get_args

import pytest
import torch
from torch import Tensor

from rl_loss import LossConfig, ReducerFactory, StepBatch
from rl_loss.integrations import megatron as adapter
from tests.test_megatron_integration import (
    DIVISOR,
    ENTROPY_COEF,
    FEATURES,
    KL_COEF,
    REL,
    MicroBatch,
    Step,
    assert_close,
    new_transformer_config,
    partition,
    policy_inputs,
    random_step,
    reference_policy_objective,
    step_objective,
    toy_entropy,
    toy_logprobs,
    toy_token_loss,
)

schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Apex is not installed:UserWarning"),
    pytest.mark.filterwarnings("ignore::rl_loss.config.RelabelNotice"),  # the legacy-flag case, on purpose
]

NUM_MICROBATCHES = 4
ACCUMULATOR_LINE = 'total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")'


def aggregation_modes() -> tuple[str, ...]:
    """Every mode of LossConfig's literal, read now: modes added later are covered without editing this file."""
    return get_args(LossConfig.model_fields["aggregation"].annotation)


# (case id, LossConfig fields): every mode, plus token_mean spelt as Megatron's legacy flag
CASES = {mode: {"aggregation": mode} for mode in aggregation_modes()} | {
    "token_mean (legacy flag)": {"calculate_per_token_loss": True}
}


def factory_for(fields: dict, **extra) -> ReducerFactory:
    divisor = DIVISOR if fields.get("aggregation") == "constant" else None
    return ReducerFactory(LossConfig(**fields, divisor=divisor, **extra))


def trajectories_of(step: Step) -> list[int]:
    """Trajectory ids for trajectory_mean: pairs of consecutive samples of one prompt group (docs/aggregation.md)."""
    keys = [(g, step.groups[:i].count(g) // 2) for i, g in enumerate(step.groups)]
    ids = {key: n for n, key in enumerate(dict.fromkeys(keys))}
    return [ids[key] for key in keys]


def step_batch(step: Step, mode: str) -> StepBatch:
    batch = step.batch()
    if mode == "trajectory_mean":  # docs/aggregation.md: the mode needs trajectory_index on the StepBatch
        batch = StepBatch(
            response_lengths=step.response_lengths,
            total_lengths=step.total_lengths,
            loss_masks=[torch.tensor(m, dtype=torch.float32) for m in step.masks],
            group_index=step.groups,
            trajectory_index=trajectories_of(step),
        )
    return batch


def objective(losses: list[Tensor], step: Step, mode: str) -> Tensor:
    """J of docs/aggregation.md; trajectory_mean is prompt_mean's formula over trajectories instead of prompt groups."""
    if mode == "trajectory_mean":
        return step_objective(losses, step.masks, trajectories_of(step), "prompt_mean")
    return step_objective(losses, step.masks, step.groups, mode)


# --- megatron-core's runtime on one CPU process --------------------------------------------------------------


class CpuTokenAccumulator:
    """``schedules.torch`` during a test: torch itself, except that ``torch.zeros([], dtype=torch.int,
    device="cuda")`` -- the ``total_num_tokens`` accumulator, the one CUDA-only line of the schedule --
    is made on the CPU. Any other ``torch.zeros`` on CUDA is left alone (and fails, as it should)."""

    def __init__(self):
        self.patched_calls = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def zeros(self, *args, **kwargs):
        if args == ([],) and kwargs == {"dtype": torch.int, "device": "cuda"}:
            self.patched_calls += 1
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


@pytest.fixture(scope="module")
def gloo_world():
    """A one-process gloo world (TCP store on localhost) and megatron-core's process-group collection over it."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    assert not torch.distributed.is_initialized(), "another test left a process group behind"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    world = torch.distributed.group.WORLD
    yield ProcessGroupCollection(tp=world, cp=world, embd=None, pos_embd=None, pp=world, dp_cp=world)
    torch.distributed.destroy_process_group()


@pytest.fixture
def accumulator(monkeypatch) -> CpuTokenAccumulator:
    patch = CpuTokenAccumulator()
    monkeypatch.setattr(schedules, "torch", patch)
    # float64 throughout: finalize_model_grads computes 1.0 / num_tokens (an int tensor) in the default dtype
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield patch
    torch.set_default_dtype(default_dtype)


class ModelChunk(torch.nn.Module):
    """A float64 model chunk with what the schedule and finalize_model_grads ask of one.

    ``forward`` maps a micro-batch to the model output the loss func reads; ``finish_grad_sync`` and
    ``scale_gradients`` are DDP's, as DDP does them on DP x CP = 1 rank: pre-scale by
    ``gradient_scaling_factor`` (``1 / |DP x CP|`` = 1) and sum over one rank, then multiply by the
    factor ``finalize_model_grads`` gives (``distributed/distributed_data_parallel.py:254-288``).
    """

    def __init__(self, config, theta: Tensor, output: Callable[[Tensor, MicroBatch], Tensor]):
        from megatron.core.enums import ModelType

        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.theta = torch.nn.Parameter(theta.detach().clone())
        self.output = output
        self.synced = 0

    def set_input_tensor(self, input_tensor) -> None:  # the only pipeline stage
        pass

    def forward(self, mb: MicroBatch) -> Tensor:
        return self.output(self.theta, mb)

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        self.synced += 1

    def scale_gradients(self, scaling_factor: float) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scaling_factor)


def megatron_config(calculate_per_token_loss: bool):
    from megatron.core.distributed import finalize_model_grads

    config = new_transformer_config(calculate_per_token_loss)
    config.finalize_model_grads_func = finalize_model_grads  # megatron-core's own
    return config


def run_schedule(pg_collection, config, step: Step, theta: Tensor, output, build_loss_func, seed: int):
    """megatron-core's forward_backward_no_pipelining over NUM_MICROBATCHES micro-batches of ``step``."""
    model = ModelChunk(config, theta, output)
    micro_batches = partition(step, 1, 1, NUM_MICROBATCHES, seed)

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        return chunk(mb), build_loss_func(mb)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # megatron-core's notes about unused features
        reports = schedules.forward_backward_no_pipelining(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=NUM_MICROBATCHES,
            seq_length=max(step.total_lengths),  # unused by this schedule
            micro_batch_size=1,  # unused by this schedule
            pg_collection=pg_collection,
        )
    return model, reports


def step_value(reports: list[dict[str, Tensor]], key: str) -> float:
    """Megatron-LM's reduction of 2-element report values: sum over micro-batches, [0] / [1]."""
    total = torch.vstack([r[key].view(-1) for r in reports]).sum(dim=0)
    return float(total[0] / total[1])


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def token_losses(step: Step) -> Callable[[Tensor, MicroBatch], Tensor]:
    """The model output of a micro-batch: the toy per-token losses of its samples, in its order."""

    def output(param, mb):
        return torch.cat([toy_token_loss(step.features[i], param) for i in mb.samples])

    return output


def pg_loss_funcs(factory: ReducerFactory, batch: StepBatch, config) -> Callable[[MicroBatch], Callable]:
    """The adapter's pg ``loss_func`` of each micro-batch, under Megatron config ``config``."""

    def build(mb):
        return adapter.megatron_loss_func(
            factory, batch, sample_indices=mb.samples, num_microbatches=NUM_MICROBATCHES, dp_cp_size=1,
            megatron_config=config,
        )

    return build


# --- the tests --------------------------------------------------------------------------------------------------


def test_the_patched_line_is_the_only_cuda_allocation_of_the_schedule():
    source = inspect.getsource(schedules.forward_backward_no_pipelining)
    assert source.count('device="cuda"') == 1 and ACCUMULATOR_LINE in source


@pytest.mark.parametrize("case", CASES)
def test_real_schedule_gradient_is_grad_of_step_objective(case, gloo_world, accumulator, record_property):
    seed = 3100 + list(CASES).index(case)
    factory = factory_for(CASES[case])
    mode, per_token = factory.aggregation, factory.config.calculate_per_token_loss
    step = random_step(seed)
    batch = step_batch(step, mode)
    theta = torch.randn(FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    config = megatron_config(per_token)

    model, reports = run_schedule(gloo_world, config, step, theta, token_losses(step),
                                  pg_loss_funcs(factory, batch, config), seed)

    param = theta.clone().requires_grad_(True)
    expected = objective([toy_token_loss(f, param) for f in step.features], step, mode)
    (expected_grad,) = torch.autograd.grad(expected, param)
    assert (accumulator.patched_calls, model.synced, len(reports)) == (1, 1, NUM_MICROBATCHES)
    record_property("grad_relative_error", relative_error(model.theta.grad, expected_grad))  # --junitxml keeps it
    assert_close(model.theta.grad, expected_grad, rel=REL)
    assert step_value(reports, "pg_loss") == pytest.approx(float(expected.detach()), rel=REL)


@pytest.mark.parametrize("case", CASES)
def test_real_schedule_policy_loss_gradient_is_grad_of_full_loss(case, gloo_world, accumulator, record_property):
    seed = 3200 + list(CASES).index(case)
    factory = factory_for(CASES[case], eps_clip=0.2, eps_clip_high=0.28, kl_coef=KL_COEF, entropy_coef=ENTROPY_COEF)
    mode, per_token = factory.aggregation, factory.config.calculate_per_token_loss
    step = random_step(seed)
    batch = step_batch(step, mode)
    theta = torch.randn(FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    inputs = policy_inputs(step, theta, seed)
    config = megatron_config(per_token)

    def cut(values, mb):
        return torch.cat([values[i] for i in mb.samples])

    def output(param, mb):
        logp = torch.cat([toy_logprobs(step.features[i], param) for i in mb.samples])
        entropy = torch.cat([toy_entropy(step.features[i], param) for i in mb.samples])
        return torch.stack([logp, entropy])

    def build(mb):
        return adapter.megatron_policy_loss_func(
            factory, batch, sample_indices=mb.samples, num_microbatches=NUM_MICROBATCHES, dp_cp_size=1,
            megatron_config=config, old_logprobs=cut(inputs.old_logprobs, mb), advantages=cut(inputs.advantages, mb),
            ref_logprobs=cut(inputs.ref_logprobs, mb), tis_weights=cut(inputs.tis, mb), rs_mask=cut(inputs.rs, mb),
            logprobs_from_output=lambda out: (out[0], out[1]),
        )

    model, reports = run_schedule(gloo_world, config, step, theta, output, build, seed)

    param = theta.clone().requires_grad_(True)
    if mode == "trajectory_mean":  # docs/aggregation.md: prompt_mean's formula over trajectories
        expected = reference_policy_objective(step, param, inputs, "prompt_mean", pg_units=trajectories_of(step))
    else:
        expected = reference_policy_objective(step, param, inputs, mode)
    (expected_grad,) = torch.autograd.grad(expected["loss"], param)
    record_property("grad_relative_error", relative_error(model.theta.grad, expected_grad))
    assert_close(model.theta.grad, expected_grad, rel=REL)
    for key in ("pg_loss", "kl_loss", "entropy"):
        assert step_value(reports, key) == pytest.approx(float(expected[key].detach()), rel=1e-10), key


@pytest.mark.parametrize("case", CASES)
def test_disagreeing_megatron_flag_raises_at_the_first_micro_batch(case, gloo_world, accumulator):
    factory = factory_for(CASES[case])
    step = random_step(3300)
    batch = step_batch(step, factory.aggregation)
    config = megatron_config(not factory.config.calculate_per_token_loss)
    build, calls = pg_loss_funcs(factory, batch, config), []

    def counted(mb):
        calls.append(mb)
        return build(mb)

    theta = torch.ones(FEATURES, dtype=torch.float64)
    with pytest.raises(ValueError, match="calculate_per_token_loss: Megatron's config has"):
        run_schedule(gloo_world, config, step, theta, token_losses(step), counted, seed=3300)
    assert len(calls) == 1  # the first micro-batch, before any backward


def test_unchecked_token_mean_under_a_config_without_the_flag_trains_on_a_wrong_gradient(
    gloo_world, accumulator, monkeypatch, record_property
):
    # Why megatron_config is required: with the check bypassed, the schedule divides each micro-batch's
    # token sum by its own token count and finalize_model_grads does not divide at all.
    monkeypatch.setattr(adapter, "check_megatron_config", lambda factory, config: None)
    factory = factory_for({"aggregation": "token_mean"})
    step = random_step(3400)
    batch = step.batch()
    theta = torch.randn(FEATURES, generator=torch.Generator().manual_seed(3400), dtype=torch.float64)
    config = megatron_config(False)

    model, _ = run_schedule(gloo_world, config, step, theta, token_losses(step),
                            pg_loss_funcs(factory, batch, config), seed=3400)
    param = theta.clone().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(objective([toy_token_loss(f, param) for f in step.features], step,
                                                     "token_mean"), param)
    record_property("grad_relative_error", relative_error(model.theta.grad, expected_grad))
    assert relative_error(model.theta.grad, expected_grad) > 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="documents the CPU limitation")
def test_megatron_ddp_needs_cuda(gloo_world):
    # If this starts to pass (DDP on CPU), add a DP 2 x CP 2 torchrun test with megatron-core's DDP.
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    try:
        config = new_transformer_config(False)
        with pytest.raises(AssertionError, match="Torch not compiled with CUDA enabled") as err:
            DistributedDataParallel(config, DistributedDataParallelConfig(), torch.nn.Linear(FEATURES, 1))
        megatron_frames = [str(entry.path) for entry in err.traceback if "megatron" in str(entry.path)]
        assert megatron_frames[-1].endswith("distributed/param_and_grad_buffer.py")
    finally:
        parallel_state.destroy_model_parallel()
