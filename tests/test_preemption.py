"""Runs that survive preemption and crashes (docs/run-safety.md), as real processes: signals, SIGKILL at random
steps, a second launch into a live run, resume under a new DP x CP layout, submitit requeue.

The signal, SIGKILL and new-layout runs are forked from the test process (:mod:`tests.forked_launch`: the
same ``launchers.train`` entry, torchrun's environment for ranks, no cold interpreter); the SIGTERM to one
rank, the second launch and the submitit requeue go through the real command line (torchrun, python -m)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.runs.checkpoints import verify_checksum
from launchers.runs.run_lock import LOCK_NAME
from tests.forked_launch import ForkedRun
from tests.test_checkpoints import resumed_from
from tests.test_distributed import BASE, COMPARED, RTOL, free_port
from tests.test_trainer import ROOT, TINY, read_metrics, run_tiny, without_timing

pytestmark = pytest.mark.slow


def launch(run_dir: Path, *overrides: str) -> ForkedRun:
    """One process of ``python -m launchers.train TINY hydra.run.dir=RUN_DIR OVERRIDES``, forked."""
    return ForkedRun([*TINY, f"hydra.run.dir={run_dir}", *overrides], 1, run_dir.parent / f"{run_dir.name}-logs")


def wait_for_steps(proc: subprocess.Popen | ForkedRun, run_dir: Path, steps: int, timeout: float = 120) -> None:
    """Wait until ``run_dir/metrics.jsonl`` holds ``steps`` complete lines (and the lock names its owner)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_bytes().count(b"\n") >= steps and (run_dir / LOCK_NAME).exists()):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.005)


def lock_pid(run_dir: Path) -> int:
    return json.loads((run_dir / LOCK_NAME).read_text())["pid"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_signal_checkpoints_the_step_reached_then_resume_is_bit_identical(tmp_path, caplog, signum, code):
    run_dir = tmp_path / "stopped"
    proc = launch(run_dir, "trainer.max_steps=40", "trainer.save_every=100")
    wait_for_steps(proc, run_dir, 3)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert "Traceback" not in output
    last = read_metrics(run_dir)[-1]["step"]
    assert 3 <= last < 40
    checkpoint = run_dir / "checkpoints" / f"step_{last:06d}.pt"
    assert verify_checksum(checkpoint) is None, output  # written at the step reached, and it verifies
    assert f"{signal.Signals(signum).name}: finishing this step" in output
    assert not (run_dir / LOCK_NAME).exists()  # released on the way out
    with caplog.at_level(logging.INFO, "launchers.train"):
        resumed = run_tiny(run_dir, "trainer.max_steps=40", "trainer.save_every=100", "resume=true")
    assert resumed_from(caplog) == last
    straight = run_tiny(tmp_path / "straight", "trainer.max_steps=40", "trainer.save_every=100")
    assert without_timing(resumed) == without_timing(straight)


def test_second_launch_into_a_live_run_exits_2_naming_it(tmp_path):
    # the live run is any live process named in the folder's lock (a training run takes it the same
    # way: tests/test_run_guard.py); the second launch must stop before Hydra writes into the folder
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        started = "2026-11-27 10:00:00"
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"host": os.uname().nodename, "pid": owner.pid, "started": started, "process_start": None, "job_id": None}))
        second = subprocess.run(
            [sys.executable, "-m", "launchers.train", *TINY, f"hydra.run.dir={tmp_path}", "resume=true"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"run folder {tmp_path} is in use by a live run: pid {owner.pid} on host {os.uname().nodename} "
            f"(started {started}). Wait for it to end or choose another hydra.run.dir"
        ]
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no .hydra/, no log: untouched
    finally:
        owner.kill()
        owner.wait()


def test_sigkill_at_random_steps_then_resume_ends_with_the_uninterrupted_metrics(tmp_path):
    # two steps per rollout (checkpoints hold half-used rollouts) and a checkpoint every step, so the
    # kills land in every phase: mid-step, mid-metrics line, mid-checkpoint, between checkpoint and checksum
    overrides = ["trainer.max_steps=24", "trainer.save_every=1", "trainer.global_batch_size=8",
                 "trainer.micro_batch_size=4"]
    started = time.monotonic()
    straight = run_tiny(tmp_path / "straight", *overrides)
    kill_steps = sorted(random.Random(12).sample(range(2, 23), 3))
    run_dir = tmp_path / "killed"
    outputs = []
    for n, step in enumerate(kill_steps):
        proc = launch(run_dir, *overrides, *(["resume=true"] if n else []))
        wait_for_steps(proc, run_dir, step)
        proc.kill()
        outputs.append(proc.communicate(timeout=60)[0])
        assert proc.returncode == -signal.SIGKILL
    final = launch(run_dir, *overrides, "resume=true")
    output, _ = final.communicate(timeout=120)
    assert final.returncode == 0, output
    assert "Traceback" not in output
    # each resume continued from the state reached (metrics line k is written before checkpoint k, so
    # checkpoint k - 1 was complete), not from step 0, which would give the same metrics too
    for killed_at, out in zip(kill_steps, [*outputs[1:], output], strict=True):
        resumed = re.search(r"resumed from \S+ \(step (\d+)\)", out)
        assert resumed and int(resumed.group(1)) >= killed_at - 1, out[-2000:]
    assert without_timing(read_metrics(run_dir)) == without_timing(straight)
    print(f"fault injection: kills after steps {kill_steps}, {time.monotonic() - started:.1f} s")


def torchrun(run_dir: Path, nproc: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
            "-m", "launchers.train", *BASE, *overrides, f"hydra.run.dir={run_dir}"]


def test_resume_under_a_new_dp_cp_layout_continues_the_trajectory(tmp_path):
    # one process to step 3 (mid-rollout), then 2 ranks (torchrun's environment) with CP 2 to step 6
    from launchers.backends.toy.trainer import train
    from launchers.config.preflight import compose_job

    train(compose_job([*BASE, "trainer.max_steps=6"]).config, tmp_path / "straight")
    straight = read_metrics(tmp_path / "straight")
    run_dir = tmp_path / "relaid"
    train(compose_job([*BASE, "trainer.max_steps=4", "trainer.save_every=3"]).config, run_dir)
    (run_dir / "checkpoints" / "step_000004.pt").unlink()
    ranks = ForkedRun([*BASE, "trainer.max_steps=6", "trainer.save_every=3", "resume=true", "parallel.cp_size=2",
                       f"hydra.run.dir={run_dir}"], 2, tmp_path / "relaid-logs")
    output, _ = ranks.communicate(timeout=300)  # rank 0's
    assert [code for code, _ in ranks.results()] == [0, 0], [log[-3000:] for _, log in ranks.results()]
    assert "accepted run-invariant change parallel.cp_size: 1 -> 2" in output
    assert re.search(r"resumed from \S+step_000003.pt \(step 3\)", output)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert without_timing(records[:3]) == without_timing(straight[:3])
    for got, want in zip(records[3:], straight[3:], strict=True):
        for key in ("reward_mean", "response_length_mean", "tokens"):
            assert got[key] == want[key], key  # the same rollouts
        for key, floor in COMPARED.items():
            assert got[key] == pytest.approx(want[key], rel=RTOL, abs=floor), (got["step"], key)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    proc = subprocess.Popen(torchrun(tmp_path, 2, "parallel.cp_size=1", "trainer.max_steps=400",
                                     "trainer.save_every=400"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(proc, tmp_path, 2, timeout=240)
    os.kill(lock_pid(tmp_path), signal.SIGTERM)  # rank 0 only; rank 1 learns it in the step's all-reduce
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0
    # rank 0 exits 143 once the checkpoint of the step is written, which needs rank 1 at the same step's
    # barrier (a rank that went on would leave it waiting: the hang this test guards against). torchrun then
    # ends rank 1 itself if rank 1 has not exited yet, so rank 1's own report is 143 or torchrun's SIGTERM.
    assert "exitcode  : 143" in output, output[-4000:]
    last = read_metrics(tmp_path)[-1]["step"]
    assert verify_checksum(tmp_path / "checkpoints" / f"step_{last:06d}.pt") is None


def test_submitit_requeue_resumes_the_run(tmp_path):
    # Hydra's submitit launcher (local executor): submitit's preemption signal (USR2) stops the run
    # after the step with a checkpoint, then submitit requeues the job, which resumes by itself.
    overrides = ["trainer.max_steps=30", "trainer.save_every=1000"]
    straight = run_tiny(tmp_path / "straight", *overrides)
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launchers.train", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
         "hydra.sweep.subdir=job", *TINY, *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for_steps(proc, sweep / "job", 5, timeout=240)
    os.kill(lock_pid(sweep / "job"), signal.SIGUSR2)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    log = (sweep / "job" / "train.log").read_text()
    assert "SIGUSR2: finishing this step" in log
    assert "Requeued job" in log and "requeued attempt of job submitit-local:" in log
    history = json.loads((sweep / "job" / "run_config.json").read_text())["history"]
    assert [h["event"] for h in history] == ["start", "resume"] and history[1]["step"] >= 5
    assert without_timing(read_metrics(sweep / "job")) == without_timing(straight)
