"""A tiny multirun sweep (joblib launcher, jobs in parallel) and its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launchers.report import JobRun, markdown_table

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "rollout.prompts_per_rollout=2", "rollout.n_samples_per_prompt=4", "rollout.max_response_len=6",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.max_steps=2",
    "model.d_model=16", "model.n_layers=1", "progress=log",
]


@pytest.mark.slow
def test_joblib_sweep_runs_every_job_and_report_draws_them(tmp_path):
    sweep = subprocess.run(
        [sys.executable, "-m", "launchers.train", "-m", "loss=grpo,drgrpo", *TINY,
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 2
    report = subprocess.run(
        [sys.executable, "-m", "launchers.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "report.md").read_text()
    assert "loss=grpo" in table and "loss=drgrpo" in table
    assert "| sample_mean |" in table and "| constant |" in table
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_table_gain_is_last_quarter_minus_first():
    # 8 steps: first quarter (steps 1-2) rewards 0.1, 0.3 -> 0.2; last quarter (7-8) 0.6, 0.8 -> 0.7
    rewards = [0.1, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.8]
    records = [
        {"step": i + 1, "reward_mean": r, "response_length_mean": 4.0, "loss_scale_vs_token_mean": 1.0,
         "grad_norm": 0.5, "aggregation": "token_mean"}
        for i, r in enumerate(rewards)
    ]
    row = markdown_table([JobRun("loss=dapo", records)]).splitlines()[2]
    assert row == "| loss=dapo | token_mean | 8 | 0.200 | 0.700 | +0.500 | 4.00 | 1 | 0.5 |"


def test_report_on_empty_folder_says_what_to_do(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launchers.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "no metrics.jsonl" in result.stderr
