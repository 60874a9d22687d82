"""The surrogate objectives (docs/objectives.md): CISPO, SAPO and GSPO's sequence-level ratio, on hand-worked cases.

Every expected number is worked out from the docs/objectives.md formulas in the comment above its assertion.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from rl_loss import LossConfig, ReducerFactory, RelabelNotice, StepBatch, policy_loss
from rl_loss.surrogates import cispo_pg_loss, sapo_pg_loss, sequence_importance_ratio
from tests.test_policy_loss import LN, reducers, t64


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def config_of(**fields) -> LossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelabelNotice)
        return LossConfig(**fields)


# --- CISPO ---------------------------------------------------------------------------------------------------


def test_cispo_is_a_reinforce_term_weighted_by_the_ratio_below_the_cap():
    # logp = ln 0.5, logp_old = ln 0.4: r = 1.25 < 1 + 0.28 -> weight 1.25;  A = 2
    # l = -1.25 * 2 * ln 0.5 = 2.5 ln 2
    loss, clipped, _ = cispo_pg_loss(t64([LN(0.5)]), t64([LN(0.4)]), t64([2.0]), eps_clip_high=0.28)
    assert loss.tolist() == pytest.approx([2.5 * math.log(2.0)], rel=1e-12)
    assert clipped.tolist() == [0.0]


def test_cispo_truncates_the_weight_at_one_plus_eps_clip_high():
    # r = 0.8 / 0.4 = 2 > 1.28 -> weight 1.28;  A = 1:  l = -1.28 * ln 0.8, and the truncation binds
    loss, clipped, _ = cispo_pg_loss(t64([LN(0.8)]), t64([LN(0.4)]), t64([1.0]), eps_clip_high=0.28)
    assert loss.tolist() == pytest.approx([-1.28 * math.log(0.8)], rel=1e-12)
    assert clipped.tolist() == [1.0]


def test_cispo_gradient_is_minus_truncated_weight_times_advantage_for_every_token():
    # dl/dlogp = -sg(min(r, 1.28)) * A (the weight is a constant):
    #   token 0: r = 2 (truncated to 1.28), A = 1  -> -1.28  (PPO's clip would pass no gradient here)
    #   token 1: r = 0.25 (no lower bound), A = -1 -> +0.25 (PPO would floor r at 0.8 and pass none)
    #   token 2: r = 1.25, A = 2                   -> -2.5
    logp = t64([LN(0.8), LN(0.1), LN(0.5)]).requires_grad_(True)
    loss, _, _ = cispo_pg_loss(logp, t64([LN(0.4)] * 3), t64([1.0, -1.0, 2.0]), eps_clip_high=0.28)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-1.28, 0.25, -2.5], rel=1e-12)


def test_cispo_clipfrac_counts_tokens_above_the_cap_whatever_the_advantage_sign():
    # r = [2, 2, 1.25, 0.25] with cap 1.28 and A = [1, -1, 1, 1]: clipped [1, 1, 0, 0];
    # one sample of 4 tokens -> sample_mean clipfrac 2/4 = 0.5
    config = config_of(surrogate="cispo", eps_clip_high=0.28)
    pg, metric = reducers([4], config)
    logp = t64([LN(0.8), LN(0.8), LN(0.5), LN(0.1)])
    _, metrics = policy_loss(logp, t64([LN(0.4)] * 4), t64([1.0, -1.0, 1.0, 1.0]), pg, metric, config)
    assert float(metrics["pg_clipfrac"]) == pytest.approx(0.5, rel=1e-12)


def test_cispo_cap_defaults_to_one_point_two():
    # eps_clip_high unset: the cap is 1 + 0.2;  r = 2, A = 1 -> dl/dlogp = -1.2
    config = config_of(surrogate="cispo")
    pg, metric = reducers([1], config)
    logp = t64([LN(0.8)]).requires_grad_(True)
    loss, _ = policy_loss(logp, t64([LN(0.4)]), t64([1.0]), pg, metric, config)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1.2], rel=1e-12)


# --- SAPO ----------------------------------------------------------------------------------------------------


def test_sapo_on_policy_loss_is_minus_two_over_tau_times_advantage():
    # r = 1: g = sigmoid(0) * 4 / tau = 2 / tau;  A = 1 uses tau_pos = 1 -> l = -2;
    # A = -1 uses tau_neg = 1.05 -> l = +2 / 1.05
    loss, _, _ = sapo_pg_loss(t64([0.0, 0.0]), t64([0.0, 0.0]), t64([1.0, -1.0]), tau_pos=1.0, tau_neg=1.05)
    assert loss.tolist() == pytest.approx([-2.0, 2.0 / 1.05], rel=1e-12)


def test_sapo_on_policy_gradient_equals_the_unclipped_ppo_gradient():
    # dl/dlogp = -A * r * 4 s (1 - s), s = sigmoid(0) = 1/2 -> 4 s (1 - s) = 1: -A for A = 1 and A = -1
    logp = t64([0.0, 0.0]).requires_grad_(True)
    loss, _, _ = sapo_pg_loss(logp, t64([0.0, 0.0]), t64([1.0, -1.0]), tau_pos=1.0, tau_neg=1.05)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-1.0, 1.0], rel=1e-12)


def test_sapo_gate_attenuates_the_gradient_off_policy():
    # r = 2, A = 1, tau_pos = 1: s = sigmoid(1);  l = -4 s;  dl/dlogp = -1 * 2 * 4 s (1 - s)
    s = sigmoid(1.0)
    logp = t64([LN(2.0)]).requires_grad_(True)
    loss, _, _ = sapo_pg_loss(logp, t64([0.0]), t64([1.0]), tau_pos=1.0, tau_neg=1.05)
    loss.sum().backward()
    assert loss.tolist() == pytest.approx([-4.0 * s], rel=1e-12)
    assert logp.grad.tolist() == pytest.approx([-8.0 * s * (1.0 - s)], rel=1e-12)


def test_sapo_negative_advantage_uses_tau_neg():
    # r = 2, A = -1, tau_neg = 2: g = sigmoid(2 * 1) * 4 / 2 -> l = +2 sigmoid(2)
    loss, _, _ = sapo_pg_loss(t64([LN(2.0)]), t64([0.0]), t64([-1.0]), tau_pos=1.0, tau_neg=2.0)
    assert loss.tolist() == pytest.approx([2.0 * sigmoid(2.0)], rel=1e-12)


def test_sapo_clipfrac_counts_tokens_whose_gate_halved_the_gradient():
    # 4 s (1 - s) <= 1/2  <=>  |tau (r - 1)| >= ln(3 + 2 sqrt 2) = 1.7627...
    # tau = 1: r = 2.7 -> 1.7 (gate 0.52, kept); r = 2.8 -> 1.8 (gate 0.49, halved)
    # A = -1 with tau_neg = 2: r = 1.9 -> 1.8 (halved); r = 0.2 -> |-1.6| (kept)
    logp = t64([LN(2.7), LN(2.8), LN(1.9), LN(0.2)])
    _, clipped, _ = sapo_pg_loss(logp, t64([0.0] * 4), t64([1.0, 1.0, -1.0, -1.0]), tau_pos=1.0, tau_neg=2.0)
    assert clipped.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_sapo_temperatures_default_to_one_and_one_point_zero_five():
    # r = 1, A = -1, sapo_tau_neg unset: l = 2 / 1.05 (one sample, one token: pg_loss = l)
    config = config_of(surrogate="sapo")
    pg, metric = reducers([1], config)
    loss, _ = policy_loss(t64([0.0]), t64([0.0]), t64([-1.0]), pg, metric, config)
    assert float(loss) == pytest.approx(2.0 / 1.05, rel=1e-12)


# --- GSPO: the sequence ratio --------------------------------------------------------------------------------

# sample 0: log-ratios [0.2, 0.4, junk] with mask [1, 1, 0] -> mean 0.3, s_0 = e^0.3 = 1.3499 > 1.28
# sample 1: log-ratios [0.1, -0.1], mask [1, 1]              -> mean 0,   s_1 = 1
GSPO_LOGP = t64([0.2, 0.4, 7.0, 0.1, -0.1])
GSPO_OLD = t64([0.0] * 5)
GSPO_MASKS = [[1, 1, 0], [1, 1]]


def test_sequence_ratio_is_exp_of_the_masked_mean_log_ratio():
    config = config_of(ratio_level="sequence")
    pg, _ = reducers([3, 2], config, GSPO_MASKS)
    ratio = sequence_importance_ratio(GSPO_LOGP, GSPO_OLD, pg)
    expected = [math.exp(0.3)] * 3 + [1.0, 1.0]
    assert ratio.tolist() == pytest.approx(expected, rel=1e-12)


def test_gspo_clips_the_sequence_ratio_for_every_token_of_the_sample():
    # eps 0.2 / 0.28:  sample 0, A = 1: max(-1.3499, -1.28) = -1.28 on each token, clipped;
    #                  sample 1, A = -1: s = 1 inside the range -> l = 1 on each token
    # sample_mean (N = 2): w = 1/4 on each masked token -> (-1.28 - 1.28) / 4 + (1 + 1) / 4 = -0.14
    # clipfrac: sample 0 all clipped (1), sample 1 none (0) -> 0.5
    config = config_of(ratio_level="sequence", eps_clip_high=0.28)
    pg, metric = reducers([3, 2], config, GSPO_MASKS)
    advantages = t64([1.0, 1.0, 1.0, -1.0, -1.0])
    loss, metrics = policy_loss(GSPO_LOGP, GSPO_OLD, advantages, pg, metric, config)
    assert float(loss) == pytest.approx(-0.14, rel=1e-12)
    assert float(metrics["pg_clipfrac"]) == pytest.approx(0.5, rel=1e-12)


def test_gspo_gradient_flows_through_the_sequence_mean():
    # sample 0 is clipped: no gradient.  sample 1: J_1 = (1/4) * 2 * (-s_1 * A) = s_1 / 2 with A = -1, and
    # ds_1/dlogp_t = s_1 / |o_1| = 1/2 for both tokens -> dJ/dlogp_t = 1/4
    config = config_of(ratio_level="sequence", eps_clip_high=0.28)
    pg, metric = reducers([3, 2], config, GSPO_MASKS)
    logp = GSPO_LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, GSPO_OLD, t64([1.0, 1.0, 1.0, -1.0, -1.0]), pg, metric, config)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.25], rel=1e-12, abs=1e-15)


def test_gspo_does_not_clip_tokens_whose_sequence_ratio_is_inside_the_range():
    # token ratios [1.5, 1/1.5], A = 1: the token-level clip binds on token 0 (1.5 > 1.2);
    # the sequence ratio exp((ln 1.5 - ln 1.5) / 2) = 1 is inside [0.8, 1.2]: l = -1 on both, clipfrac 0
    logp, old, adv = t64([LN(1.5), -LN(1.5)]), t64([0.0, 0.0]), t64([1.0, 1.0])
    token_cfg, seq_cfg = config_of(), config_of(ratio_level="sequence")
    _, token_metrics = policy_loss(logp, old, adv, *reducers([2], token_cfg), token_cfg)
    seq_loss, seq_metrics = policy_loss(logp, old, adv, *reducers([2], seq_cfg), seq_cfg)
    assert float(token_metrics["pg_clipfrac"]) == pytest.approx(0.5, rel=1e-12)
    assert float(seq_loss) == pytest.approx(-1.0, rel=1e-12)
    assert float(seq_metrics["pg_clipfrac"]) == 0.0


def test_gspo_denominator_counts_pre_rs_mask_tokens():
    # one sample, mask [1, 1], log-ratios [0.4, 0.2]; RS rejects token 1 (numerator only):
    # s = exp((0.4 + 0.2) / 2) = e^0.3 (the sequence ratio keeps every pre-RS token), eps_high 1 -> no clip;
    # A = 1: l = -e^0.3 on both tokens, RS zeroes token 1: sample_mean = -e^0.3 / 2
    config = config_of(ratio_level="sequence", eps_clip_high=1.0)
    pg, metric = reducers([2], config)
    loss, _ = policy_loss(t64([0.4, 0.2]), t64([0.0, 0.0]), t64([1.0, 1.0]), pg, metric, config, rs_mask=t64([1.0, 0.0]))
    assert float(loss) == pytest.approx(-math.exp(0.3) / 2, rel=1e-12)


def test_gspo_cp_all_reduce_is_called_once_with_one_partial_per_micro_batch_sample():
    # micro-batch = samples [1, 0] as CP rank 1 of 2: the all-reduce gets a tensor of 2 partials
    calls = []

    def record(partial):
        calls.append(partial.shape)
        return partial

    config = config_of(ratio_level="sequence")
    pg, metric = reducers([3, 2], config, sample_indices=[1, 0], cp_rank=1, cp_size=2)
    n = pg.num_local_tokens
    policy_loss(t64([0.0] * n), t64([0.0] * n), t64([1.0] * n), pg, metric, config, cp_all_reduce=record)
    assert calls == [torch.Size([2])]


def test_gspo_under_cp_without_all_reduce_is_rejected_naming_it():
    config = config_of(ratio_level="sequence")
    pg, metric = reducers([3, 2], config, cp_rank=0, cp_size=2)
    n = pg.num_local_tokens
    with pytest.raises(ValueError, match=r"cp_all_reduce is required for ratio_level=sequence .*cp_size=2"):
        policy_loss(t64([0.0] * n), t64([0.0] * n), t64([1.0] * n), pg, metric, config)


def test_token_level_surrogates_ignore_the_cp_all_reduce():
    # the all-reduce is only for the sequence ratio: a token-level loss never calls it
    def fail(partial):
        raise AssertionError("called")

    config = config_of()
    pg, metric = reducers([3, 2], config, cp_rank=0, cp_size=2)
    n = pg.num_local_tokens
    policy_loss(t64([0.0] * n), t64([0.0] * n), t64([1.0] * n), pg, metric, config, cp_all_reduce=fail)


def test_gspo_split_over_two_cp_ranks_equals_the_whole_sequence():
    # one sample, T = 12, R = 10 (cp 2, thd: rank 0 holds tokens [0, 2) + [8, 10), rank 1 holds [2, 8));
    # log-ratios 0.01 * t: mean 0.045 -> s = e^0.045 inside [0.8, 1.2]; A = 1 -> J = -e^0.045 either way
    config = config_of(ratio_level="sequence")
    step = StepBatch(response_lengths=[10], total_lengths=[12], loss_masks=[torch.ones(10)])
    factory = ReducerFactory(config)
    logp = (0.01 * torch.arange(10, dtype=torch.float64)).requires_grad_(True)
    zeros, ones = torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    ranks = [(factory.pg_reducer(step, cp_rank=r, cp_size=2), factory.metric_reducer(step, cp_rank=r, cp_size=2))
             for r in range(2)]
    partials = [pg.sample_partial_means(logp[pg.token_index]) for pg, _ in ranks]
    total = torch.zeros((), dtype=torch.float64)
    for r, (pg, metric) in enumerate(ranks):
        others = sum(p for k, p in enumerate(partials) if k != r)
        index = pg.token_index
        loss, _ = policy_loss(logp[index], zeros[index], ones[index], pg, metric, config,
                              cp_all_reduce=lambda p, others=others: p + others)
        total = total + loss
    assert float(total.detach()) == pytest.approx(-math.exp(0.045), rel=1e-12)
    # dJ/dlogp_t = -A * s / |o| = -e^0.045 / 10 on every token, on both ranks
    total.backward()
    assert logp.grad.tolist() == pytest.approx([-math.exp(0.045) / 10] * 10, rel=1e-12)


def test_megatron_policy_loss_func_passes_the_cp_all_reduce_to_gspo():
    # the sample of the CP test above, through the Megatron adapter (sample_mean: returned loss = partial * k,
    # k = num_microbatches * dp_cp_size = 1 * 2): the two ranks' losses sum to 2 * (-e^0.045)
    from rl_loss.integrations.megatron import megatron_policy_loss_func

    config = config_of(ratio_level="sequence")
    step = StepBatch(response_lengths=[10], total_lengths=[12], loss_masks=[torch.ones(10)])
    factory = ReducerFactory(config)
    logp = 0.01 * torch.arange(10, dtype=torch.float64)
    indices = [factory.pg_reducer(step, cp_rank=r, cp_size=2).token_index for r in range(2)]
    partials = [factory.pg_reducer(step, cp_rank=r, cp_size=2).sample_partial_means(logp[indices[r]]) for r in range(2)]
    total = 0.0
    for r in range(2):
        loss_func = megatron_policy_loss_func(
            factory, step, old_logprobs=torch.zeros(len(indices[r]), dtype=torch.float64),
            advantages=torch.ones(len(indices[r]), dtype=torch.float64), num_microbatches=1, dp_cp_size=2,
            cp_rank=r, cp_size=2, cp_all_reduce=lambda p, other=partials[1 - r]: p + other,
            megatron_config=SimpleNamespace(calculate_per_token_loss=False),
        )
        loss, _, _ = loss_func(logp[indices[r]])
        total += float(loss)
    assert total == pytest.approx(-2 * math.exp(0.045), rel=1e-12)


# --- TIS and RS keep their meaning for every surrogate --------------------------------------------------------

# one sample of two tokens, r = 1 (logp = logp_old = ln 0.5), A = 1:
#   ppo_clip, gspo: l = -r A = -1;   cispo: l = -1 * 1 * ln 0.5 = ln 2;   sapo: l = -sigmoid(0) * 4 * 1 = -2
ON_POLICY_LOSS = {
    "ppo_clip": -1.0,
    "gspo": -1.0,
    "cispo": math.log(2.0),
    "sapo": -2.0,
}
SURROGATE_FIELDS = {
    "ppo_clip": {},
    "gspo": {"ratio_level": "sequence"},
    "cispo": {"surrogate": "cispo"},
    "sapo": {"surrogate": "sapo"},
}


@pytest.mark.parametrize("variant", list(SURROGATE_FIELDS))
def test_tis_weights_multiply_every_surrogates_per_token_loss(variant):
    # TIS [2, 0.5]: sample_mean = (2 l + 0.5 l) / 2 = 1.25 l
    config = config_of(**SURROGATE_FIELDS[variant])
    pg, metric = reducers([2], config)
    logp = t64([LN(0.5), LN(0.5)])
    loss, _ = policy_loss(logp, logp, t64([1.0, 1.0]), pg, metric, config, tis_weights=t64([2.0, 0.5]))
    assert float(loss) == pytest.approx(1.25 * ON_POLICY_LOSS[variant], rel=1e-12)


@pytest.mark.parametrize("variant", list(SURROGATE_FIELDS))
def test_rs_mask_drops_numerators_of_every_surrogate_but_keeps_the_denominator(variant):
    # RS rejects token 1: sample_mean = (l + 0) / |o| with |o| = 2 from the pre-RS mask -> l / 2
    config = config_of(**SURROGATE_FIELDS[variant])
    pg, metric = reducers([2], config)
    logp = t64([LN(0.5), LN(0.5)])
    loss, _ = policy_loss(logp, logp, t64([1.0, 1.0]), pg, metric, config, rs_mask=t64([1.0, 0.0]))
    assert float(loss) == pytest.approx(0.5 * ON_POLICY_LOSS[variant], rel=1e-12)


def test_hand_built_reducer_finds_each_local_values_sample_from_its_index():
    # samples [2, 0] of a step with R = [2, 3, 1]; local values: sample 2's token (flat 5), then sample 0's
    # tokens (flat 0, 1): local_sample_index [0, 1, 1]; partial means (v / |o_i|): [7 / 1, (1 + 2) / 2]
    from rl_loss import TokenReducer

    step = StepBatch(response_lengths=[2, 3, 1], total_lengths=[3, 4, 2], loss_masks=torch.ones(6))
    reducer = TokenReducer(torch.ones(3, dtype=torch.float64), torch.tensor([5, 0, 1]), step,
                           samples=torch.tensor([2, 0]))
    assert reducer.local_sample_index.tolist() == [0, 1, 1]
    assert reducer.sample_partial_means(t64([7.0, 1.0, 2.0])).tolist() == pytest.approx([7.0, 1.5], rel=1e-12)


def test_trl_trainer_divides_centred_advantages_by_their_batch_std():
    # TRL's scale_rewards="none" advantages c = r - mean_g, here two processes' shares [-1, 1] and [-4, 0, 4]:
    # sum c^2 = 34 over N = 5 -> std_B = sqrt(34 / 4) = sqrt(8.5); this process (the first) gets [-1, 1] / (std_B + eps)
    from rl_loss.integrations.trl import RLLossGRPOTrainer

    eps = 1e-6
    local = torch.tensor([-1.0, 1.0])
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(gather=lambda t: torch.cat([t, torch.tensor([-4.0, 0.0, 4.0])])),
        loss_config=LossConfig(advantage_estimator="grpo_batch_std", advantage_eps=eps),
    )
    got = RLLossGRPOTrainer._batch_std_advantages(fake, local)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([-1 / (math.sqrt(8.5) + eps), 1 / (math.sqrt(8.5) + eps)], rel=1e-6)
