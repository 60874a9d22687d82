"""Hostile inputs and failures at the launcher's edges: refusals change nothing, nothing is lost, one line each.

Random bytes go into every run-folder file a launch reads (hypothesis); a refused launch is checked
byte for byte against the folder it was refused for; disk full, non-finite gradients, out of memory and
kills at random points are simulated in-process in 2-3 step toy runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launchers import train as train_cli
from launchers.backends.toy import trainer as toy_trainer
from launchers.config.preflight import ConfigError, compose_job
from launchers.runs import failures, run_guard, run_io, summary
from launchers.runs.checkpoints import UnusableCheckpoint, checkpoint_files, load_checkpoint, save_checkpoint
from launchers.runs.run_guard import Refused, decide, folder_problem
from launchers.runs.run_io import metrics_up_to
from launchers.runs.safe_read import UnsafeInput

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TINY = ["rollout.prompts_per_rollout=2", "rollout.n_samples_per_prompt=2", "rollout.max_response_len=4", "task.target_max=9",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "model.d_model=8", "model.n_layers=1",
        "progress=log", "trainer.save_every=1", "torch_threads=1"]


def config(*overrides: str):
    return compose_job([*TINY, *overrides]).config


@pytest.fixture(scope="module")
def fresh():
    return config("trainer.max_steps=2")


@pytest.fixture(scope="module")
def resume():
    return config("trainer.max_steps=2", "resume=true")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) and its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_job(cfg, run_dir: Path) -> None:
    """What hydra_job does around the backend: one line and an exit code for a known failure."""
    with failures.one_line(run_dir):
        toy_trainer.train(cfg, run_dir)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, fresh):
    """A finished 2-step run (checkpoints at steps 1 and 2) and a .hydra record; tests copy it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    toy_trainer.train(fresh, run_dir)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("loss:\n  aggregation: sample_mean\nseed: 0\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- trainer.max_steps=2\n")
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# -- random bytes into every file a launch reads ------------------------------------------------------


@FAST
@given(data=st.binary(max_size=300), name=st.sampled_from(["run_config.json", "run.lock", "metrics.jsonl"]),
       resuming=st.booleans())
def test_random_bytes_in_run_folder_files_give_a_verdict_or_a_refusal(tmp_path_factory, fresh, resume, data, name,
                                                                      resuming):
    run_dir = tmp_path_factory.mktemp("r")
    (run_dir / name).write_bytes(data)
    try:
        decide(resume if resuming else fresh, run_dir)
    except Refused as err:
        assert err.lines and all("\n" not in line for line in err.lines)


@FAST
@given(data=st.binary(max_size=300), step=st.integers(0, 5))
def test_random_bytes_as_metrics_on_resume_keep_only_whole_records(tmp_path_factory, data, step):
    path = tmp_path_factory.mktemp("m") / "metrics.jsonl"
    path.write_bytes(data)
    for line in metrics_up_to(path, step):
        record = json.loads(line)
        assert isinstance(record["step"], int) and record["step"] <= step


@FAST
@given(data=st.binary(max_size=200))
def test_random_bytes_as_checksum_or_checkpoint_are_skipped_with_one_line(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("c")
    path = save_checkpoint({"w": torch.zeros(2)}, folder / "step_000001.pt")
    target = path if data[:1] == b"\x00" else path.with_name(path.name + ".sha256")
    target.write_bytes(data)
    try:
        load_checkpoint(path)
    except UnusableCheckpoint as err:
        assert "\n" not in str(err)


# -- a refused launch changes no byte ------------------------------------------------------------------


def launch(monkeypatch, *argv: str) -> int:
    """``python -m launchers.train ARGV`` in-process; the early precheck is skipped, as when two launches race."""
    monkeypatch.setattr(run_guard, "precheck", lambda *a, **k: None)
    try:
        train_cli.main([*TINY, *argv])
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.mark.slow
def test_refused_launch_with_interpolated_run_dir_leaves_the_folder_byte_identical(run_copy, monkeypatch, capsys):
    run0 = run_copy.rename(run_copy.with_name("run0"))
    before = snapshot(run0)
    code = launch(monkeypatch, "trainer.max_steps=2", "loss.aggregation=token_mean",
                  f"hydra.run.dir={run0.parent}/run${{seed}}")  # the early check never sees the resolved folder
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"run folder {run0} already holds a run (run_config.json); continue it with resume=true, or start this run "
        "in another folder (hydra.run.dir=...)"]
    assert snapshot(run0) == before


@pytest.mark.slow
def test_launch_refused_under_the_lock_changes_nothing_and_leaves_no_staging(run_copy, monkeypatch, capsys):
    before = snapshot(run_copy)
    code = launch(monkeypatch, "trainer.max_steps=2", "loss.aggregation=token_mean", "resume=true",
                  f"hydra.run.dir={run_copy}")
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0].startswith(f"resume: refusing to continue {run_copy} with a different recipe")
    assert snapshot(run_copy) == before  # .hydra/config.yaml and overrides.yaml included
    assert train_cli.STAGING_ENV not in os.environ


@pytest.mark.slow
def test_launch_racing_a_live_run_changes_nothing(run_copy, monkeypatch, capsys):
    owner = {"host": os.uname().nodename, "pid": os.getppid(), "started": "now", "process_start": None}
    (run_copy / "run.lock").write_text(json.dumps(owner))
    before = snapshot(run_copy)
    assert launch(monkeypatch, "trainer.max_steps=4", "resume=true", f"hydra.run.dir={run_copy}") == 2
    assert "is in use by a live run" in capsys.readouterr().err
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_accepted_launch_moves_hydras_record_in(tmp_path, monkeypatch):
    assert launch(monkeypatch, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'new'}") == 0
    assert sorted(p.name for p in (tmp_path / "new" / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml",
                                                                               "overrides.yaml"]


# -- resume without a usable checkpoint ----------------------------------------------------------------


@pytest.mark.parametrize(("damage", "what"), [("delete", "is missing"), ("file", "is not a folder"),
                                              ("empty", "holds no checkpoint")])
def test_resume_without_checkpoints_is_refused_and_metrics_kept(run_copy, resume, damage, what):
    import shutil

    shutil.rmtree(run_copy / "checkpoints")
    if damage == "file":
        (run_copy / "checkpoints").write_text("")
    elif damage == "empty":
        (run_copy / "checkpoints").mkdir()
    before = snapshot(run_copy)
    with pytest.raises(Refused) as err:
        decide(resume, run_copy)
    assert err.value.lines == [
        f"resume: {run_copy} holds a run (metrics.jsonl has steps) but {run_copy / 'checkpoints'} {what}, so resuming "
        "would start again from step 0 over its metrics; restore its checkpoints, or start the run again in "
        "another folder (hydra.run.dir=...)"]
    assert snapshot(run_copy) == before


def test_damaged_history_is_dropped_not_a_traceback(run_copy, resume, caplog):
    content = json.loads((run_copy / "run_config.json").read_text())
    content["history"] = {"not": "a list"}
    (run_copy / "run_config.json").write_text(json.dumps(content))
    verdict = decide(resume, run_copy)
    assert [h["event"] for h in verdict.content["history"]] == ["resume"]
    assert "its history is damaged" in caplog.text


def test_infinite_step_in_metrics_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": Infinity}\n{"step": 2}\n')
    assert metrics_up_to(path, 2) == ['{"step": 1}', '{"step": 2}']


def test_metrics_that_is_a_folder_is_one_line_on_resume(run_copy, resume, capsys):
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").mkdir()
    with pytest.raises(SystemExit) as exit_:
        run_job(resume, run_copy)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (f"run folder {run_copy}: {run_copy / 'metrics.jsonl'}: not a regular "
                                               "file (a folder); not read; restore or remove that file")


# -- disk full, non-finite gradients, out of memory: one line, older state intact ----------------------


def raise_enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device", "checkpoints/step_000002.pt")


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_older_checkpoints(tmp_path, fresh, monkeypatch, capsys):
    saves = []
    real = run_io.torch.save

    def save(obj, f):
        saves.append(obj["step"])
        if obj["step"] == 2:
            raise_enospc()
        real(obj, f)

    monkeypatch.setattr(run_io.torch, "save", save)
    with pytest.raises(SystemExit) as exit_:
        run_job(fresh, tmp_path)
    assert exit_.value.code == failures.EXIT_RUNTIME
    assert capsys.readouterr().err.strip() == (
        "run stopped: checkpoints/step_000002.pt: No space left on device. The checkpoints and metrics written "
        "before are intact; free some space, then continue with resume=true")
    assert [s for s, _ in checkpoint_files(tmp_path)] == [1]
    load_checkpoint(checkpoint_files(tmp_path)[0][1])  # verifies and loads
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_disk_full_at_a_metrics_write_is_one_line_and_keeps_older_lines(tmp_path, fresh, monkeypatch, capsys):
    real = run_io.MetricsWriter.write

    def write(self, record):
        if record["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, record)

    monkeypatch.setattr(run_io.MetricsWriter, "write", write)
    with pytest.raises(SystemExit) as exit_:
        run_job(fresh, tmp_path)
    assert exit_.value.code == 1 and "No space left on device" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_disk_full_while_resume_rewrites_metrics_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    monkeypatch.setattr(run_io.os, "fsync", raise_enospc)
    with pytest.raises(OSError):
        run_io.MetricsWriter(tmp_path, resume_after_step=1)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_non_finite_gradient_stops_before_it_is_applied(tmp_path, fresh, monkeypatch, capsys):
    real = toy_trainer.policy_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics  # step 2's only micro-batch

    monkeypatch.setattr(toy_trainer, "policy_loss", poisoned)
    with pytest.raises(SystemExit) as exit_:
        run_job(fresh, tmp_path)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().startswith(
        "run stopped at step 2: the gradient norm is nan (NaN or Inf in the gradient); it was not applied; the "
        "checkpoints up to step 1 are intact.")
    assert [s for s, _ in checkpoint_files(tmp_path)] == [1]


def test_out_of_memory_in_a_rollout_is_one_line(tmp_path, fresh, monkeypatch, capsys):
    def oom(*_a, **_k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 98765432100 bytes")

    monkeypatch.setattr(toy_trainer, "generate", oom)
    with pytest.raises(SystemExit) as exit_:
        run_job(fresh, tmp_path)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and err.startswith("run stopped: out of memory (") and "\n" not in err


def test_checkpoint_with_nan_weights_is_skipped(tmp_path):
    path = save_checkpoint({"policy": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "step_000001.pt")
    with pytest.raises(UnusableCheckpoint, match=r"^holds non-finite values \(NaN or Inf\) in policy\.w$"):
        load_checkpoint(path)


def test_crafted_checkpoint_calling_os_system_names_it(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'marker'}",))

    path = tmp_path / "step_000001.pt"
    torch.save({"policy": Evil()}, path)
    from launchers.runs.checkpoints import write_checksum

    write_checksum(path)
    with pytest.raises(UnusableCheckpoint) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"refused: loading it would call {os.system.__module__}.system, which no checkpoint of "
                              "this launcher holds (a file crafted to run code?); torch's weights-only loader blocked "
                              "it, nothing in it was run")
    assert not (tmp_path / "marker").exists()


def test_fifo_checkpoint_is_skipped_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "step_000001.pt")
    with pytest.raises(UnusableCheckpoint, match="^not a regular file$"):
        load_checkpoint(tmp_path / "step_000001.pt")


# -- run folder and configuration at the edges ---------------------------------------------------------


def test_run_folder_at_or_under_a_file_or_unwritable_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    assert folder_problem(tmp_path / "f") == \
        f"hydra.run.dir: {tmp_path / 'f'} is a file, not a folder; choose another hydra.run.dir"
    assert folder_problem(tmp_path / "f" / "run") == \
        f"hydra.run.dir: {tmp_path / 'f' / 'run'} lies under {tmp_path / 'f'}, which is a file, not a folder; " \
        "choose another hydra.run.dir"
    monkeypatch.setattr(run_guard.os, "access", lambda *_: False)
    assert folder_problem(tmp_path / "new") == (f"hydra.run.dir: {tmp_path / 'new'} would be created in {tmp_path}, "
                                                "which is not writable by this user; choose another hydra.run.dir")


@pytest.mark.parametrize("seed", [2**32, 2**63, 2**64])
def test_seed_beyond_numpys_range_is_a_config_error(seed):
    with pytest.raises(ConfigError) as err:
        compose_job([f"seed={seed}"])
    assert err.value.problems == [f"seed: input should be less than or equal to 4294967295 (got {seed})"]


def test_resume_command_after_chdir_names_the_run_folder_not_dot(tmp_path, monkeypatch):
    run_dir = tmp_path / "outputs" / "run"
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(run_dir)  # hydra.job.chdir=true
    monkeypatch.setattr(summary, "launch_dir", lambda: tmp_path)
    assert summary.resume_command(run_dir).endswith("resume=true hydra.run.dir=outputs/run")
    monkeypatch.setattr(summary, "launch_dir", lambda: run_dir)  # launched from inside the run folder
    assert summary.resume_command(run_dir).endswith(f"hydra.run.dir={run_dir}")


def test_summary_reads_a_hostile_overrides_file_as_nothing(tmp_path):
    (tmp_path / ".hydra").mkdir()
    os.mkfifo(tmp_path / ".hydra" / "overrides.yaml")
    assert summary._job_overrides(tmp_path) == []
    (tmp_path / ".hydra" / "overrides.yaml").unlink()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("[" * 5000)
    assert summary._job_overrides(tmp_path) == []


def test_unsafe_input_is_a_value_error_with_one_line(tmp_path):
    from launchers.runs.safe_read import read_yaml

    with pytest.raises(ValueError, match=r"not a regular file \(a folder\)"):
        read_yaml(tmp_path)
    assert issubclass(UnsafeInput, ValueError)


# -- random kill points in a short run, then resume ------------------------------------------------------


class Killed(BaseException):
    """A kill simulated in-process: not an Exception, so nothing in the loop handles it (like SIGKILL)."""


KILL_POINTS = ["after_metrics", "inside_checkpoint_write", "before_checksum"]


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step=st.integers(1, 3), point=st.sampled_from(KILL_POINTS))
def test_kill_at_a_random_point_then_resume_ends_with_every_step_once(tmp_path_factory, monkeypatch, step, point):
    run_dir = tmp_path_factory.mktemp("kill") / "run"
    three, again = config("trainer.max_steps=3"), config("trainer.max_steps=3", "resume=true")
    with monkeypatch.context() as m:
        if point == "after_metrics":
            real_write = run_io.MetricsWriter.write

            def write(self, record):
                real_write(self, record)
                if record["step"] == step:
                    raise Killed

            m.setattr(run_io.MetricsWriter, "write", write)
        else:
            from launchers.runs import checkpoints

            target = checkpoints  # where save_checkpoint looks both names up
            name = "save_atomic" if point == "inside_checkpoint_write" else "write_checksum"
            real = getattr(target, name)

            def kill_at_step(*args):
                if Path(args[-1] if point == "inside_checkpoint_write" else args[0]).name == f"step_{step:06d}.pt":
                    raise Killed
                return real(*args)

            m.setattr(target, name, kill_at_step)
        with pytest.raises(Killed):
            toy_trainer.train(three, run_dir)
    if not checkpoint_files(run_dir):
        with pytest.raises(Refused):  # steps logged but no checkpoint: resume would start over them
            decide(again, run_dir)
        return
    toy_trainer.train(again, run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
