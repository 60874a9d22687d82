"""The progress line and the lines a run ends with (finished, stopped by Ctrl-C), and that their commands work."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from launchers.runs.run_io import Progress, format_duration
from launchers.runs.summary import hydra_path_override, launcher_command, resume_command, summary_lines
from tests.forked_launch import ForkedRun

ROOT = Path(__file__).resolve().parent.parent
REWARDS = [0.1, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.8]  # first quarter (2 steps) 0.2, last quarter 0.7
TINY = ["rollout.prompts_per_rollout=2", "rollout.n_samples_per_prompt=4", "rollout.max_response_len=6",
        "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "model.d_model=16", "model.n_layers=1",
        "progress=log"]


def records(n: int) -> list[dict]:
    return [{"step": i + 1, "reward_mean": r} for i, r in enumerate(REWARDS[:n])]


def make_run(folder: Path, overrides: list[str]) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "tensorboard").mkdir()
    return folder


def test_finished_run_says_steps_time_reward_quarters_folder_and_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "outputs" / "day" / "time", ["loss=dapo", "trainer.max_steps=8"])
    lines = summary_lines(run, records(8), outcome="finished", wall_seconds=4.0, first_step=0, last_step=8, max_steps=8)
    # 8 steps in 4 s: 2 steps/s; reward quarters 0.2 -> 0.7; continuing doubles max_steps
    assert lines == [
        "finished: 8 steps in 4s, 2.00 steps/s; reward 0.200 (first quarter) -> 0.700 (last quarter), +0.500",
        "run folder: outputs/day/time",
        "  curves:   tensorboard --logdir outputs/day/time/tensorboard",
        "  report:   python -m launchers.report outputs/day/time",
        "  continue: python -m launchers.train loss=dapo resume=true trainer.max_steps=16 hydra.run.dir=outputs/day/time",
    ]


def test_stopped_run_prints_the_resume_command_with_its_own_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "outputs" / "t", ["loss=dapo", "trainer.max_steps=8"])
    lines = summary_lines(run, records(5), outcome="stopped", wall_seconds=2.0, first_step=0, last_step=5, max_steps=8)
    # 5 steps: quarter = 1 step, 0.1 -> 0.5
    assert lines[0] == ("stopped at step 5 of 8 after 2s, 2.50 steps/s; checkpoint written; "
                        "reward 0.100 (first quarter) -> 0.500 (last quarter), +0.400")
    assert lines[-1] == "  resume:   python -m launchers.train loss=dapo trainer.max_steps=8 resume=true hydra.run.dir=outputs/t"


def test_resumed_session_counts_its_own_steps(tmp_path):
    run = make_run(tmp_path / "r", [])
    lines = summary_lines(run, records(8), outcome="finished", wall_seconds=2.0, first_step=4, last_step=8, max_steps=8)
    assert lines[0].startswith("finished: steps 5-8 in 2s, 2.00 steps/s;")


def test_a_job_of_a_sweep_is_reported_with_its_sweep_and_resumed_in_its_quoted_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "multirun" / "x").mkdir(parents=True)
    (tmp_path / "multirun" / "x" / "multirun.yaml").write_text("{}\n")
    run = make_run(tmp_path / "multirun" / "x" / "0_loss=dapo,seed=1", ["loss=dapo", "seed=1", "resume=false"])
    lines = summary_lines(run, records(8), outcome="aborted", wall_seconds=1.0, first_step=0, last_step=3, max_steps=8)
    assert lines[3] == "  report:   python -m launchers.report multirun/x"
    command = lines[-1].removeprefix("  resume:   ")
    assert command == "python -m launchers.train loss=dapo seed=1 resume=true \"hydra.run.dir='multirun/x/0_loss=dapo,seed=1'\""
    # the shell hands Hydra one argument, and Hydra's own parser reads the folder back unchanged
    parsed = OverridesParser.create().parse_override(shlex.split(command)[-1])
    assert parsed.value() == "multirun/x/0_loss=dapo,seed=1"


@pytest.mark.parametrize("path", ["outputs/2026-11-27/10-00-00", "/tmp/a b/c", "/tmp/it's", "/tmp/x~y,z=1"])
def test_hydra_path_override_reads_back_as_the_path(path):
    assert OverridesParser.create().parse_override(hydra_path_override("hydra.run.dir", path)).value() == path


def test_resume_command_drops_the_overrides_it_sets_itself(tmp_path):
    run = make_run(tmp_path / "r", ["resume=true", "loss=grpo", "trainer.max_steps=8"])
    command = resume_command(run, extra=["trainer.max_steps=16"])
    assert command.split()[3:6] == ["loss=grpo", "resume=true", "trainer.max_steps=16"]


def test_torchrun_runs_are_resumed_with_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launcher_command(4) == "torchrun --nproc-per-node 4 -m launchers.train"
    assert launcher_command(16, local_world_size=8).startswith("torchrun --nnodes 2 --nproc-per-node 8 ")
    assert launcher_command(1) == "python -m launchers.train"


def test_accelerate_runs_are_resumed_with_accelerate_launch(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch exports it to every process
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert launcher_command(4) == "accelerate launch --multi_gpu --num_processes 4 -m launchers.train"
    assert launcher_command(16, local_world_size=8) == (
        "accelerate launch --multi_gpu --num_machines 2 <your machine-rank and main-process flags> "
        "--num_processes 16 -m launchers.train")
    assert launcher_command(1) == "python -m launchers.train"


@pytest.mark.parametrize(("seconds", "text"), [(42.4, "42s"), (187, "3:07"), (3729, "1:02:09")])
def test_durations_read_as_clock_times(seconds, text):
    assert format_duration(seconds) == text


def step_record(step: int) -> dict:
    return {"step": step, "reward_mean": 0.25, "response_length_mean": 4.5, "pg_loss": 0.0, "ppo_kl": 1.5e-4,
            "entropy": 2.125, "grad_norm": 0.875}


def test_progress_shows_reward_length_entropy_grad_norm_but_not_pg_loss():
    fields = Progress(10, 0, "log", enabled=True).fields(step_record(1))
    assert fields == {"reward": "0.250", "len": "4.5", "ent": "2.125", "gn": "0.875"}


def test_progress_shows_the_kl_to_the_rollout_policy_when_a_rollout_feeds_several_steps():
    assert Progress(10, 0, "log", show_kl=True).fields(step_record(1))["kl"] == "1.50e-04"


def test_progress_log_line_has_rate_and_time_left(caplog):
    progress = Progress(4, 0, "log")
    with caplog.at_level(logging.INFO, logger="launchers.train"):
        for step in range(1, 5):
            progress.update(step_record(step))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0] == "step 1/4  reward=0.250  len=4.5  ent=2.125  gn=0.875"  # no rate before a second step
    assert re.fullmatch(r"step 2/4  reward=0\.250  len=4\.5  ent=2\.125  gn=0\.875  [\d.]+ step/s  ETA \S+", lines[1])
    assert lines[-1].endswith("ETA 0s")


def test_progress_prints_nothing_on_other_ranks(caplog):
    with caplog.at_level(logging.INFO, logger="launchers.train"):
        Progress(4, 0, "log", enabled=False).update(step_record(1))
    assert caplog.records == []


@pytest.mark.slow
def test_continue_command_of_a_finished_run_runs_and_extends_it(tmp_path):
    # both runs are forked from the test process (tests/forked_launch.py): the printed command's arguments
    # go through the same launchers.train entry a `python -m launchers.train` runs
    folder = tmp_path / "0_loss=dapo,seed=0"
    first = ForkedRun(["loss=dapo", *TINY, "trainer.max_steps=2", hydra_path_override("hydra.run.dir", str(folder))],
                      1, tmp_path / "first-logs")
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output[-3000:]
    assert "finished: 2 steps in " in output
    command = next(line for line in output.splitlines() if "  continue: " in line).split("  continue: ", 1)[1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "launchers.train"]
    second = ForkedRun(argv[3:], 1, tmp_path / "second-logs")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 4
    assert "finished: steps 3-4 in " in output


@pytest.mark.slow
def test_ctrl_c_ends_with_the_resume_command(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "launchers.train", *TINY, "trainer.max_steps=2000", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 1/2000" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    output = "".join(seen) + rest
    assert proc.returncode != 0
    assert re.search(r"stopped at step \d+ of 2000 after ", output)
    resume = next(line for line in output.splitlines() if "  resume:   " in line)
    assert resume.endswith(f"resume=true hydra.run.dir={tmp_path}")
    assert "trainer.max_steps=2000" in resume
