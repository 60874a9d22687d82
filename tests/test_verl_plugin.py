"""The verl entry point and the per-sample scales, checked in the main environment (no verl here)."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch

from rl_loss import LossConfig
from rl_loss.integrations.verl_scales import count_scales, loss_config, section_problems, step_sample_scales

ROOT = Path(__file__).resolve().parent.parent


def test_plugin_that_cannot_load_says_so_at_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "verl", None)  # `import verl...` raises ImportError, as without rl-loss[verl]
    monkeypatch.delitem(sys.modules, "rl_loss.integrations.verl_plugin", raising=False)
    monkeypatch.delitem(sys.modules, "rl_loss.integrations.verl", raising=False)
    with caplog.at_level(logging.WARNING), pytest.raises(ImportError):
        importlib.import_module("rl_loss.integrations.verl_plugin")
    (record,) = [r for r in caplog.records if r.name == "rl_loss.integrations.verl_plugin"]
    assert record.levelno == logging.WARNING
    assert "loss_mode=rl_loss is unavailable" in record.getMessage()


def test_entry_point_and_extra_are_declared():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    section = text.split('[project.entry-points."verl.plugins"]', 1)[1].split("\n[", 1)[0]
    assert 'rl_loss = "rl_loss.integrations.verl_plugin"' in section.splitlines()
    assert 'verl = ["verl>=0.9.1,<0.10"]' in text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]


def test_count_scales_by_hand():
    # |o| = 4, 0, 2; N = 8 samples, T = 20 tokens in verl's step, L = 10
    tokens = torch.tensor([4.0, 0.0, 2.0])
    # sample_mean: 1 / (N * max(|o_i|, 1)) = 1/32, 1/8, 1/16
    assert count_scales("sample_mean", tokens, 8, 20, None).tolist() == [1 / 32, 1 / 8, 1 / 16]
    assert count_scales("token_mean", tokens, 8, 20, None).tolist() == [1 / 20] * 3  # 1 / T
    assert count_scales("constant", tokens, 8, 20, 10.0).tolist() == [1 / 80] * 3  # 1 / (N * L)


def test_count_scales_refuse_what_verl_did_not_fill():
    with pytest.raises(ValueError, match=r"global_batch_info\['batch_num_tokens'\] is None"):
        count_scales("token_mean", torch.ones(2), 8, None, None)
    with pytest.raises(ValueError, match=r"global_batch_info\['global_batch_size'\] is None"):
        count_scales("sample_mean", torch.ones(2), None, 5, None)
    with pytest.raises(ValueError, match=r"prompt_mean needs the step's prompt groups"):
        count_scales("prompt_mean", torch.ones(2), 8, 5, None)


def test_step_scales_of_prompt_and_trajectory_means_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]])  # |o| = 2, 1, 0, 3
    # prompt groups a = {0, 1} (3 tokens), b = {2, 3} (3 tokens), P = 2: c = 1 / (2 * 3) for all
    scales = step_sample_scales(LossConfig(aggregation="prompt_mean"), mask, ["a", "a", "b", "b"])
    assert scales.tolist() == pytest.approx([1 / 6] * 4, rel=1e-15)
    # trajectories x = {0} (2), y = {1, 2} (1), z = {3} (3), Q = 3: 1/6, 1/3, 1/3, 1/9
    scales = step_sample_scales(LossConfig(aggregation="trajectory_mean"), mask, None, ["x", "y", "y", "z"])
    assert scales.tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 3, 1 / 9], rel=1e-15)


def test_section_problems_are_one_line_each():
    lines = section_problems({"aggregation": "token_mean", "entropy_coef": 0.01, "agregation": "x"})
    assert len(lines) == 2
    assert lines[0].startswith("actor_rollout_ref.actor.policy_loss.rl_loss.entropy_coef: verl owns this setting")
    assert lines[1].startswith("actor_rollout_ref.actor.policy_loss.rl_loss.agregation: unknown key; did you mean")
    assert section_problems({"aggregation": "constant"}) == [
        "actor_rollout_ref.actor.policy_loss.rl_loss.divisor: must be a finite number > 0 when aggregation=constant "
        "(got None); set it to the generation budget, e.g. the rollout's max response length"
    ]


def test_loss_config_takes_verl_clip_ranges():
    actor = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    config = loss_config({"aggregation": "token_mean"}, actor)
    assert (config.clip_low, config.clip_high, config.eps_clip_c) == (0.2, 0.28, 3.0)
    assert loss_config({"surrogate": "sapo"}, {"tau_pos": 1.5, "tau_neg": 2.0}).tau_neg == 2.0
