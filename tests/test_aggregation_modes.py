"""The aggregation modes (docs/aggregation.md) against hand-worked numbers.

Every expected number is worked out by hand from the formula of docs/aggregation.md in the comment beside it.

The running example (``example_step``), N = 3 samples, P = 2 groups:

    sample 0 (group 0): values [1, 2, 3, 100], mask [1, 1, 1, 0]  ->  masked sum 6,  |o_0| = 3
    sample 1 (group 0): values [4, 5],         mask [1, 1]        ->  masked sum 9,  |o_1| = 2
    sample 2 (group 1): values [6, 50, 50],    mask [1, 0, 0]     ->  masked sum 6,  |o_2| = 1
    T = 3 + 2 + 1 = 6, masked sum over the step = 21
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import rl_loss.aggregation as aggregation_module
from rl_loss import AGGREGATIONS, EmptyStepWarning, LossConfig, ReducerFactory, RelabelNotice, StepBatch

EXAMPLE_VALUES = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0], [6.0, 50.0, 50.0]]
EXAMPLE_MASKS = [[1, 1, 1, 0], [1, 1], [1, 0, 0]]
EXAMPLE_GROUPS = [0, 0, 1]
DIVISOR = 10.0


def make_step(masks, groups=None, prompt_length=2, trajectories=None):
    lengths = [len(m) for m in masks]
    return StepBatch(
        response_lengths=lengths,
        total_lengths=[r + prompt_length for r in lengths],
        loss_masks=[torch.tensor(m, dtype=torch.float64) for m in masks],
        group_index=groups,
        trajectory_index=trajectories,
    )


def example_step():
    # each sample its own trajectory (as in the launcher), so every mode can reduce the running example
    return make_step(EXAMPLE_MASKS, EXAMPLE_GROUPS, trajectories=[0, 1, 2])


def values_of(samples, per_sample_values=EXAMPLE_VALUES, dtype=torch.float64):
    """Local values for cp_size=1: the listed samples' values, concatenated in the given order."""
    return torch.tensor([v for i in samples for v in per_sample_values[i]], dtype=dtype)


def factory_for(aggregation, divisor=DIVISOR):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        return ReducerFactory(LossConfig(aggregation=aggregation, divisor=divisor if aggregation == "constant" else None))


def whole_step_objective(factory, step, per_sample_values=EXAMPLE_VALUES):
    values = values_of(range(step.num_samples), per_sample_values)
    return float(factory.pg_reducer(step)(values))


# --- each mode on the running example -------------------------------------------------------------


def test_sample_mean_averages_per_sample_token_means():
    # (1/N) * sum_i masked_sum_i / |o_i| = (1/3) * (6/3 + 9/2 + 6/1) = (1/3) * 12.5 = 25/6
    assert whole_step_objective(factory_for("sample_mean"), example_step()) == pytest.approx(25 / 6, rel=1e-12)


def test_prompt_mean_averages_group_token_means_over_groups():
    # group 0: (6 + 9) / (3 + 2) = 3;  group 1: 6 / 1 = 6;  (1/P) * (3 + 6) = 9/2 = 4.5
    assert whole_step_objective(factory_for("prompt_mean"), example_step()) == pytest.approx(4.5, rel=1e-12)


def test_prompt_mean_divides_by_number_of_groups_not_samples():
    # same sum of group means (3 + 6 = 9); dividing by N = 3 would give 3.0, by P = 2 gives 4.5
    objective = whole_step_objective(factory_for("prompt_mean"), example_step())
    assert objective == pytest.approx(9 / 2, rel=1e-12)
    assert objective != pytest.approx(9 / 3, rel=1e-6)


def test_token_mean_divides_step_masked_sum_by_step_tokens():
    # 21 / T = 21 / 6 = 3.5
    assert whole_step_objective(factory_for("token_mean"), example_step()) == pytest.approx(3.5, rel=1e-12)


def test_constant_divides_masked_sum_by_samples_times_divisor():
    # 21 / (N * L) = 21 / (3 * 10) = 0.7   (independent of the per-sample token counts)
    assert whole_step_objective(factory_for("constant"), example_step()) == pytest.approx(0.7, rel=1e-12)


def test_token_weights_are_per_sample_lists_of_mask_times_scale():
    # sample_mean: c_i = 1 / (N * |o_i|) -> sample 0: 1/9 on its 3 active tokens, 0 on the masked one;
    # sample 1: 1/6 on both; sample 2: 1/3 on its single active token
    weights = factory_for("sample_mean").token_weights(example_step())
    expected = [[1 / 9, 1 / 9, 1 / 9, 0.0], [1 / 6, 1 / 6], [1 / 3, 0.0, 0.0]]
    assert [w.tolist() for w in weights] == [pytest.approx(e, rel=1e-12) for e in expected]


# --- micro-batches keep step-level denominators ---------------------------------------------------


def test_sample_mean_micro_batch_partial_uses_step_sample_count():
    # sample 1 alone in a micro-batch: (1/N) * 9/2 with N = 3 (the step), = 1.5 (not 9/2 = 4.5)
    partial = factory_for("sample_mean").pg_reducer(example_step(), sample_indices=[1])(values_of([1]))
    assert float(partial) == pytest.approx(1.5, rel=1e-12)


def test_prompt_mean_group_split_across_micro_batches_keeps_group_denominator():
    # group 0 = samples {0, 1} split: micro-batch A = [2, 0], micro-batch B = [1]
    # A: sample 2 -> 6 / (P * 1) = 3;  sample 0 -> 6 / (P * 5) = 0.6  ->  3.6
    # B: sample 1 -> 9 / (P * 5) = 0.9   (group total 5 tokens, not the 2 this micro-batch sees)
    # A + B = 4.5 = J
    factory, step = factory_for("prompt_mean"), example_step()
    part_a = float(factory.pg_reducer(step, sample_indices=[2, 0])(values_of([2, 0])))
    part_b = float(factory.pg_reducer(step, sample_indices=[1])(values_of([1])))
    assert part_a == pytest.approx(3.6, rel=1e-12)
    assert part_b == pytest.approx(0.9, rel=1e-12)
    assert part_a + part_b == pytest.approx(4.5, rel=1e-12)


def test_token_mean_micro_batch_partial_uses_step_token_count():
    # sample 1 alone: 9 / T with T = 6 (the step) = 1.5, not 9 / 2
    partial = factory_for("token_mean").pg_reducer(example_step(), sample_indices=[1])(values_of([1]))
    assert float(partial) == pytest.approx(1.5, rel=1e-12)


def test_constant_micro_batch_partial_uses_step_sample_count():
    # sample 0 alone: 6 / (N * L) = 6 / 30 = 0.2 (N = 3 samples of the step, not 1)
    partial = factory_for("constant").pg_reducer(example_step(), sample_indices=[0])(values_of([0]))
    assert float(partial) == pytest.approx(0.2, rel=1e-12)


def test_empty_micro_batch_contributes_zero():
    # a micro-batch holding no sample reduces 0 values to 0
    partial = factory_for("sample_mean").pg_reducer(example_step(), sample_indices=[])(torch.zeros(0, dtype=torch.float64))
    assert float(partial) == 0.0


# --- fully masked samples ---------------------------------------------------------------------------

# the running example plus sample 3 (group 1): values [7, 7], mask [0, 0]  ->  N = 4, T still 6
WITH_EMPTY_VALUES = [*EXAMPLE_VALUES, [7.0, 7.0]]
WITH_EMPTY_MASKS = [*EXAMPLE_MASKS, [0, 0]]
WITH_EMPTY_GROUPS = [*EXAMPLE_GROUPS, 1]


def test_sample_mean_counts_fully_masked_sample_in_n():
    # (1/4) * (6/3 + 9/2 + 6/1 + 0) = 12.5 / 4 = 3.125
    step = make_step(WITH_EMPTY_MASKS, WITH_EMPTY_GROUPS)
    assert whole_step_objective(factory_for("sample_mean"), step, WITH_EMPTY_VALUES) == pytest.approx(3.125, rel=1e-12)


def test_constant_counts_fully_masked_sample_in_n():
    # 21 / (N * L) = 21 / (4 * 10) = 0.525
    step = make_step(WITH_EMPTY_MASKS, WITH_EMPTY_GROUPS)
    assert whole_step_objective(factory_for("constant"), step, WITH_EMPTY_VALUES) == pytest.approx(0.525, rel=1e-12)


def test_token_mean_fully_masked_sample_adds_no_phantom_token():
    # 21 / T with T = 6 -> 3.5 (a phantom token would give 21 / 7 = 3.0)
    step = make_step(WITH_EMPTY_MASKS, WITH_EMPTY_GROUPS)
    factory = factory_for("token_mean")
    assert whole_step_objective(factory, step, WITH_EMPTY_VALUES) == pytest.approx(3.5, rel=1e-12)
    assert factory.step_metrics(step)["tokens"] == 6


def test_prompt_mean_fully_masked_sample_adds_no_token_to_its_group():
    # group 1 = samples {2, 3}: 6 / (1 + 0) = 6;  group 0: 3;  (3 + 6) / 2 = 4.5 (a phantom: (3 + 6/2)/2 = 3)
    step = make_step(WITH_EMPTY_MASKS, WITH_EMPTY_GROUPS)
    assert whole_step_objective(factory_for("prompt_mean"), step, WITH_EMPTY_VALUES) == pytest.approx(4.5, rel=1e-12)


# --- trajectory_mean (docs/aggregation.md) ------------------------------------------------------------------
# The running example's values and masks as two agent trajectories: trajectory 7 = samples {0, 2}
# (two segments), trajectory 4 = sample {1}; no prompt groups. Q = 2.
#   trajectory 7: (6 + 6) / (3 + 1) = 3;   trajectory 4: 9 / 2 = 4.5


def trajectory_step(masks=EXAMPLE_MASKS, trajectories=(7, 4, 7)):
    return make_step(masks, trajectories=list(trajectories))


def test_trajectory_mean_averages_trajectory_token_means_over_trajectories():
    # (1/Q) * (3 + 4.5) = 7.5 / 2 = 3.75  (sample_mean 25/6, token_mean 3.5: each differs)
    assert whole_step_objective(factory_for("trajectory_mean"), trajectory_step()) == pytest.approx(3.75, rel=1e-12)


def test_trajectory_mean_pools_a_trajectorys_tokens_before_averaging():
    # per-token weights: c = 1 / (Q * G_q): trajectory 7 -> 1 / (2 * 4) = 1/8 on its 4 active tokens,
    # trajectory 4 -> 1 / (2 * 2) = 1/4 on its 2; masked tokens 0
    weights = factory_for("trajectory_mean").token_weights(trajectory_step())
    expected = [[1 / 8, 1 / 8, 1 / 8, 0.0], [1 / 4, 1 / 4], [1 / 8, 0.0, 0.0]]
    assert [w.tolist() for w in weights] == [pytest.approx(e, rel=1e-12) for e in expected]


def test_trajectory_mean_divides_by_number_of_trajectories_not_samples():
    # the sum of trajectory means is 7.5: / Q = 2 gives 3.75, / N = 3 would give 2.5
    objective = whole_step_objective(factory_for("trajectory_mean"), trajectory_step())
    assert objective == pytest.approx(7.5 / 2, rel=1e-12)
    assert objective != pytest.approx(7.5 / 3, rel=1e-6)


def test_trajectory_split_across_micro_batches_keeps_trajectory_denominator():
    # micro-batch A = [0]: 6 / (Q * 4) = 0.75;  micro-batch B = [2, 1]: 6 / 8 + 9 / (2 * 2) = 0.75 + 2.25 = 3.0
    # (trajectory 7 keeps its 4 step-level tokens in both); A + B = 3.75 = J
    factory, step = factory_for("trajectory_mean"), trajectory_step()
    part_a = float(factory.pg_reducer(step, sample_indices=[0])(values_of([0])))
    part_b = float(factory.pg_reducer(step, sample_indices=[2, 1])(values_of([2, 1])))
    assert part_a == pytest.approx(0.75, rel=1e-12)
    assert part_b == pytest.approx(3.0, rel=1e-12)
    assert part_a + part_b == pytest.approx(3.75, rel=1e-12)


def test_trajectory_mean_with_one_sample_per_trajectory_is_sample_mean():
    # Q = N and G_q = |o_i|: (1/3) * (6/3 + 9/2 + 6/1) = 25/6, as sample_mean
    step = trajectory_step(trajectories=(10, 20, 30))
    assert whole_step_objective(factory_for("trajectory_mean"), step) == pytest.approx(25 / 6, rel=1e-12)


def test_trajectory_mean_fully_masked_segment_adds_no_token_to_its_trajectory():
    # sample 3 ([7, 7], mask [0, 0]) joins trajectory 4: (9 + 0) / (2 + 0) = 4.5 -> J = (3 + 4.5) / 2 = 3.75
    # (a phantom token would make it 9 / 3 = 3 and J = 3)
    step = trajectory_step(WITH_EMPTY_MASKS, trajectories=(7, 4, 7, 4))
    objective = whole_step_objective(factory_for("trajectory_mean"), step, WITH_EMPTY_VALUES)
    assert objective == pytest.approx(3.75, rel=1e-12)


def test_trajectory_mean_fully_masked_trajectory_still_counts_in_q():
    # sample 3 alone in trajectory 9 with no active token: Q = 3 -> (3 + 4.5 + 0) / 3 = 2.5
    step = trajectory_step(WITH_EMPTY_MASKS, trajectories=(7, 4, 7, 9))
    objective = whole_step_objective(factory_for("trajectory_mean"), step, WITH_EMPTY_VALUES)
    assert objective == pytest.approx(2.5, rel=1e-12)


def test_trajectory_mean_loss_scale_counts_trajectories_with_tokens():
    # sum w = sum over trajectories of (1/Q) * G_q / max(G_q, 1): Q = 3 with one empty trajectory -> 2/3
    step = trajectory_step(WITH_EMPTY_MASKS, trajectories=(7, 4, 7, 9))
    scale = factory_for("trajectory_mean").step_metrics(step)["loss_scale_vs_token_mean"]
    assert scale == pytest.approx(2 / 3, rel=1e-12)


def test_trajectory_mean_ignores_prompt_groups():
    # the same trajectories inside one prompt group (0) or two (the trajectories' own): J = 3.75 either way
    factory = factory_for("trajectory_mean")
    one_group = make_step(EXAMPLE_MASKS, groups=[0, 0, 0], trajectories=[7, 4, 7])
    own_groups = make_step(EXAMPLE_MASKS, groups=[1, 2, 1], trajectories=[7, 4, 7])
    assert whole_step_objective(factory, one_group) == pytest.approx(3.75, rel=1e-12)
    assert whole_step_objective(factory, own_groups) == pytest.approx(3.75, rel=1e-12)


# --- all-masked step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_all_masked_step_gives_zero_objective_zero_gradient_and_warning(aggregation):
    # every mask entry 0: every numerator is 0 and max(., 1) keeps denominators >= 1 -> J = 0, dJ/dl = 0
    factory = factory_for(aggregation)
    with pytest.warns(EmptyStepWarning):
        step = make_step([[0, 0, 0], [0, 0]], [0, 1], trajectories=[0, 1])
        reducer = factory.pg_reducer(step)
    values = torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0], dtype=torch.float64, requires_grad=True)
    objective = reducer(values)
    objective.backward()
    assert float(objective.detach()) == 0.0
    assert torch.equal(values.grad, torch.zeros(5, dtype=torch.float64))
    assert factory.step_metrics(step)["empty_step"] == 1


def test_non_empty_step_reports_empty_step_zero():
    assert factory_for("sample_mean").step_metrics(example_step())["empty_step"] == 0


# --- identical samples -------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_identical_samples_give_same_objective_in_every_mode_when_divisor_is_sample_tokens(aggregation):
    # 3 identical samples (groups 0, 0, 1), values [1, 2, 3, 4, 99], mask [1, 1, 1, 1, 0]: |o_i| = 4 = L
    # sample_mean: (1/3) * 3 * 10/4 = 2.5;  prompt_mean: (20/8 + 10/4) / 2 = 2.5
    # token_mean: 30 / 12 = 2.5;           constant: 30 / (3 * 4) = 2.5
    # trajectory_mean (trajectories {0, 1}, {2}): (20/8 + 10/4) / 2 = 2.5
    values = [[1.0, 2.0, 3.0, 4.0, 99.0]] * 3
    step = make_step([[1, 1, 1, 1, 0]] * 3, [0, 0, 1], trajectories=[5, 5, 6])
    assert whole_step_objective(factory_for(aggregation, divisor=4.0), step, values) == pytest.approx(2.5, rel=1e-12)


# --- diagnostics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_metric_reducer_is_sample_mean_whatever_the_mode(aggregation):
    # sample_mean of the running example: 25/6 in every mode
    factory, step = factory_for(aggregation), example_step()
    metric = factory.metric_reducer(step)(values_of(range(3)))
    assert float(metric) == pytest.approx(25 / 6, rel=1e-12)


def test_metric_reducer_partial_uses_step_sample_count():
    # sample 2 alone, sample_mean: (1/3) * 6/1 = 2 even under token_mean
    metric = factory_for("token_mean").metric_reducer(example_step(), sample_indices=[2])(values_of([2]))
    assert float(metric) == pytest.approx(2.0, rel=1e-12)


# --- loss_scale_vs_token_mean --------------------------------------------------------------------------


def test_loss_scale_vs_token_mean_is_one_for_token_mean():
    # sum_{i,t} w = sum of m / T over the T active tokens = 1
    assert factory_for("token_mean").step_metrics(example_step())["loss_scale_vs_token_mean"] == pytest.approx(1.0, rel=1e-12)


def test_loss_scale_vs_token_mean_is_tokens_over_samples_times_divisor_for_constant():
    # sum w = T / (N * L) = 6 / (3 * 10) = 0.2
    assert factory_for("constant").step_metrics(example_step())["loss_scale_vs_token_mean"] == pytest.approx(0.2, rel=1e-12)


def test_loss_scale_vs_token_mean_shows_a_wrong_divisor():
    # L = 1 where ~|o_i| was meant: T / (N * L) = 6 / 3 = 2.0 -> visibly off 1
    scale = factory_for("constant", divisor=1.0).step_metrics(example_step())["loss_scale_vs_token_mean"]
    assert scale == pytest.approx(2.0, rel=1e-12)


# --- calculate_per_token_loss is the legacy spelling of token_mean ---------------------------------------


def test_per_token_flag_with_default_mode_is_relabelled_token_mean_with_notice():
    with pytest.warns(RelabelNotice, match="token_mean"):
        config = LossConfig(calculate_per_token_loss=True)
    assert config.aggregation == "token_mean"
    # and it reduces as token_mean: 21 / 6 = 3.5
    assert whole_step_objective(ReducerFactory(config), example_step()) == pytest.approx(3.5, rel=1e-12)


def test_token_mean_sets_per_token_flag():
    assert LossConfig(aggregation="token_mean").calculate_per_token_loss is True


@pytest.mark.parametrize("aggregation", ["constant", "prompt_mean", "trajectory_mean"])
def test_per_token_flag_with_constant_prompt_mean_or_trajectory_mean_is_rejected(aggregation):
    divisor = DIVISOR if aggregation == "constant" else None
    with pytest.raises(ValueError, match=rf"calculate_per_token_loss: .*erase the {aggregation} denominators"):
        LossConfig(aggregation=aggregation, divisor=divisor, calculate_per_token_loss=True)


# --- weights are built once per step --------------------------------------------------------------------


def test_step_weights_are_cached_on_the_step():
    factory, step = factory_for("sample_mean"), example_step()
    assert factory.step_weights(step) is factory.step_weights(step)


def test_second_pg_reducer_of_a_step_does_not_rebuild_weights(monkeypatch):
    calls = []
    original = aggregation_module.build_step_weights

    def counting_build(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(aggregation_module, "build_step_weights", counting_build)
    factory, step = factory_for("prompt_mean"), example_step()
    factory.pg_reducer(step, sample_indices=[0])
    factory.pg_reducer(step, sample_indices=[1, 2])
    assert calls == ["prompt_mean"]


def test_weight_cache_is_keyed_by_mode():
    # two factories on one step must not share weights: sample_mean 25/6, token_mean 3.5
    step = example_step()
    assert whole_step_objective(factory_for("sample_mean"), step) == pytest.approx(25 / 6, rel=1e-12)
    assert whole_step_objective(factory_for("token_mean"), step) == pytest.approx(3.5, rel=1e-12)


def test_weight_cache_is_keyed_by_divisor():
    # constant with L = 10: 0.7;  with L = 30 on the same step: 21 / 90
    step = example_step()
    assert whole_step_objective(factory_for("constant", 10.0), step) == pytest.approx(0.7, rel=1e-12)
    assert whole_step_objective(factory_for("constant", 30.0), step) == pytest.approx(21 / 90, rel=1e-12)


# --- custom pg reducer -----------------------------------------------------------------------------------


def half_weight_per_active_token(step: StepBatch) -> torch.Tensor:
    """A custom token-weight function: 0.5 on every active token."""
    return 0.5 * step.mask_flat


@pytest.mark.parametrize(
    "path",
    ["tests.test_aggregation_modes:half_weight_per_active_token", "tests.test_aggregation_modes.half_weight_per_active_token"],
)
def test_custom_pg_reducer_import_path_replaces_the_aggregation(path):
    # 0.5 * 21 = 10.5
    factory = ReducerFactory(LossConfig(custom_pg_reducer=path))
    assert factory.aggregation == "custom"
    assert whole_step_objective(factory, example_step()) == pytest.approx(10.5, rel=1e-12)


def test_custom_pg_reducer_leaves_metric_reducer_sample_mean():
    factory = ReducerFactory(LossConfig(custom_pg_reducer="tests.test_aggregation_modes:half_weight_per_active_token"))
    metric = factory.metric_reducer(example_step())(values_of(range(3)))
    assert float(metric) == pytest.approx(25 / 6, rel=1e-12)


def test_unimportable_custom_pg_reducer_is_a_value_error_naming_the_path():
    with pytest.raises(ValueError, match="tests.test_aggregation_modes:no_such_function"):
        ReducerFactory(LossConfig(custom_pg_reducer="tests.test_aggregation_modes:no_such_function"))


def test_float32_values_reduce_to_float32_objective():
    # float32 values reduce with float32 weights: token_mean 21 / 6 = 3.5 within float32 precision
    step = example_step()
    objective = factory_for("token_mean").pg_reducer(step)(values_of(range(3), dtype=torch.float32))
    assert objective.dtype == torch.float32
    assert math.isclose(float(objective), 3.5, rel_tol=1e-6)
