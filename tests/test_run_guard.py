"""Resume guard, run-folder lock and stop requests (docs/run-safety.md), in one process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from launchers.config.run_config import RunConfig
from launchers.runs.preemption import StopRequest
from launchers.runs.recipe import changes, run_invariant
from launchers.runs.run_guard import RUN_CONFIG
from launchers.runs.run_lock import LOCK_NAME, Owner, RunFolderBusy, RunLock, process_start, read_owner, this_process
from tests.test_checkpoints import resumed_from
from tests.test_trainer import run_tiny, without_timing

# -- recipe guard ------------------------------------------------------------------------------


def test_every_field_is_guarded_unless_allowlisted():
    # the allowlist is explicit: a field added later (loss.surrogate, backend.*) is guarded by default
    assert not run_invariant("loss.aggregation")
    assert not run_invariant("loss.surrogate")
    assert not run_invariant("backend.bf16")
    assert not run_invariant("seed")
    assert not run_invariant("trainer.global_batch_size")
    assert run_invariant("trainer.micro_batch_size")
    assert run_invariant("parallel.cp_size")
    assert run_invariant("parallel.some_future_layout_field")
    assert run_invariant("torch_threads")


def test_changes_lists_every_differing_leaf_with_old_and_new():
    old = {"loss": {"aggregation": "sample_mean", "eps_clip_high": None}, "optim": {"betas": [0.9, 0.99]}}
    new = {"loss": {"aggregation": "token_mean", "eps_clip_high": 0.28, "surrogate": "ppo"},
           "optim": {"betas": [0.9, 0.999]}}
    assert [str(c) for c in changes(old, new)] == [
        "loss.aggregation: sample_mean -> token_mean",
        "loss.eps_clip_high: null -> 0.28",
        "loss.surrogate: (absent) -> ppo",
        "optim.betas: [0.9, 0.99] -> [0.9, 0.999]",
    ]


def test_changed_loss_is_refused_with_one_line_per_field(tmp_path, capsys):
    run_tiny(tmp_path, "trainer.max_steps=2")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_:
        run_tiny(tmp_path, "trainer.max_steps=4", "resume=true", "loss=dapo")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"resume: refusing to continue {tmp_path} with a different recipe (3 field(s) that alter the run's "
        "mathematics):",
        "  loss.aggregation: sample_mean -> token_mean",
        "  loss.calculate_per_token_loss: false -> true",
        "  loss.eps_clip_high: null -> 0.28",
        "Resume with the run's own settings, start a new run in another folder, or add allow_recipe_change=true "
        "to continue with these changes anyway (they are logged).",
    ]
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing touched


@pytest.mark.parametrize("override", ["seed=1", "optim.lr=0.001", "rollout.n_samples_per_prompt=8", "model.d_model=64",
                                      "task.target_max=30", "trainer.global_batch_size=8"])
def test_each_recipe_section_is_guarded(tmp_path, capsys, override):
    run_tiny(tmp_path, "trainer.max_steps=1")
    with pytest.raises(SystemExit):
        run_tiny(tmp_path, "trainer.max_steps=2", "resume=true", override)
    assert f"  {override.split('=')[0]}: " in capsys.readouterr().err


def test_run_invariant_changes_are_accepted_and_logged(tmp_path, caplog):
    straight = run_tiny(tmp_path / "straight", "trainer.max_steps=4", "trainer.save_every=2")
    run_tiny(tmp_path / "split", "trainer.max_steps=2", "trainer.save_every=2")
    with caplog.at_level(logging.INFO, "launchers.train"):
        resumed = run_tiny(tmp_path / "split", "trainer.max_steps=4", "trainer.save_every=1", "resume=true",
                           "trainer.micro_batch_size=4", "parallel.qkv_format=bshd", "progress=bar", "torch_threads=2")
    logged = {r.getMessage() for r in caplog.records}
    assert resumed_from(caplog) == 2
    assert "resume: accepted run-invariant change trainer.micro_batch_size: 8 -> 4" in logged
    assert "resume: accepted run-invariant change parallel.qkv_format: thd -> bshd" in logged
    history = json.loads((tmp_path / "split" / RUN_CONFIG).read_text())["history"]
    assert [h["event"] for h in history] == ["start", "resume"] and history[1]["step"] == 2
    assert "trainer.max_steps: 2 -> 4" in history[1]["accepted"]
    for got, want in zip(resumed, straight, strict=True):  # same trajectory; float rounding may differ
        assert got["reward_mean"] == want["reward_mean"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def test_allow_recipe_change_forces_and_records_it(tmp_path, caplog):
    run_tiny(tmp_path, "trainer.max_steps=2")
    with caplog.at_level(logging.WARNING, "launchers.train"):
        records = run_tiny(tmp_path, "trainer.max_steps=3", "resume=true", "loss=dapo", "allow_recipe_change=true")
    assert [r["aggregation"] for r in records] == ["sample_mean", "sample_mean", "token_mean"]
    assert any("forced by allow_recipe_change=true: loss.aggregation: sample_mean -> token_mean" in r.getMessage()
               for r in caplog.records)
    stored = json.loads((tmp_path / RUN_CONFIG).read_text())
    assert stored["config"]["loss"]["aggregation"] == "token_mean"  # the next resume compares with this
    assert "loss.aggregation: sample_mean -> token_mean" in stored["history"][-1]["forced"]


def test_fresh_launch_into_a_run_folder_is_refused(tmp_path, capsys):
    run_tiny(tmp_path, "trainer.max_steps=1")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_:
        run_tiny(tmp_path, "trainer.max_steps=1")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"run folder {tmp_path} already holds a run ({RUN_CONFIG}); continue it with resume=true, or start this run "
        "in another folder (hydra.run.dir=...)")
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_requeued_job_resumes_without_resume_flag(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    straight = run_tiny(tmp_path / "straight", "trainer.max_steps=4", "trainer.save_every=2")
    run_tiny(tmp_path / "job", "trainer.max_steps=4", "trainer.save_every=2")
    (tmp_path / "job" / "checkpoints" / "step_000004.pt").unlink()  # preempted after step 2
    with caplog.at_level(logging.INFO, "launchers.train"):
        resumed = run_tiny(tmp_path / "job", "trainer.max_steps=4", "trainer.save_every=2")  # the same command
    assert resumed_from(caplog) == 2
    assert any("requeued attempt of job slurm:4242" in r.getMessage() for r in caplog.records)
    assert without_timing(resumed) == without_timing(straight)
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job into the same folder is a mistake
    with pytest.raises(SystemExit):
        run_tiny(tmp_path / "job", "trainer.max_steps=4")


def test_damaged_run_config_refuses_resume_unless_forced(tmp_path, capsys):
    run_tiny(tmp_path, "trainer.max_steps=2")
    (tmp_path / RUN_CONFIG).write_text('{"config": {"loss": ')  # torn
    with pytest.raises(SystemExit) as exit_:
        run_tiny(tmp_path, "trainer.max_steps=4", "resume=true")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"resume: {tmp_path / RUN_CONFIG} is damaged, so the recipe of the run cannot be checked; restore it, or "
        "resume with allow_recipe_change=true to replace it with this launch's configuration")
    records = run_tiny(tmp_path, "trainer.max_steps=4", "resume=true", "allow_recipe_change=true")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert json.loads((tmp_path / RUN_CONFIG).read_text())["config"]["trainer"]["max_steps"] == 4


def test_stored_config_is_the_validated_run_config(tmp_path):
    run_tiny(tmp_path, "trainer.max_steps=1", "loss=drgrpo")
    stored = json.loads((tmp_path / RUN_CONFIG).read_text())
    config = RunConfig.model_validate(stored["config"])
    assert config.loss.aggregation == "constant" and config.loss.divisor == 8  # interpolation resolved


# -- run-folder lock ---------------------------------------------------------------------------


def write_lock(run_dir, owner: Owner) -> None:
    (run_dir / LOCK_NAME).write_text(json.dumps(owner.__dict__))


def test_lock_names_this_process_and_is_released(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    owner = read_owner(tmp_path / LOCK_NAME)
    assert (owner.pid, owner.host, owner.process_start) == (os.getpid(), this_process().host, process_start(os.getpid()))
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_live_owner_keeps_the_folder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = this_process()
        write_lock(tmp_path, Owner(me.host, sleeper.pid, "2026-11-27 10:00:00", process_start(sleeper.pid)))
        with pytest.raises(RunFolderBusy) as err:
            RunLock(tmp_path).acquire()
        assert str(err.value) == (
            f"run folder {tmp_path} is in use by a live run: pid {sleeper.pid} on host {me.host} (started "
            "2026-11-27 10:00:00). Wait for it to end or choose another hydra.run.dir")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_dead_owner_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, Owner(this_process().host, gone.pid, "2026-11-27 10:00:00", 1))
    with caplog.at_level(logging.WARNING, "launchers.train"):
        lock = RunLock(tmp_path)
        lock.acquire()
    assert read_owner(tmp_path / LOCK_NAME).pid == os.getpid()
    assert any(f"from pid {gone.pid}" in r.getMessage() and "its process is gone" in r.getMessage()
               for r in caplog.records)
    lock.release()


def test_reused_pid_counts_as_dead(tmp_path):
    # the pid runs, but it is not the process that took the lock (its start time differs)
    write_lock(tmp_path, Owner(this_process().host, os.getppid(), "then", process_start(os.getppid()) + 1))
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_lock_on_another_host_is_kept_unless_same_job(tmp_path, monkeypatch):
    write_lock(tmp_path, Owner("elsewhere", 1, "then", 5, "slurm:77"))
    with pytest.raises(RunFolderBusy, match=f"if that run is gone, delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the requeued job, now on another node
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


# -- stop requests -----------------------------------------------------------------------------


def test_signal_becomes_a_request_with_its_exit_code():
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.exit_code == 138
    finally:
        stop.restore()


def test_rank_without_a_signal_adopts_another_ranks_request():
    stop = StopRequest()
    stop.restore()
    assert not stop.adopt(torch.zeros(len(stop.signals), dtype=torch.float64))
    summed = stop.as_tensor()
    summed[stop.signals.index(signal.SIGTERM)] = 2.0  # two other ranks got SIGTERM
    assert stop.adopt(summed) and stop.exit_code == 143


def test_signal_after_the_steps_all_reduce_waits_for_the_next_step():
    # rank 0 shared "no request" in this step's all-reduce, then SIGTERM landed: the other ranks carry on,
    # so rank 0 must too (stopping alone would leave them waiting in the next step's collectives)
    stop = StopRequest()
    try:
        shared = stop.as_tensor()  # this step's contribution: nothing yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        assert not stop.adopt(shared)  # the sum every rank sees holds no request
        assert stop.adopt(stop.as_tensor()) and stop.exit_code == 143  # shared, and honoured, at the next step
    finally:
        stop.restore()


def test_finish_hands_the_signal_to_the_previous_handler(monkeypatch):
    # inside a submitit job, submitit's handler (requeue) runs after our checkpoint
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested and calls == []  # nothing passed on before the step ends
        with pytest.raises(SystemExit) as exit_:
            stop.finish()
        assert calls == [signal.SIGUSR2] and exit_.value.code == 140
    finally:
        signal.signal(signal.SIGUSR2, previous)
