"""Checkpoints that verify and cannot run code (docs/run-safety.md): checksums, fallback, weights_only, torn metrics."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from launchers.runs.checkpoints import (
    UnusableCheckpoint,
    checksum_path,
    load_checkpoint,
    resume_newest,
    save_checkpoint,
    verify_checksum,
    write_checksum,
)
from tests.test_trainer import run_tiny, without_timing

SEVERAL = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4"]  # two optimizer steps per rollout


def resumed_from(caplog) -> int:
    """The step a resume continued from (its log line): a restart from step 0 gives the same metrics too."""
    return next(int(m.group(1)) for r in caplog.records if (m := re.search(r"resumed from \S+ \(step (\d+)\)",
                                                                                r.getMessage())))


class _OpensAFile:
    """Unpickling this calls open(marker, "w"): the marker file appears if the pickle runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def craft_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint-shaped file whose unpickling would create ``marker``, with a matching checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 9, "policy": _OpensAFile(marker)}, path)
    write_checksum(path)


def test_checksum_file_matches_sha256sum_format(tmp_path):
    path = save_checkpoint({"w": torch.arange(3.0)}, tmp_path / "step_000001.pt")
    import hashlib

    line = checksum_path(path).read_text()
    assert line == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  step_000001.pt\n"
    assert verify_checksum(path) is None


def test_changed_byte_fails_verification(tmp_path):
    path = save_checkpoint({"w": torch.arange(3.0)}, tmp_path / "step_000001.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "sha256 mismatch" in verify_checksum(path)


def test_checkpoint_without_checksum_is_unverified(tmp_path):
    path = tmp_path / "step_000001.pt"
    torch.save({"w": torch.zeros(1)}, path)  # a crash before the checksum was written
    with pytest.raises(UnusableCheckpoint, match="no checksum file step_000001.pt.sha256"):
        load_checkpoint(path)


def test_folder_checksum_lists_every_file(tmp_path):
    folder = tmp_path / "checkpoint-4"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "sub" / "state.json").write_text("{}")
    write_checksum(folder)
    names = [line.split("  ")[1] for line in checksum_path(folder).read_text().splitlines()]
    assert names == ["checkpoint-4/model.safetensors", "checkpoint-4/sub/state.json"]
    assert verify_checksum(folder) is None
    (folder / "extra.bin").write_bytes(b"x")
    assert "differ from those listed" in verify_checksum(folder)


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoints" / "step_000009.pt"
    craft_checkpoint(path, marker)
    with pytest.raises(UnusableCheckpoint) as err:
        load_checkpoint(path)
    assert "refused: loading it would call io.open" in str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    # control: the same kind of file does run code under a plain pickle load (the test can fail)
    control = tmp_path / "control.pt"
    craft_checkpoint(control, tmp_path / "control_marker")
    torch.load(control, weights_only=False)
    assert (tmp_path / "control_marker").exists()


def test_resume_refuses_crafted_checkpoint_in_one_line_and_exits_2(tmp_path, capsys, caplog):
    run_tiny(tmp_path, "trainer.max_steps=1")
    for p in (tmp_path / "checkpoints").iterdir():
        p.unlink()
    marker = tmp_path / "marker"
    craft_checkpoint(tmp_path / "checkpoints" / "step_000009.pt", marker)
    with caplog.at_level(logging.WARNING, "launchers.train"), pytest.raises(SystemExit) as exit_:
        run_tiny(tmp_path, "trainer.max_steps=12", "resume=true")
    assert exit_.value.code == 2
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "refused: loading it would call io.open" in skipped[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"resume: none of the 1 checkpoint(s) in {tmp_path / 'checkpoints'} is usable (each is named "
                   "above); restore one, or start a new run in another folder"]
    assert not marker.exists()


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    straight = run_tiny(tmp_path / "straight", "trainer.max_steps=6", "trainer.save_every=2")
    run_dir = tmp_path / "split"
    run_tiny(run_dir, "trainer.max_steps=6", "trainer.save_every=2")
    newest = run_dir / "checkpoints" / "step_000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    checksum_path(newest).unlink()  # ... and re-checksummed as it is: the load itself must catch it
    write_checksum(newest)
    with caplog.at_level(logging.INFO, "launchers.train"):
        resumed = run_tiny(run_dir, "trainer.max_steps=6", "trainer.save_every=2", "resume=true")
    assert resumed_from(caplog) == 4
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "step_000006.pt: unreadable (PytorchStreamReader failed" in skipped[0]
    assert without_timing(resumed) == without_timing(straight)


def test_damaged_checkpoints_are_skipped_newest_first_naming_each(tmp_path, caplog):
    several = [*SEVERAL, "trainer.save_every=1"]
    straight = run_tiny(tmp_path / "straight", "trainer.max_steps=6", *several)
    run_dir = tmp_path / "split"
    run_tiny(run_dir, "trainer.max_steps=6", *several)  # keeps steps 4, 5, 6
    (run_dir / "checkpoints" / "step_000006.pt.sha256").unlink()
    five = run_dir / "checkpoints" / "step_000005.pt"
    five.write_bytes(five.read_bytes()[:-10] + b"0123456789")
    with caplog.at_level(logging.INFO, "launchers.train"):
        resumed = run_tiny(run_dir, "trainer.max_steps=6", *several, "resume=true")
    assert resumed_from(caplog) == 4
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 2
    assert "step_000006.pt: no checksum file" in skipped[0]
    assert "step_000005.pt: sha256 mismatch" in skipped[1]
    assert without_timing(resumed) == without_timing(straight)  # from step 4, mid-rollout


def test_checkpoint_holds_only_tensors_and_plain_containers(tmp_path):
    run_tiny(tmp_path, "trainer.max_steps=4", *SEVERAL, "trainer.save_every=3")
    path = tmp_path / "checkpoints" / "step_000003.pt"
    state = torch.load(path, weights_only=True)  # raises on anything else
    assert set(state) == {"step", "policy", "reference", "optimizer", "generator", "rng", "rollout"}
    assert isinstance(state["rollout"], dict) and isinstance(state["rollout"]["advantages"], torch.Tensor)


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    straight = run_tiny(tmp_path / "straight", "trainer.max_steps=4", "trainer.save_every=2")
    run_dir = tmp_path / "split"
    run_tiny(run_dir, "trainer.max_steps=3", "trainer.save_every=2")  # checkpoints 2 and 3
    (run_dir / "checkpoints" / "step_000003.pt").unlink()
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 25])  # step 3's line cut mid-write
    with pytest.raises(json.JSONDecodeError):
        json.loads(metrics.read_text().splitlines()[-1])
    with caplog.at_level(logging.INFO, "launchers.train"):
        resumed = run_tiny(run_dir, "trainer.max_steps=4", "trainer.save_every=2", "resume=true")
    assert resumed_from(caplog) == 2
    torn = [r.getMessage() for r in caplog.records if "torn last line" in r.getMessage()]
    assert len(torn) == 1 and '{"step": 3' in torn[0]
    assert without_timing(resumed) == without_timing(straight)


def test_nothing_to_resume_from_starts_at_step_0(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "launchers.train"):
        records = run_tiny(tmp_path, "trainer.max_steps=1", "resume=true")
    assert [r["step"] for r in records] == [1]
    assert any("holds no checkpoint: starting from step 0" in r.getMessage() for r in caplog.records)


def test_restore_that_does_not_fit_skips_the_checkpoint(tmp_path, caplog):
    save_checkpoint({"step": 1, "policy": {}}, tmp_path / "checkpoints" / "step_000001.pt")

    def restore(state):
        raise RuntimeError("Error(s) in loading state_dict for ToyPolicy:\n\tMissing key(s)")

    with caplog.at_level(logging.WARNING, "launchers.train"), pytest.raises(SystemExit):
        resume_newest(tmp_path, restore)
    message = next(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
    assert message.endswith("does not fit this run (RuntimeError: Error(s) in loading state_dict for ToyPolicy:)")
