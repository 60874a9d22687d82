"""The 2026 surrogates and GSPO-token on hand-worked inputs (docs/objectives-2026.md)."""

from __future__ import annotations

import math

import pytest
import torch

from rl_loss import LossConfig, ReducerFactory, StepBatch, policy_loss


def one_step(fields: dict, logp: list[float], old: list[float], adv: list[float], lengths: list[int], **layout):
    """(loss, metrics, logp leaf) of a step of samples with every token active, float64."""
    config = LossConfig(**fields)
    step = StepBatch(response_lengths=lengths, total_lengths=[r + 1 for r in lengths],
                     loss_masks=[torch.ones(r) for r in lengths])
    factory = ReducerFactory(config)
    leaf = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(leaf, torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
                                factory.pg_reducer(step, **layout), factory.metric_reducer(step, **layout), config)
    return loss, metrics, leaf


def test_gmpo_is_the_geometric_mean_of_the_log_clipped_ratios():
    # d = [0.5, -0.1], A = 1 > 0: d' = [min(0.5, 0.2), -0.1] = [0.2, -0.1], g = exp(0.05), J = -g
    loss, metrics, leaf = one_step(dict(surrogate="gmpo", eps_clip=0.2), [-1.0, -2.1], [-1.5, -2.0], [1.0, 1.0], [2])
    assert float(loss.detach()) == pytest.approx(-math.exp(0.05), rel=1e-12)
    loss.backward()
    # dJ/dlogp_t = -g * (1/2) * dd'_t/dd_t: 0 on the clipped token, -g/2 on the other
    assert leaf.grad.tolist() == pytest.approx([0.0, -math.exp(0.05) / 2], rel=1e-12)
    assert float(metrics["pg_clipfrac"]) == pytest.approx(0.5)


def test_gmpo_negative_advantage_keeps_the_larger_log_ratio():
    # A = -1: d' = max(d, -0.2): d = [0.5, -0.6] -> [0.5, -0.2], g = exp(0.15), J = +g
    loss, _, _ = one_step(dict(surrogate="gmpo", eps_clip=0.2), [-1.0, -2.6], [-1.5, -2.0], [-1.0, -1.0], [2])
    assert float(loss.detach()) == pytest.approx(math.exp(0.15), rel=1e-12)


def test_dppo_tv_masks_a_token_whose_probability_rose_past_delta_for_a_positive_advantage():
    # p_old = 0.5, p = 0.8: p - p_old = 0.3 > 0.2 -> masked for A > 0, kept for A < 0 (the probability rose)
    logp, old = [math.log(0.8)], [math.log(0.5)]
    masked, metrics, _ = one_step(dict(surrogate="dppo_tv"), logp, old, [1.0], [1])
    assert float(masked.detach()) == 0.0 and float(metrics["pg_clipfrac"]) == 1.0
    kept, _, leaf = one_step(dict(surrogate="dppo_tv"), logp, old, [-1.0], [1])
    # l = -A * r * logp = 1 * 1.6 * ln 0.8; dl/dlogp = -A * r = 1.6
    assert float(kept.detach()) == pytest.approx(1.6 * math.log(0.8), rel=1e-12)
    kept.backward()
    assert float(leaf.grad) == pytest.approx(1.6, rel=1e-12)


def test_dppo_ratio_cap_truncates_the_detached_weight():
    # r = 1.6 capped at C = 1.2: dl/dlogp = -A * 1.2 with A = -1
    loss, _, leaf = one_step(dict(surrogate="dppo_tv", dppo_ratio_cap=1.2), [math.log(0.8)], [math.log(0.5)], [-1.0], [1])
    loss.backward()
    assert float(leaf.grad) == pytest.approx(1.2, rel=1e-12)


def test_dppo_kl_masks_by_the_binary_kl_of_the_token():
    # p_old = 0.5, p = 0.8: D = 0.5 ln(0.5/0.8) + 0.5 ln((0.5 + 1e-8)/(0.2 + 1e-8)) = 0.5 ln(0.625 * 2.5) ~ 0.2231
    logp, old = [math.log(0.8)], [math.log(0.5)]
    kept, _, _ = one_step(dict(surrogate="dppo_kl", dppo_delta=0.23), logp, old, [1.0], [1])
    masked, _, _ = one_step(dict(surrogate="dppo_kl", dppo_delta=0.22), logp, old, [1.0], [1])
    assert float(kept.detach()) != 0.0 and float(masked.detach()) == 0.0


def test_vespo_on_policy_is_reinforce():
    # w = 1: phi = e^lambda * 1 * e^-lambda = 1, l = -A * logp; J (sample_mean, one sample) = -(1/2)(-1 - 2) * 0.5
    loss, _, leaf = one_step(dict(surrogate="vespo"), [-1.0, -2.0], [-1.0, -2.0], [0.5, 0.5], [2])
    assert float(loss.detach()) == pytest.approx(0.75, rel=1e-12)


def test_vespo_weight_is_the_gamma_shape_of_the_sequence_ratio():
    # log-ratios 0.4 + 0.3: ln w = 0.7 (a sum), A >= 0: phi = e^3 * w^2 * e^(-3w); dl/dlogp = -phi * A per token
    loss, _, leaf = one_step(dict(surrogate="vespo"), [-0.6, -1.7], [-1.0, -2.0], [2.0, 2.0], [2])
    w = math.exp(0.7)
    phi = math.exp(3.0) * w**2 * math.exp(-3.0 * w)
    loss.backward()
    assert leaf.grad.tolist() == pytest.approx([-phi * 2.0 / 2, -phi * 2.0 / 2], rel=1e-12)  # sample_mean: 1/2 each


def test_gspo_token_has_the_sequence_value_and_each_tokens_gradient():
    # mean log-ratio (0.1 - 0.1)/2 = 0 -> s = 1; per-token advantages [1, 3]: J = -(1/2)(1 + 3) = -2,
    # dJ/dlogp_t = -(1/2) * A_t * s = [-0.5, -1.5] (GSPO's sequence level would give -(1/2) * mean A = -1 each)
    loss, _, leaf = one_step(dict(ratio_level="sequence_token", eps_clip=0.5), [-0.9, -2.1], [-1.0, -2.0],
                             [1.0, 3.0], [2])
    assert float(loss.detach()) == pytest.approx(-2.0, rel=1e-12)
    loss.backward()
    assert leaf.grad.tolist() == pytest.approx([-0.5, -1.5], rel=1e-12)


@pytest.mark.parametrize("fields", [dict(surrogate="gmpo"), dict(surrogate="vespo"), dict(ratio_level="sequence_token")])
def test_per_sequence_reductions_need_the_cp_all_reduce_under_cp(fields):
    with pytest.raises(ValueError, match="cp_all_reduce is required for .* under context parallelism"):
        one_step(fields, [-1.0] * 2, [-1.0] * 2, [1.0] * 2, [4], cp_rank=0, cp_size=2)  # rank 0 holds 2 of 4
