"""Short training runs: a smoke run per preset, exact resume, Ctrl-C checkpoint, errors before any model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.backends.toy.trainer import train
from launchers.config.preflight import compose_job

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "rollout.prompts_per_rollout=4",
    "rollout.n_samples_per_prompt=4",
    "rollout.max_response_len=8",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=8",
    "model.d_model=32",
    "model.n_layers=1",
    "progress=log",
]
TIMING_KEYS = {"step_seconds", "train_tokens_per_second"}
REQUIRED_KEYS = {
    "step", "reward_mean", "response_length_mean", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "grad_norm",
    "loss_scale_vs_token_mean", "tokens", "aggregation",
}


def run_tiny(tmp_path: Path, *overrides: str) -> list[dict]:
    job = compose_job([*TINY, *overrides])
    train(job.config, tmp_path)
    return read_metrics(tmp_path)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.parametrize(
    ("preset", "aggregation"),
    [("grpo", "sample_mean"), ("dapo", "token_mean"), ("drgrpo", "constant"), ("scalerl", "prompt_mean"),
     ("gspo", "sample_mean"), ("cispo", "token_mean"), ("sapo", "sample_mean")],
)
def test_smoke_run_per_preset_writes_every_metric(tmp_path, preset, aggregation):
    records = run_tiny(tmp_path, f"loss={preset}", "trainer.max_steps=2")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record.keys() >= REQUIRED_KEYS
        assert record["aggregation"] == aggregation
        assert all(v == v for v in record.values() if isinstance(v, float)), record  # no NaN
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "step_000002.pt").exists()


def test_token_mean_reports_unit_loss_scale(tmp_path):
    records = run_tiny(tmp_path, "loss=dapo", "trainer.max_steps=1")
    assert records[0]["loss_scale_vs_token_mean"] == pytest.approx(1.0, rel=1e-12)


def test_drgrpo_with_large_divisor_has_tiny_loss_scale(tmp_path):
    # constant: sum w = T / (N * L); with L = 40960 and responses of at most 8 tokens it is below 8 / 40960
    records = run_tiny(tmp_path, "loss=drgrpo", "loss.divisor=40960", "trainer.max_steps=1")
    record = records[0]
    expected = record["tokens"] / (16 * 40960)
    assert record["loss_scale_vs_token_mean"] == pytest.approx(expected, rel=1e-9)
    assert record["loss_scale_vs_token_mean"] < 8 / 40960


def test_trajectory_mean_in_the_launcher_trains_exactly_as_sample_mean(tmp_path):
    # every launcher sample is its own trajectory (docs/aggregation.md): same weights, so the same run, bit for bit
    trajectory = run_tiny(tmp_path / "trajectory", "loss.aggregation=trajectory_mean", "trainer.max_steps=2")
    sample = run_tiny(tmp_path / "sample", "loss.aggregation=sample_mean", "trainer.max_steps=2")
    assert [r["aggregation"] for r in trajectory] == ["trajectory_mean"] * 2
    assert [r["aggregation"] for r in sample] == ["sample_mean"] * 2
    for record in (*trajectory, *sample):
        del record["aggregation"]
    assert without_timing(trajectory) == without_timing(sample)


def test_resume_continues_bit_identically(tmp_path):
    straight = run_tiny(tmp_path / "straight", "trainer.max_steps=6", "trainer.save_every=2")
    run_tiny(tmp_path / "split", "trainer.max_steps=3", "trainer.save_every=2")
    resumed = run_tiny(tmp_path / "split", "trainer.max_steps=6", "trainer.save_every=2", "resume=true")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert without_timing(resumed) == without_timing(straight)


def test_resume_mid_rollout_continues_bit_identically(tmp_path):
    # two optimizer steps per rollout; the checkpoint after step 3 holds the half-used rollout
    several = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.save_every=3"]
    straight = run_tiny(tmp_path / "straight", "trainer.max_steps=6", *several)
    run_tiny(tmp_path / "split", "trainer.max_steps=4", *several)
    (tmp_path / "split" / "checkpoints" / "step_000004.pt").unlink()  # resume from step 3
    resumed = run_tiny(tmp_path / "split", "trainer.max_steps=6", *several, "resume=true")
    assert without_timing(resumed) == without_timing(straight)


def test_checkpoints_are_written_atomically(tmp_path):
    run_tiny(tmp_path, "trainer.max_steps=2", "trainer.save_every=1")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # each checkpoint with its checksum beside it, and no temporary file left behind
    assert names == ["step_000001.pt", "step_000001.pt.sha256", "step_000002.pt", "step_000002.pt.sha256"]


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launchers.train", *TINY, f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_ctrl_c_writes_a_checkpoint_before_exiting(tmp_path):
    proc = launch(tmp_path, "trainer.max_steps=500", "trainer.save_every=500")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert (tmp_path / "checkpoints" / f"step_{steps[-1]:06d}.pt").exists(), output
    assert "resume=true" in output


def test_config_error_stops_before_any_model_is_built(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launchers.train", f"hydra.run.dir={tmp_path}", "loss=drgrpo", "loss.divisor=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "loss.divisor: must be a finite number > 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run folder content: nothing started


def test_kl_penalty_builds_a_reference_and_logs_kl_loss(tmp_path):
    records = run_tiny(tmp_path, "loss=dapo", "loss.kl_coef=0.04", "loss.kl_estimator=k3", "trainer.max_steps=2")
    # k3 >= 0; at step 1 the policy still equals the reference, so the estimate is 0 up to float32 noise
    assert abs(records[0]["kl_loss"]) < 1e-6
    assert records[1]["kl_loss"] > 1e-9  # one AdamW step later the policy has moved away from it
