"""Hostile inputs to the library: values are right or refused with one ValueError / TypeError line (docs/trust-library.md).

One test per class of the issue "Trust at the edges" (silent wrong values, tracebacks where a line
belongs), then a hypothesis sweep of bad values into every public function of ``rl_loss.__all__``.
"""

from __future__ import annotations

import inspect
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rl_loss
from rl_loss import (
    LossConfig,
    ReducerFactory,
    StepBatch,
    build_step_weights,
    group_advantages,
    policy_loss,
    sequence_importance_ratio,
)


def step_of(masks, groups=None) -> StepBatch:
    lengths = [len(m) for m in masks]
    return StepBatch(lengths, [r + 1 for r in lengths], [torch.tensor(m, dtype=torch.float64) for m in masks], groups)


# --- silent wrong values ----------------------------------------------------------------------------------------


def test_integer_rewards_give_float_advantages():
    advantages = group_advantages(torch.tensor([1, 0, 1, 1]), [0, 0, 1, 1])
    # group 0: rewards 1, 0 -> mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70711 -> A = +-0.5 / 0.70711
    # group 1: rewards 1, 1 -> centred 0, std 0 -> A = 0
    assert advantages.dtype == torch.get_default_dtype()
    assert advantages.tolist() == pytest.approx([0.70711, -0.70711, 0.0, 0.0], abs=1e-5)


def test_boolean_rewards_are_numbers_too():
    # drgrpo: r - group mean: group 0 (1, 0) -> +-0.5
    assert group_advantages(torch.tensor([True, False]), [3, 3], "drgrpo").tolist() == [0.5, -0.5]


@pytest.mark.parametrize("ids", [[0.0, 1.5], torch.tensor([0.0, 1.0]), [True, False]], ids=["float", "integral-float", "bool"])
def test_group_ids_that_are_not_integers_are_refused(ids):
    with pytest.raises(ValueError, match=r"group_index must be a 1-D sequence of integers, not (float32|bool)"):
        group_advantages(torch.ones(2), ids)


def test_a_boolean_sample_selection_is_refused_not_read_as_numbers():
    factory = ReducerFactory()
    with pytest.raises(ValueError, match=r"sample_indices must be a 1-D sequence of sample numbers, not booleans .*nonzero"):
        factory.pg_reducer(step_of([[1, 1], [1]]), sample_indices=[True, False])


def test_float_sample_indices_are_refused():
    with pytest.raises(ValueError, match=r"sample_indices must be a 1-D sequence of sample numbers, not float32"):
        ReducerFactory().pg_reducer(step_of([[1, 1], [1]]), sample_indices=[0.0, 1.0])


def test_a_generator_of_sample_indices_is_refused():
    with pytest.raises(TypeError, match=r"sample_indices must be a sequence or a tensor, not a one-shot generator"):
        ReducerFactory().pg_reducer(step_of([[1, 1], [1]]), sample_indices=(i for i in [0, 1]))


def test_step_owns_its_masks_so_later_in_place_edits_change_no_denominator():
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # flat float64: the form that used to alias
    lengths = torch.tensor([2, 2])
    step = StepBatch(lengths, [3, 3], mask)
    mask[:3] = 0.0  # rejection sampling applied in place by the caller, after the step was built
    lengths[0] = 1
    # token_mean over the masks as given: T = 4 -> every weight 1/4
    assert build_step_weights(step, "token_mean").weights.tolist() == [0.25] * 4


def test_masks_given_as_python_lists_equal_masks_given_as_tensors():
    as_lists = StepBatch([2, 1], [3, 2], [[1, 0], [1]])
    as_tensors = StepBatch([2, 1], [3, 2], [torch.tensor([1.0, 0.0]), torch.tensor([1.0])])
    flat_list = StepBatch([2, 1], [3, 2], [1, 0, 1])
    for step in (as_lists, flat_list):
        assert torch.equal(step.mask_flat, as_tensors.mask_flat)


def test_a_generator_of_masks_is_refused():
    with pytest.raises(TypeError, match=r"loss_masks must be a sequence or a tensor, not a one-shot generator"):
        StepBatch([1], [2], (torch.ones(1) for _ in range(1)))


@pytest.mark.parametrize("values", [torch.tensor([1, 2, 3]), torch.tensor([True, False, True])], ids=["int", "bool"])
def test_reducer_refuses_non_float_values(values):
    pg = ReducerFactory().pg_reducer(step_of([[1, 1], [1]]))
    with pytest.raises(TypeError, match=r"local_values must hold floating-point values \(got (int64|bool) tensor"):
        pg(values)


def test_reducer_refuses_meta_values():
    pg = ReducerFactory().pg_reducer(step_of([[1, 1], [1]]))
    with pytest.raises(ValueError, match=r"local_values is a meta tensor, which holds no values"):
        pg(torch.ones(3, device="meta"))


def test_meta_masks_are_refused():
    with pytest.raises(ValueError, match=r"loss_masks is a meta tensor"):
        StepBatch([2], [3], torch.ones(2, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_token_mean_of_ten_million_ones_is_one(dtype):
    n = 10_000_000
    step = StepBatch([n], [n + 1], torch.ones(n, dtype=torch.bool))
    pg = ReducerFactory(LossConfig(aggregation="token_mean")).pg_reducer(step)
    # token_mean of n ones: sum_t 1 * (1 / n) = 1; a float16 running sum stalls at 2048 (0.954 at 2e6 tokens)
    partial = pg(torch.ones(n, dtype=dtype))
    assert partial.dtype == torch.float32
    assert float(partial) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("divisor", [1e-300, 0.5, 1e300, 2.0**31 + 1])
def test_divisor_outside_a_token_count_is_refused(divisor):
    with pytest.raises(ValueError, match=r"divisor: must be a token count in \[1, 2\*\*31\]"):
        LossConfig(aggregation="constant", divisor=divisor)
    with pytest.raises(ValueError, match=r"divisor must be a token count in \[1, 2\*\*31\]"):
        build_step_weights(step_of([[1]]), "constant", divisor)


@pytest.mark.parametrize("divisor", [1, 2**31])
def test_divisor_bounds_are_inclusive(divisor):
    # constant: w = m / (N * L), one sample, one token -> 1 / L
    weights = build_step_weights(step_of([[1]]), "constant", divisor).weights
    assert weights.tolist() == [1.0 / divisor]
    assert LossConfig(aggregation="constant", divisor=divisor).divisor == divisor


@pytest.mark.parametrize("reduce_", [lambda t: t.sum(), lambda t: t.tolist(), lambda t: torch.cat([t, t])],
                         ids=["scalar", "list", "twice-as-long"])
def test_cp_all_reduce_of_the_wrong_shape_is_refused(reduce_):
    step = step_of([[1, 1], [1, 1]])
    pg = ReducerFactory().pg_reducer(step, cp_rank=0, cp_size=2)
    n = pg.num_local_tokens
    with pytest.raises(ValueError, match=r"cp_all_reduce must return a float tensor of the shape it was given, \(2,\)"):
        sequence_importance_ratio(torch.zeros(n), torch.zeros(n), pg, reduce_)


# --- tracebacks where one line belongs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("os:system", r"'os:system' failed on a two-sample step \(TypeError"),
        ("os:sep", r"'os:sep' is not a function \(got str\)"),
        ("os:path", r"'os:path' is not a function \(got module\)"),
        ("operator:add", r"'operator:add' cannot be called with one argument, the step"),
        ("no_such_module_anywhere:fn", r"cannot import 'no_such_module_anywhere:fn' \(No module named"),
        ("tests.custom_weights:missing", r"module 'tests.custom_weights' has no 'missing'"),
    ],
)
def test_a_custom_reducer_that_breaks_the_contract_is_one_value_error(path, says):
    with pytest.raises(ValueError, match=rf"^custom_pg_reducer: {says}") as info:
        ReducerFactory(LossConfig(custom_pg_reducer=path))
    assert "\n" not in str(info.value)


def test_a_custom_reducer_module_that_raises_on_import_is_one_value_error(tmp_path, monkeypatch):
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"importing 'raises_on_import' raised RuntimeError \(boom at import\)"):
        ReducerFactory(LossConfig(custom_pg_reducer="raises_on_import:fn"))


def test_loss_config_checks_the_custom_reducer_shape_without_importing(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "marks_import.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef fn(step): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    LossConfig(custom_pg_reducer="marks_import:fn")
    assert not marker.exists() and "marks_import" not in sys.modules
    with pytest.raises(ValueError, match=r"custom_pg_reducer: 'os.system\(1\)' is not an import path"):
        LossConfig(custom_pg_reducer="os.system(1)")


def test_policy_loss_refuses_python_lists_with_one_line():
    step = step_of([[1, 1]])
    factory = ReducerFactory()
    pg, metric = factory.pg_reducer(step), factory.metric_reducer(step)
    with pytest.raises(TypeError, match=r"logprobs must be a torch.Tensor \(got \[0.0, 0.0\]\)"):
        policy_loss([0.0, 0.0], torch.zeros(2), torch.zeros(2), pg, metric, LossConfig())


# --- every public function, random bad values ---------------------------------------------------------------------

HOSTILE = st.sampled_from([
    None, True, 0, -1, 2**70, 1e-300, float("nan"), float("inf"), "thd", "", b"x", [], [1, 0], [True], [[1], [2, 3]],
    {"a": 1}, object(), 1.5, (1, 2),
]) | st.builds(lambda: (i for i in range(2))) | st.sampled_from([
    torch.tensor([1, 0, 1]), torch.tensor([True, False]), torch.ones(3, device="meta"), torch.zeros(0),
    torch.ones(2, 2), torch.ones(3, dtype=torch.float16), torch.tensor(float("nan")), torch.ones(3, dtype=torch.complex64),
])
PUBLIC_CALLABLES = sorted(
    name for name in rl_loss.__all__
    if callable(getattr(rl_loss, name)) and not (isinstance(getattr(rl_loss, name), type)
                                                 and issubclass(getattr(rl_loss, name), Warning))
)


def _call_with(fn, args: list, kwargs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("name", PUBLIC_CALLABLES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bad_values_into_a_public_function_raise_value_or_type_error(name, data):
    fn = getattr(rl_loss, name)
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_POSITIONAL]
    args, kwargs = [], {}
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            kwargs.update(data.draw(st.dictionaries(st.sampled_from(["aggregation", "divisor", "eps_clip", "bogus"]),
                                                    HOSTILE, max_size=2)))
        elif p.default is p.empty or data.draw(st.booleans()):
            value = data.draw(HOSTILE, label=p.name)
            if p.kind is p.KEYWORD_ONLY:
                kwargs[p.name] = value
            elif p.default is p.empty:
                args.append(value)
            else:
                kwargs[p.name] = value
    try:
        _call_with(fn, args, kwargs)
    except (ValueError, TypeError) as err:
        assert str(err).strip(), f"{name}: an empty error message"


def test_every_public_callable_is_swept():
    # the classes and functions a user calls: a new public function joins the sweep by being in __all__
    assert {"StepBatch", "ReducerFactory", "LossConfig", "group_advantages", "policy_loss",
            "local_response_ranges", "build_step_weights", "sequence_importance_ratio"} <= set(PUBLIC_CALLABLES)


def test_the_launchers_preflight_refuses_os_system_before_step_one():
    from launchers.config.preflight import compose_job
    from rl_loss.config_errors import ConfigError

    with pytest.raises(ConfigError) as info:
        compose_job(["loss.custom_pg_reducer=os:system"])
    assert info.value.problems == [
        "loss.custom_pg_reducer: 'os:system' failed on a two-sample step (TypeError: expected str, bytes or "
        "os.PathLike object, not StepBatch); use 'package.module:function' naming a function step -> one weight "
        "per response token"
    ]
