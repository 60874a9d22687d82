"""rl_loss.integrations.slime: the pg-loss reducer hook under slime's / miles' call-site contracts.

Neither framework installs from PyPI, so their contracts are restated here, each line citing the
repository, commit and file it restates:

- SLIME = THUDM/slime @ 624b824a898ab0ec1fcb4d373004c7f3852bf515
- MILES = radixark/miles @ 31f1ca961a94cb860cec3b2dea34ec332bfa8f76
- megatron-core 0.16.1 (installed), ``megatron/core/...``

The expected objective J is the formula of docs/aggregation.md written out as plain loops.
"""

from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch

from rl_loss import LossConfig
from rl_loss.integrations.slime_reducer import (
    EmptySampleTokenCountWarning,
    micro_batch_max_seq_lens,
    pg_loss_reducer_hook,
)

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

SLIME = "THUDM/slime@624b824a"
MILES = "radixark/miles@31f1ca96"


# --- the frameworks' side, restated ------------------------------------------------------------------------


@pytest.fixture
def megatron(monkeypatch):
    """megatron-core's parallel_state getters and Megatron-LM's get_args, as the adapter reads them.

    The hook receives no CP rank, size or layout (SLIME slime/backends/megatron_utils/loss.py:1099-1101);
    it reads ``parallel_state.get_context_parallel_{rank,world_size}`` and ``global_vars.get_args().qkv_format``
    (MILES miles/backends/megatron_utils/model.py:25 imports that get_args; SLIME has no qkv_format: thd only).
    """
    state = types.SimpleNamespace(cp_rank=0, cp_size=1, args=types.SimpleNamespace(qkv_format="thd"))
    parallel_state = types.ModuleType("megatron.core.parallel_state")
    parallel_state.get_context_parallel_rank = lambda: state.cp_rank
    parallel_state.get_context_parallel_world_size = lambda: state.cp_size
    global_vars = types.ModuleType("megatron.training.global_vars")
    global_vars.get_args = lambda: state.args
    core = types.ModuleType("megatron.core")
    core.parallel_state = parallel_state
    training = types.ModuleType("megatron.training")
    training.global_vars = global_vars
    root = types.ModuleType("megatron")
    root.core, root.training = core, training
    for name, module in {"megatron": root, "megatron.core": core, "megatron.core.parallel_state": parallel_state,
                         "megatron.training": training, "megatron.training.global_vars": global_vars}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return state


def local_response_slice(values, total_length, response_length, cp_rank, cp_size, qkv_format, max_seq_len):
    """This CP rank's per-token values of one sample, as slime / miles lay them out.

    MILES miles/backends/training_utils/cp_utils.py:19-66 (SLIME slime/backends/megatron_utils/cp_utils.py:9-44
    is the thd case): chunk c = ceil(T / 2cp) (thd) or ceil(max_seq_len / 2cp) (bshd); rank r holds positions
    [r c, (r+1) c) and [(2cp-1-r) c, (2cp-r) c); logits at [max(a, P-1), min(b, T-1)) score tokens one to the
    right; SLIME loss.py:170-185 concatenates the two pieces.
    """
    if cp_size == 1:
        return values
    prompt = total_length - response_length
    width = total_length if qkv_format == "thd" else max_seq_len
    c = (width + 2 * cp_size - 1) // (2 * cp_size)
    pieces = []
    for a, b in ((cp_rank * c, (cp_rank + 1) * c), ((2 * cp_size - cp_rank - 1) * c, (2 * cp_size - cp_rank) * c)):
        lo, hi = max(a, prompt - 1), min(b, total_length - 1)
        if lo < hi:  # token offsets (lo + 1, hi + 1), response index = token offset - prompt
            pieces.append(values[lo + 1 - prompt : hi + 1 - prompt])
    return torch.cat(pieces) if pieces else values[:0]


def slime_step_loss(hook, megatron, step, dp_microbatches, cp_size, per_token, qkv_format="thd"):
    """The quantity whose gradient slime applies for one optimizer step, summed the way the frameworks sum it.

    step: (total_lengths, response_lengths, loss_masks, values) of every sample, one rollout per sample.
    dp_microbatches: per DP rank, its micro-batches as lists of sample numbers (equal counts per rank:
    SLIME slime/utils/dp_schedule.py:160-176 aligns them).
    """
    total_lengths, response_lengths, masks, values = step
    dp = len(dp_microbatches)
    rollouts = len(total_lengths)  # Q: SLIME dp_schedule.py:144-150, one rollout per sample here
    max_seq_len = None
    if qkv_format == "bshd":  # MILES miles/backends/training_utils/data.py:78-90: the padded width of the data
        max_seq_len = -(-max(total_lengths) // 8) * 8
    megatron.args.qkv_format, megatron.cp_size = qkv_format, cp_size
    numerator, token_count = 0.0, 0.0
    for microbatches in dp_microbatches:
        num_microbatches = len(microbatches)
        for mb in microbatches:
            tl = [total_lengths[i] for i in mb]
            rl = [response_lengths[i] for i in mb]
            lm = [masks[i] for i in mb]
            # SLIME loss.py:1316: num_tokens = sum_i clamp_min(loss_mask.sum(), 1) (full masks, every CP rank)
            num_tokens = sum(max(float(m.sum()), 1.0) for m in lm)
            for cp_rank in range(cp_size):
                megatron.cp_rank = cp_rank
                # SLIME loss.py:1095-1105: reducer = fn(total_lengths, response_lengths, masks, flag); reducer(pg_loss);
                # under bshd the loss-function bridge makes MILES' batch["max_seq_lens"] visible around that call
                with micro_batch_max_seq_lens({"max_seq_lens": [max_seq_len] * len(mb)} if max_seq_len else {}):
                    reducer = hook(tl, rl, lm, per_token)
                local = torch.cat([local_response_slice(values[i], total_lengths[i], response_lengths[i], cp_rank,
                                                        cp_size, qkv_format, max_seq_len) for i in mb])
                x = float(reducer(local))
                if per_token:
                    # SLIME loss.py:1360-1361: loss * cp_size; megatron/core/pipeline_parallel/schedules.py:256-263:
                    # left alone with calculate_per_token_loss; distributed_data_parallel.py: plain sum over DP x CP
                    numerator += x * cp_size
                    token_count += num_tokens  # schedules.py:596-685: summed, then all-reduced over DP x CP
                else:
                    # SLIME loss.py:1351-1359: loss * num_microbatches / Q * |DP x CP| (MILES training_utils/loss.py:186-199)
                    loss = x * num_microbatches / rollouts * (dp * cp_size)
                    # schedules.py:256-263: / clamp(num_tokens=1, 1) / num_microbatches; DDP: x 1/|DP x CP|, summed
                    numerator += loss / num_microbatches / (dp * cp_size)
    # finalize_model_grads.py:484-497 divides by the DP x CP sum of num_tokens with the per-token flag
    return numerator / token_count if per_token else numerator


def objective(mode, masks, values, divisor=None):
    """J of docs/aggregation.md, one loop per formula."""
    n = len(masks)
    sums = [float((m * v).sum()) for m, v in zip(masks, values, strict=True)]
    counts = [float(m.sum()) for m in masks]
    if mode == "sample_mean":  # (1/N) sum_i sum_t m l / max(|o_i|, 1)
        return sum(s / max(c, 1.0) for s, c in zip(sums, counts, strict=True)) / n
    if mode == "token_mean":  # sum m l / max(T, 1)
        return sum(sums) / max(sum(counts), 1.0)
    return sum(sums) / (n * divisor)  # constant: sum m l / (N L)


def random_step(rng, n, full_masks=True):
    total_lengths, response_lengths, masks, values = [], [], [], []
    for _ in range(n):
        r = rng.randint(1, 13)
        t = r + rng.randint(1, 9)
        mask = torch.tensor([float(rng.random() < 0.8) for _ in range(r)], dtype=torch.float64)
        if full_masks and mask.sum() == 0:
            mask[rng.randrange(r)] = 1.0
        total_lengths.append(t)
        response_lengths.append(r)
        masks.append(mask)
        values.append(torch.tensor([rng.uniform(-2, 2) for _ in range(r)], dtype=torch.float64))
    return total_lengths, response_lengths, masks, values


def random_partition(rng, n, dp):
    """Samples shuffled into dp ranks x k micro-batches each (every micro-batch non-empty)."""
    order = list(range(n))
    rng.shuffle(order)
    k = rng.randint(1, n // dp)
    cuts = sorted(rng.sample(range(1, n), dp * k - 1))
    bins = [order[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    return [bins[r * k:(r + 1) * k] for r in range(dp)]


CONFIGS = {
    "sample_mean": LossConfig(),
    "constant": LossConfig(aggregation="constant", divisor=16.0),
    "token_mean": LossConfig(aggregation="token_mean"),
}


# --- exactness under the call sites' scaling -----------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(CONFIGS))
@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_thd_reducer_times_call_site_scaling_sums_to_step_objective(megatron, mode, cp_size):
    config = CONFIGS[mode]
    hook = pg_loss_reducer_hook(config)
    rng = random.Random(f"{mode}-{cp_size}")
    for trial in range(3):
        step = random_step(rng, n=8)
        partition = random_partition(rng, 8, dp=1 + trial % 2)
        got = slime_step_loss(hook, megatron, step, partition, cp_size, config.calculate_per_token_loss)
        assert got == pytest.approx(objective(mode, step[2], step[3], config.divisor), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("mode", sorted(CONFIGS))
@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_bshd_reducer_times_call_site_scaling_sums_to_step_objective(megatron, mode, cp_size):
    config = CONFIGS[mode]
    rng = random.Random(f"bshd-{mode}-{cp_size}")
    for trial in range(2):
        step = random_step(rng, n=6)
        got = slime_step_loss(pg_loss_reducer_hook(config), megatron, step, random_partition(rng, 6, 1 + trial), cp_size,
                              config.calculate_per_token_loss, qkv_format="bshd")
        assert got == pytest.approx(objective(mode, step[2], step[3], config.divisor), rel=1e-12, abs=1e-12)


def test_constant_hook_divides_token_sum_by_divisor_and_slime_by_rollouts(megatron):
    # masks [1,1,0] and [1,1], values 0..4, L = 8: J = (0+1+3+4) / (2*8) = 0.5; the reducer gives 8/8 = 1,
    # and slime's scaling divides by Q = 2 rollouts
    hook = pg_loss_reducer_hook(LossConfig(aggregation="constant", divisor=8.0))
    masks = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0])]
    values = list(torch.arange(5.0, dtype=torch.float64).split([3, 2]))
    assert float(hook([5, 4], [3, 2], masks, False)(torch.cat(values))) == pytest.approx(1.0, rel=1e-12)
    got = slime_step_loss(hook, megatron, ([5, 4], [3, 2], masks, values), [[[0], [1]]], 1, False)
    assert got == pytest.approx(0.5, rel=1e-12)


def test_reducer_output_keeps_the_gradient_of_the_local_values(megatron):
    # sample_mean, one sample, mask [1, 0, 1]: d x / d l = m / |o| = [0.5, 0, 0.5]
    hook = pg_loss_reducer_hook(LossConfig())
    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    hook([4], [3], [torch.tensor([1, 0, 1])], False)(values).backward()
    assert values.grad.tolist() == [0.5, 0.0, 0.5]


# --- what the hook refuses or warns about -------------------------------------------------------------------


def test_bshd_with_context_parallelism_outside_the_bridge_is_refused_naming_qkv_format(megatron):
    megatron.args.qkv_format, megatron.cp_size = "bshd", 2
    hook = pg_loss_reducer_hook(LossConfig())
    with pytest.raises(ValueError, match=r"^qkv_format: bshd with context parallelism \(cp_size=2\).*custom-loss-function-path"):
        hook([5], [3], [torch.ones(3)], False)


def test_loss_function_bridge_runs_miles_policy_loss_with_max_seq_lens_visible(megatron, monkeypatch):
    # MILES miles/backends/training_utils/loss_hub/losses.py:62-67 (signature) and :276-287 (the hook's call)
    monkeypatch.setenv("RL_LOSS_CONFIG", "aggregation=constant divisor=4")
    monkeypatch.delitem(sys.modules, "rl_loss.integrations.slime", raising=False)
    import rl_loss.integrations.slime as adapter

    def miles_policy_loss(args, batch, logits, sum_of_sample_mean):
        reducer = adapter.get_pg_loss_reducer(batch["total_lengths"], batch["response_lengths"], batch["loss_masks"],
                                              args.calculate_per_token_loss)
        return reducer(logits), {}

    losses = types.ModuleType("miles.backends.training_utils.loss_hub.losses")
    losses.policy_loss_function = miles_policy_loss
    monkeypatch.setitem(sys.modules, "miles.backends.training_utils.loss_hub.losses", losses)
    for name in ("miles", "miles.backends", "miles.backends.training_utils", "miles.backends.training_utils.loss_hub"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    megatron.args.qkv_format, megatron.cp_size, megatron.cp_rank = "bshd", 2, 1
    # T = 6, R = 4 (prompt 2), width 8 -> c = 2: rank 1 holds positions [2,4) and [4,6): logits 2..4 score
    # response tokens 1..3 (position 1 scores token 0, on rank 0); masks 1, values 1, 2, 3 -> (1+2+3) / 4 = 1.5
    batch = {"total_lengths": [6], "response_lengths": [4], "loss_masks": [torch.ones(4)], "max_seq_lens": [8]}
    args = types.SimpleNamespace(calculate_per_token_loss=False)
    loss, _ = adapter.policy_loss_function(args, batch, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), None)
    assert float(loss) == pytest.approx(1.5, rel=1e-12)


@pytest.mark.parametrize(("aggregation", "flag"), [("token_mean", False), ("sample_mean", True)])
def test_per_token_flag_that_disagrees_with_the_mode_is_refused(megatron, aggregation, flag):
    hook = pg_loss_reducer_hook(LossConfig(aggregation=aggregation))
    with pytest.raises(ValueError, match=rf"^calculate_per_token_loss: slime's --calculate-per-token-loss is {flag}"):
        hook([5], [3], [torch.ones(3)], flag)


def test_token_mean_warns_when_a_sample_has_no_loss_token(megatron):
    hook = pg_loss_reducer_hook(LossConfig(aggregation="token_mean"))
    with pytest.warns(EmptySampleTokenCountWarning, match="counts it as one token"):
        hook([5, 4], [3, 2], [torch.ones(3), torch.zeros(2)], True)


def test_uninitialised_megatron_process_groups_are_an_error(megatron):
    megatron.cp_size = 0  # parallel_state's getters read 0 before initialize_model_parallel
    with pytest.raises(ValueError, match="parallel_state is not initialised"):
        pg_loss_reducer_hook(LossConfig())([5], [3], [torch.ones(3)], False)


@pytest.mark.parametrize("config", [LossConfig(aggregation="prompt_mean"), LossConfig(aggregation="trajectory_mean")])
def test_hook_refuses_modes_it_cannot_serve(config):
    with pytest.raises(ValueError, match=f"got {config.aggregation}"):
        pg_loss_reducer_hook(config)


def test_unserved_mode_would_be_wrong_under_the_call_site(megatron):
    # Why prompt_mean is refused: groups {0, 1} and {2}; masks of 1, 2, 1 tokens; values 2 | 1, 1 | 1.
    # prompt_mean J = ((2+1+1)/3 + 1/1) / 2 = 7/6; a group-blind hook can only give sample_mean:
    # (2/1 + 2/2 + 1/1) / 3 = 4/3.
    masks = [torch.ones(1, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]
    values = [torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64),
              torch.tensor([1.0], dtype=torch.float64)]
    got = slime_step_loss(pg_loss_reducer_hook(LossConfig()), megatron, ([3, 4, 3], [1, 2, 1], masks, values),
                          [[[0, 1, 2]]], 1, False)
    assert got == pytest.approx(4 / 3, rel=1e-12)
    assert not math.isclose(got, 7 / 6)
