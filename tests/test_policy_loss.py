"""The per-token policy loss and its reduction (docs/objectives.md): PPO clip, dual clip, KL, entropy, TIS, RS.

Expected numbers are worked out by hand from the docs/objectives.md formulas in the comments.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rl_loss import (
    LossConfig,
    ReducerFactory,
    RelabelNotice,
    StepBatch,
    clipped_pg_loss,
    kl_penalty,
    policy_loss,
    truncated_importance_weights,
)

LN = math.log


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def reducers(response_lengths, config, masks=None, **layout):
    """(pg, metric) reducers of a one-token-prompt step (every token active unless ``masks`` say otherwise)."""
    masks = masks if masks is not None else [[1] * r for r in response_lengths]
    step = StepBatch(
        response_lengths=response_lengths,
        total_lengths=[r + 1 for r in response_lengths],
        loss_masks=[torch.tensor(m, dtype=torch.float64) for m in masks],
    )
    factory = ReducerFactory(config)
    return factory.pg_reducer(step, **layout), factory.metric_reducer(step, **layout)


def token_mean_config(**fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        return LossConfig(aggregation="token_mean", **fields)


# --- PPO clip ----------------------------------------------------------------------------------------------


def test_positive_advantage_ratio_is_capped_at_one_plus_eps_high():
    # r = 1.5, A = 1, eps_low = 0.2, eps_high = 0.28: max(-1.5, -1.28) = -1.28 (eps_low would give -1.2)
    loss, clipped, _ = clipped_pg_loss(t64([LN(1.5)]), t64([0.0]), t64([1.0]), eps_clip=0.2, eps_clip_high=0.28)
    assert loss.tolist() == pytest.approx([-1.28], rel=1e-12)
    assert clipped.tolist() == [1.0]


def test_negative_advantage_ratio_is_floored_at_one_minus_eps_low():
    # r = 0.5, A = -1, eps_low = 0.2, eps_high = 0.28: max(0.5, 0.8) = 0.8 (eps_high would give 0.72)
    loss, clipped, _ = clipped_pg_loss(t64([LN(0.5)]), t64([0.0]), t64([-1.0]), eps_clip=0.2, eps_clip_high=0.28)
    assert loss.tolist() == pytest.approx([0.8], rel=1e-12)
    assert clipped.tolist() == [1.0]


def test_clip_does_not_bind_where_the_unclipped_term_is_larger():
    # r = 1.1, A = 1: -1.1 (inside the range);  r = 1.5, A = -1: max(1.5, 1.28) = 1.5;
    # r = 0.5, A = 1: max(-0.5, -0.8) = -0.5
    loss, clipped, _ = clipped_pg_loss(
        t64([LN(1.1), LN(1.5), LN(0.5)]), t64([0.0, 0.0, 0.0]), t64([1.0, -1.0, 1.0]), eps_clip=0.2, eps_clip_high=0.28
    )
    assert loss.tolist() == pytest.approx([-1.1, 1.5, -0.5], rel=1e-12)
    assert clipped.tolist() == [0.0, 0.0, 0.0]


def test_eps_clip_high_defaults_to_eps_clip():
    # r = 1.5, A = 1, eps = 0.2 both sides: max(-1.5, -1.2) = -1.2
    loss, _, _ = clipped_pg_loss(t64([LN(1.5)]), t64([0.0]), t64([1.0]), eps_clip=0.2)
    assert loss.tolist() == pytest.approx([-1.2], rel=1e-12)


def test_ratio_uses_difference_of_new_and_old_logprobs():
    # logp = -1.0, logp_old = -1.4: r = exp(0.4);  A = 1, eps = 0.5 -> inside the range, l = -exp(0.4)
    loss, _, ratio = clipped_pg_loss(t64([-1.0]), t64([-1.4]), t64([1.0]), eps_clip=0.5)
    assert ratio.tolist() == pytest.approx([math.exp(0.4)], rel=1e-12)
    assert loss.tolist() == pytest.approx([-math.exp(0.4)], rel=1e-12)


def test_log_ratio_is_clamped_to_twenty():
    # logp - logp_old = 30 -> r = exp(20) (not exp(30)); A = -1 -> l = max(exp(20), 1.2) = exp(20)
    loss, _, ratio = clipped_pg_loss(t64([30.0]), t64([0.0]), t64([-1.0]), eps_clip=0.2)
    assert ratio.tolist() == pytest.approx([math.exp(20.0)], rel=1e-12)
    assert loss.tolist() == pytest.approx([math.exp(20.0)], rel=1e-12)


def test_clipped_tokens_pass_no_gradient_and_unclipped_ones_pass_minus_ratio_times_advantage():
    # token 0: r = 1.5, A = 1 -> clipped at -1.2 (constant in logp): dl/dlogp = 0
    # token 1: r = 1.1, A = 1 -> l = -r: dl/dlogp = -r = -1.1
    logp = t64([LN(1.5), LN(1.1)]).requires_grad_(True)
    loss, _, _ = clipped_pg_loss(logp, t64([0.0, 0.0]), t64([1.0, 1.0]), eps_clip=0.2)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -1.1], rel=1e-12)


# --- dual clip -----------------------------------------------------------------------------------------------


def test_dual_clip_caps_negative_advantage_loss_at_eps_c_times_minus_advantage():
    # eps_c = 3: r = 5, A = -1 -> PPO max(5, 1.2) = 5, capped at -3 * -1 = 3
    #            r = 5, A = -2 -> PPO max(10, 2.4) = 10, capped at 6
    loss, clipped, _ = clipped_pg_loss(t64([LN(5.0), LN(5.0)]), t64([0.0, 0.0]), t64([-1.0, -2.0]), 0.2, None, 3.0)
    assert loss.tolist() == pytest.approx([3.0, 6.0], rel=1e-12)
    assert clipped.tolist() == [1.0, 1.0]


def test_dual_clip_leaves_losses_below_the_cap():
    # eps_c = 3: r = 2, A = -1 -> PPO max(2, 1.2) = 2 < 3: unchanged, no clip binds
    loss, clipped, _ = clipped_pg_loss(t64([LN(2.0)]), t64([0.0]), t64([-1.0]), 0.2, None, 3.0)
    assert loss.tolist() == pytest.approx([2.0], rel=1e-12)
    assert clipped.tolist() == [0.0]


def test_dual_clip_ignores_positive_advantages():
    # eps_c = 3: r = 5, A = 1 -> PPO max(-5, -1.2) = -1.2; the cap -3 applies only to A < 0
    loss, _, _ = clipped_pg_loss(t64([LN(5.0)]), t64([0.0]), t64([1.0]), 0.2, None, 3.0)
    assert loss.tolist() == pytest.approx([-1.2], rel=1e-12)


# --- policy_loss: pg_loss, clipfrac and diagnostics ----------------------------------------------------------

# two samples, every token active: sample 0 has r = [1.5, 1.1], sample 1 has r = [1.5]; A = 1, eps = 0.2
# per-token pg loss: [-1.2, -1.1] and [-1.2];  clip binds on tokens 0 and 2
CLIP_LOGP = t64([LN(1.5), LN(1.1), LN(1.5)])
ZEROS3 = t64([0.0, 0.0, 0.0])
ONES3 = t64([1.0, 1.0, 1.0])


def test_policy_loss_pg_loss_uses_the_configured_mode():
    # token_mean: (-1.2 - 1.1 - 1.2) / 3 = -3.5 / 3   (sample_mean would give (-1.15 - 1.2) / 2 = -1.175)
    config = token_mean_config(eps_clip=0.2)
    pg, metric = reducers([2, 1], config)
    loss, metrics = policy_loss(CLIP_LOGP, ZEROS3, ONES3, pg, metric, config)
    assert float(metrics["pg_loss"]) == pytest.approx(-3.5 / 3, rel=1e-12)
    assert float(loss.detach()) == pytest.approx(-3.5 / 3, rel=1e-12)


def test_clipfrac_is_sample_mean_share_of_clipped_tokens():
    # sample 0: 1 of 2 clipped -> 0.5;  sample 1: 1 of 1 -> 1;  sample_mean (0.5 + 1) / 2 = 0.75
    # (token_mean, the configured mode, would give 2/3)
    config = token_mean_config(eps_clip=0.2)
    pg, metric = reducers([2, 1], config)
    _, metrics = policy_loss(CLIP_LOGP, ZEROS3, ONES3, pg, metric, config)
    assert float(metrics["pg_clipfrac"]) == pytest.approx(0.75, rel=1e-12)


def test_ppo_kl_metric_is_sample_mean_of_old_minus_new_logprobs():
    # old - new: sample 0 [0.2, 0.4] -> 0.3;  sample 1 [0.9] -> 0.9;  sample_mean 0.6 (token_mean 0.5)
    config = token_mean_config()
    pg, metric = reducers([2, 1], config)
    _, metrics = policy_loss(t64([-0.2, -0.4, -0.9]), ZEROS3, ZEROS3, pg, metric, config)
    assert float(metrics["ppo_kl"]) == pytest.approx(0.6, rel=1e-12)


def test_policy_loss_metrics_are_detached():
    config = LossConfig()
    pg, metric = reducers([2, 1], config)
    logp = CLIP_LOGP.clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, ZEROS3, ONES3, pg, metric, config)
    assert loss.requires_grad
    assert not any(value.requires_grad for value in metrics.values())


# --- KL penalty ------------------------------------------------------------------------------------------------


def test_kl_k1_is_log_ratio():
    # d = logp - logp_ref = [0.5, -1.0]
    assert kl_penalty(t64([0.5, -1.0]), t64([0.0, 0.0]), "k1").tolist() == pytest.approx([0.5, -1.0], rel=1e-12)


def test_kl_k2_is_half_squared_log_ratio():
    # d^2 / 2 = [0.125, 0.5]
    assert kl_penalty(t64([0.5, -1.0]), t64([0.0, 0.0]), "k2").tolist() == pytest.approx([0.125, 0.5], rel=1e-12)


def test_kl_k3_is_exp_minus_d_minus_one_plus_d():
    # d = 0.5: exp(-0.5) - 1 + 0.5 = exp(-0.5) - 0.5;  d = -1: exp(1) - 1 - 1 = e - 2
    got = kl_penalty(t64([-0.5, -2.0]), t64([-1.0, -1.0]), "k3").tolist()
    assert got == pytest.approx([math.exp(-0.5) - 0.5, math.e - 2.0], rel=1e-12)


def test_kl_loss_is_added_with_kl_coef_as_a_sample_mean():
    # A = 0 -> pg_loss = 0;  k1 d: sample 0 [0.2, 0.4] -> 0.3, sample 1 [0.9];  sample_mean 0.6
    # loss = 0 + 0.1 * 0.6 = 0.06 (token_mean would give 0.1 * 0.5 = 0.05)
    config = token_mean_config(kl_coef=0.1, kl_estimator="k1")
    pg, metric = reducers([2, 1], config)
    logp = t64([0.2, 0.4, 0.9])
    loss, metrics = policy_loss(logp, logp, ZEROS3, pg, metric, config, ref_logprobs=ZEROS3)
    assert float(metrics["kl_loss"]) == pytest.approx(0.6, rel=1e-12)
    assert float(loss.detach()) == pytest.approx(0.06, rel=1e-12)


def test_kl_coef_requires_reference_logprobs():
    config = LossConfig(kl_coef=0.1)
    pg, metric = reducers([2, 1], config)
    with pytest.raises(ValueError, match=r"ref_logprobs.*kl_coef=0.1"):
        policy_loss(ZEROS3, ZEROS3, ZEROS3, pg, metric, config)


# --- entropy bonus -------------------------------------------------------------------------------------------


def test_entropy_bonus_subtracts_coef_times_sample_mean_entropy():
    # A = 0 -> pg_loss = 0;  entropy sample 0 [1, 3] -> 2, sample 1 [4];  sample_mean 3
    # loss = 0 - 0.1 * 3 = -0.3 (token_mean would give -0.1 * 8/3)
    config = token_mean_config(entropy_coef=0.1)
    pg, metric = reducers([2, 1], config)
    loss, metrics = policy_loss(ZEROS3, ZEROS3, ZEROS3, pg, metric, config, entropy=t64([1.0, 3.0, 4.0]))
    assert float(metrics["entropy"]) == pytest.approx(3.0, rel=1e-12)
    assert float(loss.detach()) == pytest.approx(-0.3, rel=1e-12)


def test_entropy_coef_requires_entropy():
    config = LossConfig(entropy_coef=0.1)
    pg, metric = reducers([2, 1], config)
    with pytest.raises(ValueError, match=r"entropy.*entropy_coef=0.1"):
        policy_loss(ZEROS3, ZEROS3, ZEROS3, pg, metric, config)


# --- TIS and RS ----------------------------------------------------------------------------------------------


def test_truncated_importance_weights_clamp_train_over_rollout_ratio():
    # exp(logp_old_train - logp_rollout) = [3, 0.25, 1.5] clamped to [0.5, 2] -> [2, 0.5, 1.5]
    weights = truncated_importance_weights(t64([LN(3.0), LN(0.25), LN(1.5)]), ZEROS3, low=0.5, high=2.0)
    assert weights.tolist() == pytest.approx([2.0, 0.5, 1.5], rel=1e-12)


def test_tis_weights_multiply_the_per_token_pg_loss():
    # one sample of 3 active tokens, r = 1, A = 1 -> l = -1 each; times TIS [2, 0.5, 1.5] -> [-2, -0.5, -1.5]
    # sample_mean: (-2 - 0.5 - 1.5) / 3 = -4/3
    config = LossConfig()
    pg, metric = reducers([3], config)
    loss, _ = policy_loss(ZEROS3, ZEROS3, ONES3, pg, metric, config, tis_weights=t64([2.0, 0.5, 1.5]))
    assert float(loss.detach()) == pytest.approx(-4 / 3, rel=1e-12)


def test_rs_mask_drops_tokens_from_the_numerator_only():
    # one sample of 4 active tokens, l = -1 each; RS rejects token 2:
    # sample_mean = (-1 - 1 + 0 - 1) / |o_0| with |o_0| = 4 from the pre-RS mask -> -0.75 (not -3/3 = -1)
    config = LossConfig()
    pg, metric = reducers([4], config)
    zeros4, ones4 = t64([0.0] * 4), t64([1.0] * 4)
    loss, _ = policy_loss(zeros4, zeros4, ones4, pg, metric, config, rs_mask=t64([1.0, 1.0, 0.0, 1.0]))
    assert float(loss.detach()) == pytest.approx(-0.75, rel=1e-12)


def test_rs_rejected_token_gets_no_gradient():
    # dJ/dlogp = w * dl/dlogp = (1/4) * (-r * A) = -0.25 on kept tokens, 0 on the rejected one
    config = LossConfig()
    pg, metric = reducers([4], config)
    logp = t64([0.0] * 4).requires_grad_(True)
    loss, _ = policy_loss(logp, t64([0.0] * 4), t64([1.0] * 4), pg, metric, config, rs_mask=t64([1.0, 1.0, 0.0, 1.0]))
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-0.25, -0.25, 0.0, -0.25], rel=1e-12)


def test_per_token_input_of_wrong_length_names_it():
    config = LossConfig()
    pg, metric = reducers([2, 1], config)
    with pytest.raises(ValueError, match=r"advantages must be 1-D with this rank's 3 local tokens \(got shape \(2,\)\)"):
        policy_loss(ZEROS3, ZEROS3, t64([1.0, 1.0]), pg, metric, config)
