"""``backend=trl`` under the toy backend's run-safety and summary contracts (docs/run-safety.md, docs/launcher.md).

The same functions guard both backends (launchers.runs.run_guard.open_run, launchers.runs.checkpoints.resume_newest,
launchers.runs.preemption.StopRequest, launchers.runs.summary.log_run_summary); these tests run them through
RLLossGRPOTrainer on the tiny Hugging Face model, in process where possible. The CPU runs are
deterministic, so a resumed run is compared with an uninterrupted one value for value.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.config.preflight import compose_job
from launchers.runs.checkpoints import (
    UnusableCheckpoint,
    checksum_path,
    load_checkpoint_folder,
    prune_checksums,
    verify_checksum,
    write_checksum,
)
from launchers.runs.recipe import run_invariant
from launchers.runs.run_lock import LOCK_NAME, Owner, process_start, this_process
from tests.test_checkpoints import resumed_from
from tests.test_trl_launcher import OFFLINE, ROOT, SMALL, read_metrics, without_timing

SEVERAL = ["trainer.global_batch_size=4", "trainer.micro_batch_size=2"]  # two optimizer steps per rollout


def run(run_dir: Path, *overrides: str) -> list[dict]:
    """A backend=trl run in this process (SMALL sizes); its metrics.jsonl records."""
    from launchers.backends.hf.train import train

    train(compose_job([*SMALL, *overrides]).config, run_dir)
    return read_metrics(run_dir)


def exit_code(run_dir: Path, *overrides: str) -> int:
    with pytest.raises(SystemExit) as stopped:
        run(run_dir, *overrides)
    return stopped.value.code


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (read only: tests copy it)."""
    folder = tmp_path_factory.mktemp("trl") / "run"
    run(folder, "trainer.max_steps=4", "trainer.save_every=2")
    return folder


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def signal_after_logging_step(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process once step ``step`` is logged, i.e. while the next step runs."""
    from launchers.backends.hf.callbacks import MetricsCallback

    original = MetricsCallback.record

    def record(self, global_step, logs, seconds):
        if global_step == step:
            signal.raise_signal(signum)
        return original(self, global_step, logs, seconds)

    monkeypatch.setattr(MetricsCallback, "record", record)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# -- checkpoint folders (no training) ----------------------------------------------------------


def trainer_folder(run_dir: Path, step: int, state_step: int) -> Path:
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": state_step}))
    write_checksum(folder)
    return folder


def test_trainer_folder_at_its_step_loads_as_the_folder(tmp_path):
    folder = trainer_folder(tmp_path, 6, 6)
    assert load_checkpoint_folder(folder) == folder


def test_trainer_folder_whose_state_is_at_another_step_is_unusable(tmp_path):
    folder = trainer_folder(tmp_path, 6, 4)
    with pytest.raises(UnusableCheckpoint, match=r"^its trainer_state.json is at step 4, not 6$"):
        load_checkpoint_folder(folder)


def test_checksums_of_rotated_folders_are_pruned(tmp_path):
    kept = trainer_folder(tmp_path, 4, 4)
    gone = trainer_folder(tmp_path, 2, 2)
    shutil.rmtree(gone)  # what the Trainer's save_total_limit does
    prune_checksums(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [kept.name, checksum_path(kept).name]


def test_trl_memory_and_kernel_knobs_are_run_invariant_the_rest_of_backend_and_model_is_guarded():
    assert run_invariant("backend.gradient_checkpointing")
    assert run_invariant("model.attn_implementation")
    for field in ("backend.bf16", "model.name_or_path", "model.revision", "model.dtype", "model.hidden_size",
                  "model.chat_template", "model.trust_remote_code", "backend.kind", "model.kind"):
        assert not run_invariant(field), field


# -- the lock and the recipe guard --------------------------------------------------------------


def test_live_run_in_the_folder_refuses_a_trl_launch_before_any_model_work(tmp_path, capsys):
    parent = os.getppid()  # alive while this test runs
    host = this_process().host
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        Owner(host, parent, "2026-11-27 10:00:00", process_start(parent)).__dict__))
    assert exit_code(tmp_path, "trainer.max_steps=2") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"run folder {tmp_path} is in use by a live run: pid {parent} on host {host} (started 2026-11-27 10:00:00). "
        "Wait for it to end or choose another hydra.run.dir"
    ]
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_folder_with_trainer_checkpoints_refuses_a_fresh_launch(tmp_path, capsys):
    trainer_folder(tmp_path, 2, 2)
    assert exit_code(tmp_path, "trainer.max_steps=2") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"run folder {tmp_path} already holds a run (checkpoints); continue it with resume=true, or start this run "
        "in another folder (hydra.run.dir=...)"
    ]


@pytest.mark.slow
def test_dead_owners_lock_is_taken_over_by_a_trl_run(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps(Owner(this_process().host, gone.pid, "then", 1).__dict__))
    with caplog.at_level(logging.WARNING, "launchers.train"):
        records = run(tmp_path, "trainer.max_steps=2")
    assert [r["step"] for r in records] == [1, 2]
    assert any(f"from pid {gone.pid}" in m and "its process is gone" in m for m in messages(caplog))
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_changed_loss_is_refused_on_trl_resume_one_line_per_field(four_steps, tmp_path, capsys):
    folder = copy_of(four_steps, tmp_path)
    before = (folder / "metrics.jsonl").read_text()
    assert exit_code(folder, "trainer.max_steps=6", "trainer.save_every=2", "resume=true", "loss=dapo") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"resume: refusing to continue {folder} with a different recipe (3 field(s) that alter the run's "
        "mathematics):",
        "  loss.aggregation: sample_mean -> token_mean",
        "  loss.calculate_per_token_loss: false -> true",
        "  loss.eps_clip_high: null -> 0.28",
        "Resume with the run's own settings, start a new run in another folder, or add allow_recipe_change=true "
        "to continue with these changes anyway (they are logged).",
    ]
    assert (folder / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_changed_model_is_refused_on_trl_resume(four_steps, tmp_path, capsys):
    folder = copy_of(four_steps, tmp_path)
    assert exit_code(folder, "trainer.max_steps=6", "trainer.save_every=2", "resume=true", "model.hidden_size=64") == 2
    assert "  model.hidden_size: 32 -> 64" in capsys.readouterr().err.splitlines()


@pytest.mark.slow
def test_longer_trl_run_is_accepted_on_resume_and_logged(four_steps, tmp_path, caplog):
    folder = copy_of(four_steps, tmp_path)
    with caplog.at_level(logging.INFO, "launchers.train"):
        records = run(folder, "trainer.max_steps=6", "trainer.save_every=2", "resume=true")
    assert "resume: accepted run-invariant change trainer.max_steps: 4 -> 6" in messages(caplog)
    assert resumed_from(caplog) == 4
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    history = json.loads((folder / "run_config.json").read_text())["history"]
    assert history[-1]["accepted"] == ["trainer.max_steps: 4 -> 6"] and history[-1]["step"] == 4


@pytest.mark.slow
def test_gradient_checkpointing_switched_on_at_resume_continues_the_same_trajectory(four_steps, tmp_path):
    folder = copy_of(four_steps, tmp_path)
    shutil.rmtree(folder / "checkpoints" / "checkpoint-4")  # resume from step 2: steps 3-4 again
    records = run(folder, "trainer.max_steps=4", "trainer.save_every=2", "resume=true",
                  "backend.gradient_checkpointing=true")
    assert without_timing(records) == without_timing(read_metrics(four_steps))


# -- verified checkpoints and the metrics tail ---------------------------------------------------


@pytest.mark.slow
def test_damaged_newest_trl_checkpoint_is_skipped_naming_it(four_steps, tmp_path, caplog):
    folder = copy_of(four_steps, tmp_path)
    weights = folder / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.INFO, "launchers.train"):
        records = run(folder, "trainer.max_steps=4", "trainer.save_every=2", "resume=true")
    assert (f"resume: skipping checkpoint {folder / 'checkpoints' / 'checkpoint-4'}: sha256 mismatch for "
            "checkpoint-4/model.safetensors (damaged or changed after it was written)") in messages(caplog)
    assert resumed_from(caplog) == 2
    assert without_timing(records) == without_timing(read_metrics(four_steps))
    assert verify_checksum(folder / "checkpoints" / "checkpoint-4") is None  # written again, with its checksum


@pytest.mark.slow
def test_no_usable_trl_checkpoint_is_one_line_and_exit_2(four_steps, tmp_path, capsys, caplog):
    folder = copy_of(four_steps, tmp_path)
    for step in (2, 4):
        checksum_path(folder / "checkpoints" / f"checkpoint-{step}").unlink()  # as if killed before it was written
    with caplog.at_level(logging.WARNING, "launchers.train"):
        assert exit_code(folder, "trainer.max_steps=6", "trainer.save_every=2", "resume=true") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"resume: none of the 2 checkpoint(s) in {folder / 'checkpoints'} is usable (each is named above); restore "
        "one, or start a new run in another folder")
    assert sum("no checksum file checkpoint-" in m for m in messages(caplog)) == 2


@pytest.mark.slow
def test_torn_metrics_tail_is_dropped_on_trl_resume(four_steps, tmp_path, caplog):
    folder = copy_of(four_steps, tmp_path)
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "reward_me')  # a crash in the middle of writing step 5
    with caplog.at_level(logging.WARNING, "launchers.train"):
        records = run(folder, "trainer.max_steps=6", "trainer.save_every=2", "resume=true")
    assert any("dropping its torn last line" in m for m in messages(caplog))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_each_kept_trl_checkpoint_has_a_checksum_that_verifies(four_steps, tmp_path):
    folder = copy_of(four_steps, tmp_path)
    run(folder, "trainer.max_steps=8", "trainer.save_every=2", "resume=true")
    names = sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    # the Trainer keeps the newest three folders (save_total_limit=3); checkpoint-2's checksum went with it
    assert names == [f"checkpoint-{s}{suffix}" for s in (4, 6, 8) for suffix in ("", ".sha256")]
    assert all(verify_checksum(folder / "checkpoints" / f"checkpoint-{s}") is None for s in (4, 6, 8))


# -- stop signals -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigusr1_finishes_the_step_checkpoints_and_exits_138_with_the_resume_command(tmp_path, monkeypatch, caplog):
    signal_after_logging_step(monkeypatch, 2, signal.SIGUSR1)  # arrives during step 3
    with caplog.at_level(logging.INFO, "launchers.train"):
        assert exit_code(tmp_path, "trainer.max_steps=40") == 138
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert verify_checksum(tmp_path / "checkpoints" / "checkpoint-3") is None
    logged = messages(caplog)
    assert "SIGUSR1: finishing this step, writing a checkpoint, then stopping" in logged
    assert any(re.fullmatch(r"stopped at step 3 of 40 after \d+s, [\d.]+ steps/s; checkpoint written; reward .*", m)
               for m in logged)
    assert f"  resume:   python -m launchers.train resume=true hydra.run.dir={tmp_path}" in logged
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are given back
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_stop_inside_a_rollout_waits_for_its_end_and_resume_continues_the_same_trajectory(tmp_path, monkeypatch,
                                                                                           caplog):
    signal_after_logging_step(monkeypatch, 2, signal.SIGTERM)  # during step 3, the first of rollout 1's two steps
    with caplog.at_level(logging.WARNING, "launchers.train"):
        assert exit_code(tmp_path / "stopped", *SEVERAL, "trainer.max_steps=8") == 143
    assert ("stopping at the end of this rollout, after step 4: a TRL checkpoint must fall between rollouts"
            in messages(caplog))
    assert [r["step"] for r in read_metrics(tmp_path / "stopped")] == [1, 2, 3, 4]
    monkeypatch.undo()
    resumed = run(tmp_path / "stopped", *SEVERAL, "trainer.max_steps=6", "resume=true")
    straight = run(tmp_path / "straight", *SEVERAL, "trainer.max_steps=6")
    assert without_timing(resumed) == without_timing(straight)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_exits_143_and_resume_matches_an_uninterrupted_run(tmp_path):
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launchers.train", *SMALL, "trainer.max_steps=40", "trainer.save_every=40",
         f"hydra.run.dir={stopped}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=OFFLINE,
    )
    metrics, deadline = stopped / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and metrics.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    last = read_metrics(stopped)[-1]["step"]
    assert 2 <= last < 40
    assert verify_checksum(stopped / "checkpoints" / f"checkpoint-{last}") is None
    assert not (stopped / LOCK_NAME).exists()
    resume = next(line for line in output.splitlines() if "  resume:   " in line).split("  resume:   ", 1)[1]
    assert resume == (f"python -m launchers.train {' '.join(SMALL)} trainer.max_steps=40 trainer.save_every=40 "
                      f"resume=true hydra.run.dir={stopped}")
    resumed = run(stopped, f"trainer.max_steps={last + 2}", "trainer.save_every=40", "resume=true")
    straight = run(tmp_path / "straight", f"trainer.max_steps={last + 2}", "trainer.save_every=40")
    assert [r["step"] for r in resumed] == list(range(1, last + 3))
    assert without_timing(resumed) == without_timing(straight)


# -- progress line and summary ------------------------------------------------------------------


@pytest.mark.slow
def test_finished_trl_run_shows_the_toys_progress_fields_and_ends_with_the_summary(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "launchers.train"):
        run(tmp_path, "trainer.max_steps=2")
    logged = messages(caplog)
    number = r"-?\d+\.\d+"
    assert any(re.fullmatch(rf"step 1/2  reward={number}  len={number}  ent={number}  gn=\S+", m) for m in logged)
    assert any(re.fullmatch(rf"step 2/2  reward={number}  len={number}  ent={number}  gn=\S+  {number} step/s  ETA 0s",
                            m) for m in logged)
    at = next(i for i, m in enumerate(logged) if m.startswith("finished: "))
    assert re.fullmatch(r"finished: 2 steps in \d+s, [\d.]+ steps/s; reward .* \(first quarter\) -> .* \(last quarter\), .*",
                        logged[at])
    assert logged[at + 1:] == [
        f"run folder: {tmp_path}",
        f"  curves:   tensorboard --logdir {tmp_path / 'tensorboard'}",
        f"  report:   python -m launchers.report {tmp_path}",
        f"  continue: python -m launchers.train resume=true trainer.max_steps=4 hydra.run.dir={tmp_path}",
    ]


@pytest.mark.slow
def test_trl_progress_shows_the_kl_to_the_rollout_policy_when_a_rollout_feeds_several_steps(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "launchers.train"):
        run(tmp_path, *SEVERAL, "trainer.max_steps=2")
    assert any(re.match(r"step 2/2  reward=\S+  len=\S+  kl=\S+  ent=\S+  gn=\S+", m) for m in messages(caplog))
