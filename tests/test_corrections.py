"""The corrections of docs/corrections.md, hand-worked: OPSM, rollout correction, clip-cov / KL-cov, the KL
term's aggregation and k3 clamp, CISPO's lower bound, and the configuration rules that go with them."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from pydantic import ValidationError

from rl_loss import (
    LossConfig,
    ReducerFactory,
    RelabelNotice,
    StepBatch,
    covariance_selection,
    kl_penalty,
    off_policy_sequence_mask,
    policy_loss,
)

LN = math.log


def config_of(**fields) -> LossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        return LossConfig(**fields)


def two_samples(lengths=(2, 2), masks=None) -> StepBatch:
    masks = masks or [torch.ones(r) for r in lengths]
    return StepBatch(response_lengths=list(lengths), total_lengths=[r + 3 for r in lengths], loss_masks=masks)


def run(config: LossConfig, step: StepBatch, logp, old, adv, **kwargs):
    factory = ReducerFactory(config)
    logp = torch.as_tensor(logp, dtype=torch.float64).requires_grad_(True)
    loss, metrics = policy_loss(logp, torch.as_tensor(old, dtype=torch.float64), torch.as_tensor(adv, dtype=torch.float64),
                                factory.pg_reducer(step), factory.metric_reducer(step), config, **kwargs)
    return loss, metrics, logp


# --- OPSM ---------------------------------------------------------------------------------------------------


def test_opsm_drops_a_negative_advantage_sample_whose_mean_kl_exceeds_delta():
    # sample 0: KL per token old - logp = 0.5, 0.3 -> mean 0.4 > 0.3, A = -1: dropped
    # sample 1: KL 0.1, 0.1 -> mean 0.1 <= 0.3: kept
    step = two_samples()
    keep = off_policy_sequence_mask(torch.tensor([-1.0, -1.0, -1.0, -1.0]), torch.tensor([-0.5, -0.7, -0.9, -0.9]),
                                    torch.tensor([-1.0, -1.0, -1.0, -1.0]), 0.3, ReducerFactory().pg_reducer(step))
    assert keep.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_opsm_keeps_samples_with_non_negative_advantage_however_far_they_moved():
    step = two_samples()
    keep = off_policy_sequence_mask(torch.full((4,), -5.0), torch.zeros(4), torch.tensor([0.0, 0.0, 2.0, 2.0]), 0.1,
                                    ReducerFactory().pg_reducer(step))
    assert keep.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_opsm_mean_kl_counts_only_loss_mask_tokens():
    # sample 0's masked token has KL 9 (would push the mean over delta); its one active token has KL 0.1
    step = two_samples(masks=[torch.tensor([1.0, 0.0]), torch.ones(2)])
    keep = off_policy_sequence_mask(torch.tensor([-1.0, -10.0, -1.0, -1.0]), torch.tensor([-0.9, -1.0, -1.0, -1.0]),
                                    -torch.ones(4), 0.3, ReducerFactory().pg_reducer(step))
    assert keep.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_opsm_changes_the_numerator_only_the_dropped_sample_still_counts_in_n():
    # sample 1: logp = old -> r = 1, l = -r*A = 1 per token; sample 0 dropped.
    # sample_mean: (1/2) * (0 + (1 + 1)/2) = 0.5
    config = config_of(off_policy_mask_delta=0.3)
    loss, metrics, _ = run(config, two_samples(), [-1.0, -1.0, -1.0, -1.0], [-0.5, -0.7, -1.0, -1.0], [-1.0] * 4)
    assert loss.item() == pytest.approx(0.5, rel=1e-12)
    assert float(metrics["opsm_masked_fraction"]) == pytest.approx(0.5, rel=1e-12)  # one sample of two


def test_opsm_uses_rollout_logprobs_as_the_behaviour_policy_when_given():
    # old = logp (no drift in training), but the engine's log-probs are 1.0 above: mean KL 1.0 > 0.3 -> both dropped
    config = config_of(off_policy_mask_delta=0.3)
    loss, _, _ = run(config, two_samples(), [-1.0] * 4, [-1.0] * 4, [-1.0] * 4, rollout_logprobs=torch.zeros(4, dtype=torch.float64))
    assert loss.item() == 0.0


def test_opsm_under_cp_without_all_reduce_is_refused_naming_it():
    step = two_samples((4, 4))
    pg = ReducerFactory().pg_reducer(step, cp_rank=0, cp_size=2)
    n = pg.num_local_tokens
    with pytest.raises(ValueError, match="cp_all_reduce is required for off_policy_mask_delta"):
        off_policy_sequence_mask(torch.zeros(n), torch.zeros(n), -torch.ones(n), 0.1, pg)


# --- rollout correction ---------------------------------------------------------------------------------------


def test_token_tis_weight_is_the_train_over_rollout_ratio_truncated_at_c():
    # lr = old - rollout: ln 3 -> min(3, 2) = 2; ln 1.5 -> 1.5. logp = old -> r = 1, l = -A = 1.
    # sample_mean of (2, 1.5 | 1, 1): (1/2) * ((2 + 1.5)/2 + (1 + 1)/2) = (1.75 + 1) / 2 = 1.375
    config = config_of(rollout_correction=dict(is_level="token", is_threshold=2.0))
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    rollout = old - torch.tensor([LN(3.0), LN(1.5), 0.0, 0.0], dtype=torch.float64)
    loss, metrics, _ = run(config, two_samples(), old, old, [-1.0] * 4, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(1.375, rel=1e-12)
    # untruncated weights 3, 1.5 | 1, 1: sample_mean (2.25 + 1) / 2 = 1.625; one token of two above C in sample 0
    assert float(metrics["rollout_is_mean"]) == pytest.approx(1.625, rel=1e-12)
    assert float(metrics["rollout_is_fraction_high"]) == pytest.approx(0.25, rel=1e-12)


def test_sequence_tis_weight_is_the_product_of_the_samples_token_ratios_truncated_at_c():
    # sample 0: 1.5 * 1.2 = 1.8 < 2 on both tokens; sample 1: 2 * 2 = 4 -> 2. sample_mean of -A = 1 per token:
    # (1/2) * (1.8 + 2) = 1.9
    config = config_of(rollout_correction=dict(is_level="sequence", is_threshold=2.0))
    old = torch.full((4,), -1.0, dtype=torch.float64)
    rollout = old - torch.tensor([LN(1.5), LN(1.2), LN(2.0), LN(2.0)], dtype=torch.float64)
    loss, _, _ = run(config, two_samples(), old, old, [-1.0] * 4, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(1.9, rel=1e-12)


def test_token_k1_rejects_tokens_whose_rollout_over_train_ratio_leaves_the_bounds():
    # k1 = -lr = ln(pi_rollout / pi_train): 3 > 2 rejected, 1/3 < 1/2 rejected, 1.5 and 1 kept.
    # numerators (0, 0 | 1, 1), denominators unchanged: (1/2) * (0/2 + 2/2) = 0.5
    config = config_of(rollout_correction=dict(rs="token_k1", rs_threshold_high=2.0))
    old = torch.full((4,), -1.0, dtype=torch.float64)
    rollout = old + torch.tensor([LN(3.0), -LN(3.0), LN(1.5), 0.0], dtype=torch.float64)
    loss, metrics, _ = run(config, two_samples(), old, old, [-1.0] * 4, rollout_logprobs=rollout)
    # sample 0 keeps nothing, sample 1 keeps tokens of values 1 and 1 -> (1/2)*(0 + 2/2) = 0.5
    assert loss.item() == pytest.approx(0.5, rel=1e-12)
    assert float(metrics["rollout_rs_masked_fraction"]) == pytest.approx(0.5, rel=1e-12)  # (1/2)*(2/2 + 0)


def test_seq_mean_k1_rejects_a_sample_by_the_geometric_mean_of_its_ratios():
    # sample 0: rollout/train ratios 3 and 1/1.2 -> mean k1 = (ln 3 - ln 1.2) / 2 = ln(sqrt(2.5)) = ln 1.58 <= ln 2: kept
    # sample 1: ratios 3 and 3 -> geometric mean 3 > 2: rejected (both tokens). Values 1: (1/2) * (2/2 + 0) = 0.5
    config = config_of(rollout_correction=dict(rs="seq_mean_k1", rs_threshold_high=2.0))
    old = torch.full((4,), -1.0, dtype=torch.float64)
    rollout = old + torch.tensor([LN(3.0), -LN(1.2), LN(3.0), LN(3.0)], dtype=torch.float64)
    loss, _, _ = run(config, two_samples(), old, old, [-1.0] * 4, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(0.5, rel=1e-12)


def test_seq_sum_k3_rejects_a_sample_whose_summed_k3_exceeds_the_bound():
    # lr = ln 2 per token: k3 = 2 - 1 - ln 2 = 0.3069; sample 0 (two tokens) sums 0.614 > 0.5: rejected;
    # sample 1 (lr = 0): 0, kept. (1/2) * (0 + 2/2) = 0.5
    config = config_of(rollout_correction=dict(rs="seq_sum_k3", rs_threshold_high=0.5))
    old = torch.full((4,), -1.0, dtype=torch.float64)
    rollout = old - torch.tensor([LN(2.0), LN(2.0), 0.0, 0.0], dtype=torch.float64)
    loss, _, _ = run(config, two_samples(), old, old, [-1.0] * 4, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(0.5, rel=1e-12)


def test_rollout_correction_without_rollout_logprobs_is_refused():
    config = config_of(rollout_correction=dict(is_level="token"))
    with pytest.raises(ValueError, match="rollout_logprobs is required"):
        run(config, two_samples(), [-1.0] * 4, [-1.0] * 4, [1.0] * 4)


def test_rollout_logprobs_that_nothing_uses_are_refused():
    with pytest.raises(ValueError, match="rollout_logprobs: no configured correction uses them"):
        run(config_of(), two_samples(), [-1.0] * 4, [-1.0] * 4, [1.0] * 4, rollout_logprobs=torch.zeros(4))


def test_sequence_tis_under_cp_without_all_reduce_is_refused():
    config = config_of(rollout_correction=dict(is_level="sequence"))
    step = two_samples((4, 4))
    factory = ReducerFactory(config)
    pg, metric = factory.pg_reducer(step, cp_rank=1, cp_size=2), factory.metric_reducer(step, cp_rank=1, cp_size=2)
    n = pg.num_local_tokens
    with pytest.raises(ValueError, match="cp_all_reduce is required for rollout_correction.is_level=sequence"):
        policy_loss(torch.zeros(n), torch.zeros(n), torch.ones(n), pg, metric, config, rollout_logprobs=torch.zeros(n))


# --- KL: aggregation and clamp --------------------------------------------------------------------------------


def test_kl_aggregation_pg_averages_the_kl_with_the_pg_mode():
    # k1 = logp - ref: sample 0 (1 token) 3.0; sample 1 (3 tokens) 1.0 each. logp = old, A = 0: pg_loss = 0.
    # token_mean: (3 + 1 + 1 + 1) / 4 = 1.5 (sample_mean would give (3 + 1) / 2 = 2.0)
    config = config_of(aggregation="token_mean", kl_coef=1.0, kl_estimator="k1", kl_aggregation="pg")
    step = two_samples((1, 3))
    logp = [0.0, 0.0, 0.0, 0.0]
    loss, metrics, _ = run(config, step, logp, logp, [0.0] * 4, ref_logprobs=torch.tensor([-3.0, -1.0, -1.0, -1.0]))
    assert loss.item() == pytest.approx(1.5, rel=1e-12)
    assert float(metrics["kl_loss"]) == pytest.approx(2.0, rel=1e-12)  # the metric stays sample_mean


def test_kl_aggregation_defaults_to_sample_mean():
    config = config_of(aggregation="token_mean", kl_coef=1.0, kl_estimator="k1")
    loss, _, _ = run(config, two_samples((1, 3)), [0.0] * 4, [0.0] * 4, [0.0] * 4,
                     ref_logprobs=torch.tensor([-3.0, -1.0, -1.0, -1.0]))
    assert loss.item() == pytest.approx(2.0, rel=1e-12)


def test_kl_clamp_caps_k3():
    # d = logp - ref = -15: k3 = exp(15) - 1 - 15 ~ 3.3e6 -> 10; d = 0.5: exp(-0.5) - 1 + 0.5 = 0.10653 unchanged
    logp, ref = torch.tensor([-16.0, -0.5]), torch.tensor([-1.0, -1.0])
    clamped = kl_penalty(logp.double(), ref.double(), "k3", clamp=10.0)
    assert clamped.tolist() == pytest.approx([10.0, math.exp(-0.5) - 0.5], rel=1e-12)
    assert float(kl_penalty(logp.double(), ref.double(), "k3")[0]) == pytest.approx(math.exp(15) - 16, rel=1e-12)


# --- CISPO's lower bound --------------------------------------------------------------------------------------


def test_cispo_clip_low_floors_the_detached_weight():
    # r = exp(-1) = 0.3679 < 1 - 0.2 = 0.8 -> weight 0.8; l = -0.8 * A * logp, A = 1, logp = -1 -> 0.8;
    # gradient dl/dlogp = -0.8 * A = -0.8 (one token, sample_mean of one sample)
    config = config_of(surrogate="cispo", cispo_clip_low=0.2)
    step = StepBatch(response_lengths=[1], total_lengths=[2], loss_masks=[torch.ones(1)])
    loss, metrics, logp = run(config, step, [-1.0], [0.0], [1.0])
    loss.backward()
    assert loss.item() == pytest.approx(0.8, rel=1e-12)
    assert float(logp.grad) == pytest.approx(-0.8, rel=1e-12)
    assert float(metrics["pg_clipfrac"]) == 1.0


# --- clip-cov / KL-cov ----------------------------------------------------------------------------------------


def cov_step():
    # two samples of two tokens; A = (+1, +1 | -1, -1), logp = (0, -2 | 0, -2)
    # means: A 0, logp -1 -> cov = A * (logp + 1) = (1, -1 | -1, 1)
    return two_samples(), torch.tensor([0.0, -2.0, 0.0, -2.0]), torch.tensor([1.0, 1.0, -1.0, -1.0])


def test_kl_cov_selects_the_tokens_of_largest_covariance():
    # k = max(int(0.5 * 4), 1) = 2: the two tokens of covariance 1 (positions 0 and 3)
    step, logp, adv = cov_step()
    config = config_of(cov_penalty="kl_cov", kl_cov_ratio=0.5)
    assert covariance_selection(config, step, logp, logp, adv).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_clip_cov_selects_candidates_between_the_covariance_bounds():
    # bounds (0.5, 5): candidates are the covariance-1 tokens 0 and 3; ratio 0.25 -> int(1) = 1 of them
    step, logp, adv = cov_step()
    config = config_of(cov_penalty="clip_cov", clip_cov_ratio=0.25, clip_cov_lb=0.5)
    selection = covariance_selection(config, step, logp, logp, adv, generator=torch.Generator().manual_seed(0))
    assert selection.sum() == 1 and (selection[[0, 3]].sum() == 1)
    wide = config_of(cov_penalty="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=0.5)
    assert covariance_selection(wide, step, logp, logp, adv).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_clip_cov_zeroes_the_loss_and_gradient_of_selected_tokens():
    # logp = old: r = 1, l = -A; selection (1, 0 | 0, 1) -> numerators (0, -1 | 1, 0)
    # sample_mean: (1/2) * (-1/2 + 1/2) = 0; gradient of token 0 is 0, of token 1 is -A * w = -1 * 1/4
    step, logp, adv = cov_step()
    config = config_of(cov_penalty="clip_cov")
    loss, metrics, leaf = run(config, step, logp, logp, adv, cov_selection=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    assert leaf.grad.tolist() == pytest.approx([0.0, -0.25, 0.25, 0.0], rel=1e-12)
    assert float(metrics["cov_selected_fraction"]) == pytest.approx(0.5, rel=1e-12)


def test_kl_cov_adds_coef_times_abs_log_ratio_on_selected_tokens_and_does_not_clip():
    # token 0: logp - old = 1, A = 1, r = e -> -e + 2 * |1| (coef 2); token 1: r = e^-1, unclipped -A*r = -e^-1
    # one sample of two tokens, sample_mean: (-e + 2 - e^-1) / 2
    config = config_of(cov_penalty="kl_cov", kl_cov_coef=2.0)
    step = StepBatch(response_lengths=[2], total_lengths=[3], loss_masks=[torch.ones(2)])
    loss, metrics, _ = run(config, step, [0.0, -2.0], [-1.0, -1.0], [1.0, 1.0], cov_selection=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((-math.e + 2 - math.exp(-1)) / 2, rel=1e-12)
    assert float(metrics["pg_clipfrac"]) == 0.0


def test_cov_penalty_without_a_selection_is_refused():
    step, logp, adv = cov_step()
    with pytest.raises(ValueError, match="cov_selection is required with cov_penalty=clip_cov"):
        run(config_of(cov_penalty="clip_cov"), step, logp, logp, adv)


# --- configuration rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, names",
    [
        (dict(kl_clamp=10.0, kl_estimator="k2"), "kl_clamp"),
        (dict(cispo_clip_low=0.2), "cispo_clip_low"),
        (dict(cov_penalty="clip_cov", surrogate="cispo"), "cov_penalty"),
        (dict(cov_penalty="kl_cov", eps_clip=0.2), "eps_clip"),
        (dict(kl_cov_ratio=0.01), "kl_cov_ratio"),
        (dict(cov_penalty="kl_cov", clip_cov_ub=3.0), "clip_cov_ub"),
        (dict(cov_penalty="clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0), "clip_cov_lb"),
        (dict(rollout_correction=dict(rs="token_k1")), "rs_threshold_high"),
        (dict(rollout_correction=dict(rs="token_k2", rs_threshold_low=0.5, rs_threshold_high=1.0)), "rs_threshold_low"),
        (dict(rollout_correction=dict(rs_threshold_high=2.0)), "rs_threshold_high"),
        (dict(rollout_correction=dict(rs="token_k1", rs_threshold_low=3.0, rs_threshold_high=2.0)), "rs_threshold_low"),
    ],
)
def test_a_correction_setting_that_would_be_ignored_or_is_inconsistent_is_rejected_naming_it(fields, names):
    with pytest.raises(ValidationError, match=names):
        config_of(**fields)


def test_correction_defaults_leave_the_loss_unchanged():
    config = config_of()
    assert (config.kl_aggregation, config.kl_clamp, config.off_policy_mask_delta, config.cov_penalty) == (
        "sample_mean", None, None, "none")
    assert not config.rollout_correction.enabled
