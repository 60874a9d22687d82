"""Partition invariance (docs/exactness.md) and the context-parallel layout (docs/cp-layout.md).

The property tests draw a random step, a random partition of its samples into DP ranks x micro-batches,
a CP size and a layout, reduce every (micro-batch, DP rank, CP rank) piece with the library's reducers,
and compare the sum of the partials, and its gradient, with a direct reference implementation of the
docs/aggregation.md formulas. Each rank's local values are gathered from one full per-token tensor with
``local_response_ranges`` (per sample its ranges concatenated, samples in the micro-batch's order), so the
reducers' own slicing is checked against the public layout function.

Run with ``-s`` (or look for the line printed by the last test) for the example counts and the largest
relative errors seen.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rl_loss import (
    AGGREGATIONS,
    EmptyStepWarning,
    LossConfig,
    ReducerFactory,
    RelabelNotice,
    StepBatch,
    local_response_ranges,
)

pytestmark = pytest.mark.usefixtures("single_intra_op_thread")

FORMATS = ("thd", "bshd")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Seen:
    """What a module's property tests saw (printed by its last test): examples per test, largest error per key."""

    examples: Counter[str] = field(default_factory=Counter)
    max_error: dict[str, float] = field(default_factory=dict)

    def record(self, test: str, errors: dict[str, float]) -> None:
        self.examples[test] += 1
        for key, value in errors.items():
            self.max_error[key] = max(self.max_error.get(key, 0.0), value)

    def summary(self, label: str) -> str:
        return (
            f"\n[{label}] {sum(self.examples.values())} examples: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.examples.items()))
            + f"\n[{label}] max relative error: "
            + ", ".join(f"{k}={v:.3g}" for k, v in sorted(self.max_error.items()))
        )


SEEN = Seen()  # this module's record


# --- random steps and partitions ---------------------------------------------------------------------


@dataclass
class Case:
    response_lengths: list[int]
    total_lengths: list[int]
    masks: list[list[int]]
    groups: list[int]
    trajectories: list[int]  # each trajectory within one prompt group (docs/aggregation.md)
    cells: list[list[int]]  # one (DP rank, micro-batch) per cell: its samples in their local order
    max_seq_lens: list[int | None]  # per cell (bshd: the padded width of that micro-batch)
    cp_size: int
    qkv_format: str
    divisor: float
    whole_step_as_none: bool  # one cell holding every sample in order: pass sample_indices=None
    seed: int

    @property
    def num_samples(self) -> int:
        return len(self.response_lengths)

    def step(self) -> StepBatch:
        return StepBatch(
            response_lengths=self.response_lengths,
            total_lengths=self.total_lengths,
            loss_masks=[torch.tensor(m, dtype=torch.float32) for m in self.masks],
            group_index=self.groups,
            trajectory_index=self.trajectories,
        )

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        # positive values, so the objective has no cancellation and its relative error is well defined
        gen = torch.Generator().manual_seed(self.seed)
        full = 0.5 + 2.0 * torch.rand(sum(self.response_lengths), generator=gen, dtype=torch.float64)
        return full.to(dtype).requires_grad_(True)


@st.composite
def partitioned_steps(draw, qkv_format: str) -> Case:
    n = draw(st.integers(1, 12), label="samples")
    response = draw(st.lists(st.integers(1, 20), min_size=n, max_size=n), label="R_i")
    prompt = draw(st.lists(st.integers(1, 10), min_size=n, max_size=n), label="P_i")
    masks = []
    for r in response:
        kind = draw(st.sampled_from(["random", "random", "fully_masked", "all_active"]))
        if kind == "random":
            masks.append(draw(st.lists(st.integers(0, 1), min_size=r, max_size=r)))
        else:
            masks.append([0 if kind == "fully_masked" else 1] * r)
    num_groups = draw(st.integers(1, n))
    # sparse, unordered group ids: the library must not assume 0..P-1
    groups = [7 * g + 3 for g in draw(st.lists(st.integers(0, num_groups - 1), min_size=n, max_size=n))]
    # agent trajectories of one or more samples inside each prompt group; sparse ids, unique across groups
    per_group = draw(st.integers(1, 4), label="trajectories per group (at most)")
    slots = draw(st.lists(st.integers(0, per_group - 1), min_size=n, max_size=n))
    trajectories = [100 * g + 11 * s for g, s in zip(groups, slots, strict=True)]
    num_dp, num_micro = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    num_cells = num_dp * num_micro
    cell_of = draw(st.lists(st.integers(0, num_cells - 1), min_size=n, max_size=n))
    order = draw(st.permutations(range(n)))
    cells = [[i for i in order if cell_of[i] == c] for c in range(num_cells)]
    cp_size = draw(st.integers(1, 8), label="cp_size")
    total = [p + r for p, r in zip(prompt, response, strict=True)]
    max_seq_lens: list[int | None] = []
    for cell in cells:
        if qkv_format == "thd":
            max_seq_lens.append(None)
            continue
        longest = max([total[i] for i in cell], default=2)
        pad = draw(st.integers(1, 12)) if draw(st.booleans()) else 0
        if cp_size == 1 and draw(st.booleans()):
            max_seq_lens.append(None)
        else:
            max_seq_lens.append(longest + pad)
    whole = num_cells == 1 and draw(st.booleans())
    if whole:
        cells = [list(range(n))]
    divisor = draw(st.floats(1.0, 64.0, allow_nan=False, allow_infinity=False), label="L")
    seed = draw(st.integers(0, 2**31 - 1))
    return Case(response, total, masks, groups, trajectories, cells, max_seq_lens, cp_size, qkv_format, divisor, whole, seed)


# --- the reference: docs/aggregation.md written out directly -------------------------------------------------------


def reference_objective(values: torch.Tensor, case: Case, mode: str) -> torch.Tensor:
    """J of the whole step from the docs/aggregation.md table, with plain loops over samples and groups."""
    masked_sums, token_counts = [], []
    offset = 0
    for r, mask in zip(case.response_lengths, case.masks, strict=True):
        m = torch.tensor(mask, dtype=values.dtype)
        masked_sums.append((values[offset : offset + r] * m).sum())
        token_counts.append(sum(mask))
        offset += r
    n = case.num_samples
    if mode == "sample_mean":
        return sum(s / max(c, 1) for s, c in zip(masked_sums, token_counts, strict=True)) / n
    if mode in ("prompt_mean", "trajectory_mean"):
        # the mean over units (prompt groups or trajectories) of each unit's token mean
        units = case.groups if mode == "prompt_mean" else case.trajectories
        distinct = sorted(set(units))
        total = 0.0
        for u in distinct:
            members = [i for i in range(n) if units[i] == u]
            total = total + sum(masked_sums[i] for i in members) / max(sum(token_counts[i] for i in members), 1)
        return total / len(distinct)
    if mode == "token_mean":
        return sum(masked_sums) / max(sum(token_counts), 1)
    if mode == "constant":
        return sum(masked_sums) / (n * case.divisor)
    raise AssertionError(mode)


def local_index(case: Case, cell: list[int], cp_rank: int, max_seq_len: int | None) -> torch.Tensor:
    """Positions in the full per-token tensor of a rank's local values: per sample its ranges, in cell order."""
    offsets = [sum(case.response_lengths[:i]) for i in range(case.num_samples)]
    index: list[int] = []
    for i in cell:
        for start, end in local_response_ranges(
            total_length=case.total_lengths[i],
            response_length=case.response_lengths[i],
            cp_rank=cp_rank,
            cp_size=case.cp_size,
            qkv_format=case.qkv_format,
            max_seq_len=max_seq_len,
        ):
            index.extend(range(offsets[i] + start, offsets[i] + end))
    return torch.tensor(index, dtype=torch.long)


def factory_for(mode: str, divisor: float) -> ReducerFactory:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        return ReducerFactory(LossConfig(aggregation=mode, divisor=divisor if mode == "constant" else None))


def reducers_of(case: Case, factory: ReducerFactory, step: StepBatch, kind: str = "pg"):
    """(reducer, local index) for every cell (micro-batch x DP rank) and CP rank."""
    build = factory.pg_reducer if kind == "pg" else factory.metric_reducer
    pieces = []
    for cell, max_seq_len in zip(case.cells, case.max_seq_lens, strict=True):
        indices = None if case.whole_step_as_none else cell
        for cp_rank in range(case.cp_size):
            reducer = build(
                step,
                sample_indices=indices,
                cp_rank=cp_rank,
                cp_size=case.cp_size,
                qkv_format=case.qkv_format,
                max_seq_len=max_seq_len,
            )
            pieces.append((reducer, local_index(case, cell, cp_rank, max_seq_len)))
    return pieces


def sum_of_partials(pieces, values: torch.Tensor) -> torch.Tensor:
    total = values.new_zeros(())
    for reducer, index in pieces:
        total = total + reducer(values[index])
    return total


def objective_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = float(got.detach()), float(want.detach())
    if want == 0.0:  # only for an all-masked step: then exactly 0 is required
        return 0.0 if got == 0.0 else float("inf")
    return abs(got - want) / abs(want)


def gradient_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.abs().max())
    diff = float((got.to(torch.float64) - want).abs().max())
    if scale == 0.0:  # all-masked step: the gradient must be exactly 0
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


# --- the properties ------------------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_format", FORMATS)
@pytest.mark.parametrize("mode", AGGREGATIONS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_partials_over_micro_batches_dp_and_cp_sum_to_step_objective(mode, qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyStepWarning)
        step = case.step()
        pieces = reducers_of(case, factory_for(mode, case.divisor), step)
    values64 = case.values(torch.float64)
    want = reference_objective(values64, case, mode)
    errors = {}
    for dtype in (torch.float64, torch.float32):
        got = sum_of_partials(pieces, case.values(dtype))
        assert got.dtype == dtype
        errors[f"objective_{dtype}"] = objective_error(got, want)
        assert errors[f"objective_{dtype}"] <= TOLERANCE[dtype], (mode, dtype, float(got.detach()), float(want))
    SEEN.record(f"objective[{mode}-{qkv_format}]", errors)


@pytest.mark.parametrize("qkv_format", FORMATS)
@pytest.mark.parametrize("mode", AGGREGATIONS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_partial_gradients_over_micro_batches_dp_and_cp_sum_to_step_gradient(mode, qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyStepWarning)
        step = case.step()
        pieces = reducers_of(case, factory_for(mode, case.divisor), step)
    values64 = case.values(torch.float64)
    (want,) = torch.autograd.grad(reference_objective(values64, case, mode), values64)
    errors = {}
    for dtype in (torch.float64, torch.float32):
        values = case.values(dtype)
        (got,) = torch.autograd.grad(sum_of_partials(pieces, values), values)
        errors[f"gradient_{dtype}"] = gradient_error(got, want)
        assert errors[f"gradient_{dtype}"] <= TOLERANCE[dtype], (mode, dtype)
    SEEN.record(f"gradient[{mode}-{qkv_format}]", errors)


@pytest.mark.parametrize("qkv_format", FORMATS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_metric_partials_sum_to_step_sample_mean_in_every_mode(qkv_format, data):
    case = data.draw(partitioned_steps(qkv_format))
    mode = data.draw(st.sampled_from(AGGREGATIONS), label="configured mode")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyStepWarning)
        step = case.step()
        pieces = reducers_of(case, factory_for(mode, case.divisor), step, kind="metric")
    values = case.values(torch.float64)
    error = objective_error(sum_of_partials(pieces, values), reference_objective(values, case, "sample_mean"))
    assert error <= TOLERANCE[torch.float64], mode
    SEEN.record(f"metric[{qkv_format}]", {"metric_objective_torch.float64": error})


@pytest.mark.parametrize("qkv_format", FORMATS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_trajectory_mean_with_one_sample_per_trajectory_equals_sample_mean(qkv_format, data):
    # docs/aggregation.md: Q = N and each trajectory's token total is |o_i|, so J is sample_mean's, partial by partial
    case = data.draw(partitioned_steps(qkv_format))
    case.trajectories = [3 * i + 1 for i in range(case.num_samples)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyStepWarning)
        step = case.step()
        by_trajectory = reducers_of(case, factory_for("trajectory_mean", case.divisor), step)
        by_sample = reducers_of(case, factory_for("sample_mean", case.divisor), step)
    values = case.values(torch.float64).detach()
    for (trajectory_reducer, index), (sample_reducer, _) in zip(by_trajectory, by_sample, strict=True):
        assert torch.equal(trajectory_reducer.weights(), sample_reducer.weights())
        assert float(trajectory_reducer(values[index])) == float(sample_reducer(values[index]))
    SEEN.record(f"trajectory_is_sample_mean[{qkv_format}]", {})


@st.composite
def sample_layouts(draw):
    total = draw(st.integers(2, 40), label="T_i")
    response = draw(st.integers(1, total - 1), label="R_i")
    cp_size = draw(st.integers(1, 8), label="cp_size")
    qkv_format = draw(st.sampled_from(FORMATS))
    max_seq_len = None
    if qkv_format == "bshd" and (cp_size > 1 or draw(st.booleans())):
        max_seq_len = total + draw(st.integers(0, 24))
    return total, response, cp_size, qkv_format, max_seq_len


@settings(max_examples=300, deadline=None)
@given(layout=sample_layouts())
def test_cp_ranges_tile_the_response_exactly_once_over_ranks(layout):
    total, response, cp_size, qkv_format, max_seq_len = layout
    covered = [0] * response
    for cp_rank in range(cp_size):
        for start, end in local_response_ranges(total, response, cp_rank, cp_size, qkv_format, max_seq_len):
            assert 0 <= start < end <= response
            for t in range(start, end):
                covered[t] += 1
    assert covered == [1] * response
    SEEN.examples["cp_ranges_tile"] += 1


# --- hand-worked CP layouts ----------------------------------------------------------------------------


def test_thd_hand_worked_ranges():
    # T = 9, R = 5, P = 4, cp = 2, thd: c = ceil(9 / 4) = 3; response token j is scored at position 3 + j
    # rank 0 holds positions [0, 3) and [9, 12): scored positions are 3..7 -> no response token
    # rank 1 holds positions [3, 6) and [6, 9): [3, 6) -> j in [0, 3), [6, 8) -> j in [3, 5) -> merged [0, 5)
    assert local_response_ranges(9, 5, cp_rank=0, cp_size=2, qkv_format="thd") == []
    assert local_response_ranges(9, 5, cp_rank=1, cp_size=2, qkv_format="thd") == [(0, 5)]


def test_bshd_hand_worked_ranges():
    # T = 9, R = 5, P = 4, cp = 2, bshd with max_seq_len = 16: c = ceil(16 / 4) = 4
    # rank 0 holds [0, 4) and [12, 16): scored position 3 -> j = 0 -> [(0, 1)]; [12, 16) is padding
    # rank 1 holds [4, 8) and [8, 12): positions 4..7 -> j in [1, 5); [8, 12) is past T - 1 = 8
    assert local_response_ranges(9, 5, cp_rank=0, cp_size=2, qkv_format="bshd", max_seq_len=16) == [(0, 1)]
    assert local_response_ranges(9, 5, cp_rank=1, cp_size=2, qkv_format="bshd", max_seq_len=16) == [(1, 5)]


def test_bshd_ranges_do_not_reuse_thd_offsets():
    # the same sample as above: thd gives rank 0 nothing, bshd (width 16) gives it response token 0
    thd = local_response_ranges(9, 5, cp_rank=0, cp_size=2, qkv_format="thd")
    bshd = local_response_ranges(9, 5, cp_rank=0, cp_size=2, qkv_format="bshd", max_seq_len=16)
    assert thd != bshd


def test_thd_hand_worked_ranges_with_two_pieces_per_rank():
    # T = 12, R = 10, P = 2, cp = 2, thd: c = 3; response token j is scored at position 1 + j (j = 0..9)
    # rank 0: [0, 3) -> positions 1, 2 -> j in [0, 2);  [9, 12) -> positions 9, 10 -> j in [8, 10)
    # rank 1: [3, 6) -> j in [2, 5);  [6, 9) -> j in [5, 8)  -> merged [2, 8)
    assert local_response_ranges(12, 10, cp_rank=0, cp_size=2, qkv_format="thd") == [(0, 2), (8, 10)]
    assert local_response_ranges(12, 10, cp_rank=1, cp_size=2, qkv_format="thd") == [(2, 8)]


def test_reducer_reads_local_values_in_the_layout_order():
    # the sample above under sample_mean with every token active: w = 1/10 on each of its 10 tokens.
    # rank 0's local values are tokens [0, 2) then [8, 10): values 1, 2, 9, 10 -> partial = 22 / 10
    step = StepBatch(response_lengths=[10], total_lengths=[12], loss_masks=[torch.ones(10)])
    reducer = ReducerFactory().pg_reducer(step, cp_rank=0, cp_size=2, qkv_format="thd")
    assert reducer.num_local_tokens == 4
    partial = reducer(torch.tensor([1.0, 2.0, 9.0, 10.0], dtype=torch.float64))
    assert float(partial) == pytest.approx(2.2, rel=1e-12)


# --- summary -------------------------------------------------------------------------------------------


def test_property_summary_reports_examples_and_largest_errors(report_summary):
    """Prints the hypothesis example counts and the largest relative errors of this file's properties."""
    if not SEEN.examples:
        pytest.skip("the property tests of this module did not run in this session")
    for key, value in SEEN.max_error.items():
        assert value <= TOLERANCE[torch.float32 if "float32" in key else torch.float64], key
    report_summary(SEEN.summary("partition invariance"))
