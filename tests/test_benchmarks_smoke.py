"""Smoke test of the reducer benchmark (`make bench`): it runs and prints its tables. Timings are never asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks import reducers


def test_quick_run_prints_every_table(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = reducers.main(
        ["--quick", "--tokens", "512", "--samples", "4,8", "--repeats", "3", "--threads", "1", "--json", str(out_json)]
    )
    assert code == 0  # targets are reported, not enforced, without --strict
    text = capsys.readouterr().out
    for heading in (
        "## Reducer forward+backward",
        "## Reducer construction per micro-batch",
        "## Step weights build",
        "## Targets",
    ):
        assert heading in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ")]
    for mode in ("sample_mean", "prompt_mean", "token_mean", "constant", "trajectory_mean"):
        assert sum(mode in row for row in table_rows) >= 2
    assert "torch threads 1" in text

    results = json.loads(out_json.read_text())
    # 5 modes x 2 sample counts x 2 CP sizes; builds: flat for both counts, list-of-tensors for the largest
    assert len(results["reducer"]) == 20
    assert len(results["cold"]) == 20
    assert len(results["build"]) == 5 * 3
    assert {r["masks"] for r in results["build"]} == {"flat", "list"}
    # the library reducer and the per-sample loop compute the same objective and gradient
    assert all(r["agree_with_loop"] for r in results["reducer"])
    for r in results["reducer"]:
        assert r["reducer"]["pairs"] >= 1 and r["reducer"]["floor_ms"] > 0
    # per mode: the reducer target, and the build target per mask layout (flat, list)
    assert len(results["targets"]) == 5 * 3


def test_sections_and_modes_select_what_runs(capsys):
    assert reducers.main(["--quick", "--tokens", "256", "--samples", "4", "--cp-sizes", "2", "--modes", "constant",
                          "--sections", "reducer", "--repeats", "2"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "## Reducer forward+backward" in text
    assert "## Step weights build" not in text and "## Reducer construction" not in text


@pytest.mark.parametrize(
    "argv",
    [["--modes", "seq_mean"], ["--sections", "everything"], ["--threads", "0"], ["--tokens", "8", "--samples", "64"]],
)
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        reducers.parse_args(["--quick", *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_train_step_benchmark_reports_throughput(capsys):
    from benchmarks import train_step

    tiny = ["rollout.prompts_per_rollout=2", "rollout.n_samples_per_prompt=4", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=4", "model.d_model=16", "model.n_layers=1"]
    assert train_step.main(["--rollouts", "1", "--warmup", "0", *tiny]) == 0
    out = capsys.readouterr().out
    assert "| training tokens/s (without rollout) |" in out and "| end-to-end tokens/s (with rollout) |" in out


def test_surrogate_benchmark_quick_run_prints_rows_and_target(tmp_path, capsys):
    from benchmarks import surrogates

    out_json = tmp_path / "surrogates.json"
    code = surrogates.main(["--quick", "--tokens", "512", "--samples", "4", "--repeats", "3", "--threads", "1",
                            "--json", str(out_json)])
    assert code == 0  # the target is reported, not enforced, without --strict
    text = capsys.readouterr().out
    assert "| sequence, sequence_token, gmpo, dppo_tv, dppo_kl, vespo fwd+bwd each <= 1.5x ppo_clip |" in text
    results = json.loads(out_json.read_text())
    # 8 variants x 1 sample count x 2 CP sizes x (reducer reused, built per call)
    assert len(results["rows"]) == 32
    assert {r["variant"] for r in results["rows"]} == {
        "cispo", "sapo", "sequence", "sequence_token", "gmpo", "dppo_tv", "dppo_kl", "vespo"}
