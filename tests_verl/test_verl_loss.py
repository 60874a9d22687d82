"""rl-loss inside verl 0.9.1: verl's real ppo_loss / agg_loss path, several micro-batches, a simulated DP of 2."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from harness import (
    N,
    actor_config,
    data_proto,
    make_step,
    reference_gradient,
    reference_objective,
    run_verl_step,
)
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import ActorConfig, PolicyLossConfig

from rl_loss.integrations.verl import RLLossPolicyLossConfig, make_loss_fn, rl_loss_policy_loss

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")

COUNT_MODES = [("sample_mean", {}), ("token_mean", {}), ("constant", {"divisor": 6.0})]
STEP_MODES = [("prompt_mean", {}), ("trajectory_mean", {})]
TRAJECTORY_KEY = {"trajectory_mean": "trajectory"}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    assert float(expected.abs().max()) > 1e-3  # a real gradient, not two zeros agreeing
    assert float((actual - expected).abs().max()) <= tol * float(expected.abs().max())


def test_import_verl_loads_the_plugin_through_the_entry_point():
    (entry,) = [e for e in entry_points(group="verl.plugins") if e.name == "rl_loss"]
    assert entry.value == "rl_loss.integrations.verl_plugin"
    assert "rl_loss.integrations.verl_plugin" in sys.modules  # imported by `import verl` (conftest), not by us
    assert POLICY_LOSS_REGISTRY["rl_loss"] is rl_loss_policy_loss


@pytest.mark.parametrize("micro_batch_size", [1, 2])
@pytest.mark.parametrize(("mode", "extra"), COUNT_MODES)
def test_policy_loss_gradient_is_the_step_objective_gradient(mode, extra, micro_batch_size):
    # loss_mode=rl_loss alone (verl's own ppo_loss calls it): exact from verl's global_batch_info
    config = actor_config({"aggregation": mode, **extra}, clip_ratio_low=0.2, clip_ratio_high=0.28)
    step = make_step()
    losses, grad = run_verl_step(config, step, micro_batch_size)
    assert sum(losses) / 2 == pytest.approx(float(reference_objective(config, step)), rel=1e-6)
    assert_close(grad, reference_gradient(config, step))


@pytest.mark.parametrize("micro_batch_size", [1, 2])
@pytest.mark.parametrize(("mode", "extra"), COUNT_MODES + STEP_MODES)
def test_whole_loss_gradient_is_the_step_objective_gradient(mode, extra, micro_batch_size):
    # set_loss_fn(make_loss_fn(...)) with the driver's step scales: every mode, groups and trajectories
    # split over micro-batches and DP ranks (DP_SHARDS puts the two samples of p0, p1, p2, p3 apart)
    config = actor_config({"aggregation": mode, **extra})
    step = make_step(seed=1)
    losses, grad = run_verl_step(config, step, micro_batch_size, True, TRAJECTORY_KEY.get(mode))
    assert sum(losses) / 2 == pytest.approx(float(reference_objective(config, step)), rel=1e-6)
    assert_close(grad, reference_gradient(config, step))


@pytest.mark.parametrize(
    "section",
    [{"surrogate": "cispo"}, {"surrogate": "sapo"}, {"ratio_level": "sequence"}],
    ids=["cispo", "sapo", "gspo"],
)
@pytest.mark.parametrize("mode", ["token_mean", "prompt_mean"])
def test_every_surrogate_composes_with_the_modes(section, mode):
    config = actor_config({"aggregation": mode, **section}, clip_ratio_high=0.28, tau_pos=1.0, tau_neg=1.05)
    step = make_step(seed=2)
    _, grad = run_verl_step(config, step, 2, whole_loss=True)
    assert_close(grad, reference_gradient(config, step))


def test_token_mean_by_hand_at_ratio_one():
    # old == new: ratio 1, no clip binds, l = -A.  Masked tokens |o| = 5,3,1,0,4,4,2,3 (T = 22), A as in harness:
    # J = -(5*1 - 3*0.5 + 1*0.7 + 0 + 4*0.3 - 4*0.8 + 2*1.5 - 3*0.1) / 22 = -4.9 / 22; dJ/dlogp[i,t] = -A_i / 22
    config = actor_config({"aggregation": "token_mean"})
    step = make_step()
    step.old_log_prob = step.log_prob.detach().clone()
    losses, grad = run_verl_step(config, step, 2)
    assert sum(losses) / 2 == pytest.approx(-4.9 / 22, rel=1e-12)
    assert float(grad[0, 0]) == pytest.approx(-1.0 / 22, rel=1e-12)
    assert float(grad[5, 3]) == pytest.approx(0.8 / 22, rel=1e-12)
    assert float(grad[4, 1]) == 0.0  # a masked token


def test_prompt_mean_by_hand_at_ratio_one():
    # groups (samples, tokens, sum A*|o|): p0 (0,1: 8, 5 - 1.5 = 3.5), p1 (2,3: 1, 0.7), p2 (4,5: 8, 1.2 - 3.2 = -2),
    # p3 (6,7: 5, 3 - 0.3 = 2.7); P = 4:  J = -(3.5/8 + 0.7/1 - 2/8 + 2.7/5) / 4 = -1.4275 / 4 = -0.356875
    config = actor_config({"aggregation": "prompt_mean"})
    step = make_step()
    step.old_log_prob = step.log_prob.detach().clone()
    losses, grad = run_verl_step(config, step, 1, whole_loss=True)
    assert sum(losses) / 2 == pytest.approx(-0.356875, rel=1e-12)
    assert float(grad[2, 0]) == pytest.approx(-0.7 / 4, rel=1e-12)  # -A_2 / (P * 1 token of p1)


@pytest.mark.parametrize(
    ("mode", "extra", "verl_mode"),
    [
        ("token_mean", {}, "token-mean"),
        ("sample_mean", {}, "seq-mean-token-mean"),
        ("constant", {"divisor": 6.0}, "seq-mean-token-sum-norm"),
    ],
)
def test_native_modes_give_verl_agg_loss_numbers(mode, extra, verl_mode):
    # verl's vanilla loss + agg_loss: same clip (0.2 / 0.28, dual clip 3.0), same micro-batches, same DP
    clips = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}
    ours = actor_config({"aggregation": mode, **extra}, **clips)
    theirs = ActorConfig(
        strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=2, policy_loss=PolicyLossConfig(loss_mode="vanilla"),
        loss_agg_mode=verl_mode, loss_scale_factor=6 if mode == "constant" else None, **clips,
    )
    step = make_step(seed=3)
    our_losses, our_grad = run_verl_step(ours, step, 2)
    their_losses, their_grad = run_verl_step(theirs, step, 2)
    assert our_losses == pytest.approx(their_losses, rel=1e-12, abs=1e-15)
    assert_close(our_grad, their_grad, tol=1e-12)


def test_verl_builds_the_section_from_its_config_and_refuses_a_bad_one():
    node = {"_target_": "rl_loss.integrations.verl.RLLossPolicyLossConfig", "loss_mode": "rl_loss",
            "rl_loss": {"aggregation": "constant", "divisor": 4096}}
    built = omega_conf_to_dataclass(node)  # how verl instantiates actor.policy_loss (its _target_)
    assert isinstance(built, RLLossPolicyLossConfig) and built.rl_loss["divisor"] == 4096
    with pytest.raises(Exception, match=r"policy_loss\.rl_loss\.divisor: must be a finite number > 0"):
        omega_conf_to_dataclass({**node, "rl_loss": {"aggregation": "constant"}})


def test_section_with_another_loss_mode_is_refused():
    with pytest.raises(ValueError, match=r"policy_loss\.loss_mode: .*would be ignored \(got 'vanilla'\)"):
        RLLossPolicyLossConfig(loss_mode="vanilla", rl_loss={"aggregation": "token_mean"})


def test_a_setting_verl_owns_is_refused_naming_verl_field():
    with pytest.raises(ValueError, match=r"rl_loss\.kl_coef: verl owns .* set actor_rollout_ref\.actor\.kl_loss_coef"):
        RLLossPolicyLossConfig(loss_mode="rl_loss", rl_loss={"kl_coef": 0.1})


def test_prompt_mean_without_the_whole_loss_is_refused():
    config = actor_config({"aggregation": "prompt_mean"})
    with pytest.raises(ValueError, match=r"aggregation=prompt_mean needs the step's prompt groups.*set_loss_fn"):
        run_verl_step(config, make_step(), 2)


def test_scales_over_another_step_size_are_refused():
    # the driver scaled the whole rollout (8 samples) but verl's optimizer step is a mini-batch of 4
    config = actor_config({"aggregation": "prompt_mean"})
    from harness import left_right_2_no_padding, tu  # verl's own helpers, as the harness imports them

    from rl_loss.integrations.verl import actor_loss_config, add_step_scales

    batch = data_proto(make_step())
    add_step_scales(batch, actor_loss_config(config))
    data = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=1, global_batch_size=N // 2)
    with pytest.raises(ValueError, match=r"computed over 8 samples but verl's optimizer step has 4"):
        make_loss_fn(config)(model_output={"log_probs": torch.zeros(1)}, data=data)


def test_rl_loss_and_the_verl_config_check_import_no_verl(tmp_path):
    # in this environment verl IS installed: neither `import rl_loss` nor checking a verl config loads it
    config = tmp_path / "ppo_trainer.yaml"
    config.write_text("actor_rollout_ref: {actor: {policy_loss: {_target_: verl.workers.config.PolicyLossConfig}}}\n")
    code = (
        "import sys, rl_loss, rl_loss.validate; from pathlib import Path; "
        "from rl_loss.integrations.verl_config import verl_config_problems; "
        f"problems, _, _ = verl_config_problems(Path({str(config)!r})); assert problems; "
        "print(','.join(m for m in sys.modules if m.split('.')[0] == 'verl'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_verl_builds_the_actor_config_with_the_section_and_the_loss_runs_on_it():
    # the actor node as the worker converts it (omega_conf_to_dataclass(self.config.actor)): nested _target_s
    node = {
        "_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "rollout_n": 2,
        "ppo_mini_batch_size": 4, "ppo_micro_batch_size_per_gpu": 2, "clip_ratio_high": 0.28,
        "policy_loss": {"_target_": "rl_loss.integrations.verl.RLLossPolicyLossConfig", "loss_mode": "rl_loss",
                        "rl_loss": {"aggregation": "trajectory_mean"}},
    }
    config = omega_conf_to_dataclass(node)
    assert isinstance(config.policy_loss, RLLossPolicyLossConfig)
    step = make_step(seed=4)
    _, grad = run_verl_step(config, step, 2, whole_loss=True, trajectory_key="trajectory")
    assert_close(grad, reference_gradient(config, step))


@pytest.mark.parametrize(("mode", "extra"), COUNT_MODES + STEP_MODES)
def test_dynamic_batch_size_regrouping_keeps_the_gradient(mode, extra):
    # use_dynamic_bsz: verl packs each rank's samples into micro-batches of <= 12 tokens, reordered by length
    config = actor_config({"aggregation": mode, **extra})
    step = make_step(seed=5)
    _, grad = run_verl_step(config, step, 2, True, TRAJECTORY_KEY.get(mode), max_token_len=12)
    assert_close(grad, reference_gradient(config, step))
