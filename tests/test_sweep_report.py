"""The report: seeds of one config as one curve with a 95 % Student-t band and one table row.

The hand-made sweep below has 2 configs x 3 seeds of 8 steps (a quarter is 2 steps); every expected
figure is worked out in the comments from the per-seed numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launchers.reporting.report import band, main
from launchers.runs.run_records import find_runs, group_seeds

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
T_975_2 = 4.302653  # t_{0.975, 2}: three seeds (test_seed_stats derives it)

# reward per step of each seed: (first quarter) ... (last quarter)
GRPO = {
    0: [0.1, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.8],  # first 0.2, last 0.7, gain 0.5
    1: [0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.7],  # first 0.2, last 0.6, gain 0.4
    2: [0.1, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 0.8],  # first 0.1, last 0.8, gain 0.7
}
GRPO_LENGTH = {0: 4.0, 1: 5.0, 2: 6.0}
DRGRPO = {
    0: [0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3],  # first 0.1, last 0.3, gain 0.2
    1: [0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.4, 0.4],  # first 0.2, last 0.4, gain 0.2
    2: [0.3, 0.3, 0.3, 0.4, 0.4, 0.4, 0.5, 0.5],  # first 0.3, last 0.5, gain 0.2
}
DRGRPO_LENGTH = {0: 3.0, 1: 3.0, 2: 3.0}


def write_run(folder: Path, loss: str, seed: int, rewards: list[float], length: float, scale: float,
              aggregation: str, extra_lines: tuple[str, ...] = ()) -> Path:
    """A run folder as the launcher leaves it: .hydra/{config,overrides}.yaml and metrics.jsonl."""
    (folder / ".hydra").mkdir(parents=True)
    config = {"loss": {"aggregation": aggregation, "preset": loss}, "seed": seed, "progress": "log",
              "trainer": {"max_steps": 8}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss={loss}", f"seed={seed}", "progress=log"]))
    lines = [json.dumps({"step": i + 1, "aggregation": aggregation, "reward_mean": r, "response_length_mean": length,
                         "loss_scale_vs_token_mean": scale, "entropy": 2.0, "grad_norm": 1.0})
             for i, r in enumerate(rewards)]
    (folder / "metrics.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return folder


def write_sweep(root: Path, configs: dict[str, tuple[dict, dict, float, str]]) -> Path:
    """Job folders 0.._N like Hydra's multirun, plus multirun.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for loss, (rewards, lengths, scale, aggregation) in configs.items():
        for seed in rewards:
            write_run(root / f"{job}_loss={loss},seed={seed}", loss, seed, rewards[seed], lengths[seed], scale,
                      aggregation)
            job += 1
    return root


@pytest.fixture
def sweep(tmp_path):
    return write_sweep(tmp_path / "sweep", {"grpo": (GRPO, GRPO_LENGTH, 1.0, "sample_mean"),
                                            "drgrpo": (DRGRPO, DRGRPO_LENGTH, 0.25, "constant")})


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| loss=")]


def test_seeds_of_one_config_form_one_row_with_t_intervals(sweep, capsys):
    assert main([str(sweep)]) == 0
    rows = table_rows((sweep / "report.md").read_text())
    # grpo: last quarter 0.7, 0.6, 0.8 -> mean 0.7, s 0.1, ± 4.302653 * 0.1 / sqrt(3) = 0.248
    #       gain 0.5, 0.4, 0.7 -> mean 0.5333, s^2 = (0.0333^2 + 0.1333^2 + 0.1667^2) / 2 = 0.023333,
    #       ± 4.302653 * sqrt(0.023333 / 3) = 0.379; length 4, 5, 6 -> 5 ± 4.302653 / sqrt(3) = 2.48
    assert rows[0] == ("| loss=grpo | sample_mean | n=3 (0, 1, 2) | 8 | 0.700 ± 0.248 | +0.533 ± 0.379 | "
                       "5.00 ± 2.48 | 1 |")
    # drgrpo: last quarter 0.3, 0.4, 0.5 -> 0.4 ± 0.248; gains all 0.2 -> ± 0; lengths all 3 -> ± 0
    assert rows[1] == ("| loss=drgrpo | constant | n=3 (0, 1, 2) | 8 | 0.400 ± 0.248 | +0.200 ± 0.000 | "
                       "3.00 ± 0.00 | 0.25 |")
    assert (sweep / "report.png").read_bytes()[:8] == PNG
    assert capsys.readouterr().err == ""


def test_differences_to_the_first_config_use_welch_intervals(sweep):
    assert main([str(sweep)]) == 0
    row = table_rows((sweep / "report.md").read_text())[2]
    # reward: 0.4 - 0.7 = -0.3, se = sqrt(0.01/3 + 0.01/3), dof 4, ± 2.776445 * 0.0816497 = 0.227 -> [-0.527, -0.073]
    # length: 3 - 5 = -2, se = sqrt(0 + 1/3), dof = (1/3)^2 / ((1/3)^2 / 2) = 2, ± 4.302653 * 0.57735 = 2.48
    assert row == "| loss=drgrpo | -0.300 [-0.527, -0.073] | yes, lower | -2.00 [-4.48, +0.48] | no |"


def test_band_is_mean_and_t_half_width_across_seeds_at_each_step():
    # step 1: 0.1, 0.2, 0.3 -> 0.2 ± 4.302653 * 0.1 / sqrt(3) = 0.248414; step 2: all 0.5 -> ± 0
    mean, half = band([[0.1, 0.5], [0.2, 0.5], [0.3, 0.5]], smooth=1)
    assert mean == pytest.approx([0.2, 0.5])
    assert half == pytest.approx([T_975_2 * 0.1 / 3**0.5, 0.0], abs=1e-6)


def test_band_smooths_each_seed_before_the_mean():
    # trailing mean over 2 steps: seed a 0, 1, 0 -> 0, 0.5, 0.5; seed b 1, 1, 1 -> 1, 1, 1; means 0.5, 0.75, 0.75
    mean, _ = band([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]], smooth=2)
    assert mean == pytest.approx([0.5, 0.75, 0.75])


def test_single_seed_sweep_has_no_interval_and_says_n_1(tmp_path):
    sweep = write_sweep(tmp_path / "one", {"grpo": ({0: GRPO[0]}, {0: 4.0}, 1.0, "sample_mean")})
    assert main([str(sweep)]) == 0
    (row,) = table_rows((sweep / "report.md").read_text())
    assert row == "| loss=grpo | sample_mean | n=1 (0) | 8 | 0.700 | +0.500 | 4.00 | 1 |"
    assert "n=1: no interval" in (sweep / "report.md").read_text()


def test_seeds_of_different_lengths_are_truncated_to_the_common_steps(tmp_path, capsys):
    short = {0: GRPO[0], 1: GRPO[1][:4]}  # seed 1 stopped after 4 steps
    sweep = write_sweep(tmp_path / "ragged", {"grpo": (short, {0: 4.0, 1: 4.0}, 1.0, "sample_mean")})
    assert main([str(sweep)]) == 0
    assert "loss=grpo: seeds logged 8, 4 steps; curves and table use the 4 steps all of them logged" in capsys.readouterr().err
    (row,) = table_rows((sweep / "report.md").read_text())
    # 4 common steps, quarter = 1 step: last quarter 0.4 and 0.3 -> 0.35 ± 12.706205 * 0.070711 / sqrt(2) = 0.635
    assert row.startswith("| loss=grpo | sample_mean | n=2 (0, 1) | 4 | 0.350 ± 0.635 |")


def test_torn_line_is_skipped_with_one_line_and_the_run_still_counts(tmp_path, capsys):
    folder = write_run(tmp_path / "sweep" / "0_loss=grpo,seed=0", "grpo", 0, GRPO[0], 4.0, 1.0, "sample_mean",
                       extra_lines=('{"step": 9, "reward_me',))
    assert main([str(tmp_path / "sweep")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{folder / 'metrics.jsonl'} line 9: not JSON (a torn or partial write?); line skipped"]
    assert "| n=1 (0) | 8 |" in (tmp_path / "sweep" / "report.md").read_text()


def test_missing_and_empty_folders_and_a_run_without_metrics_get_one_line_each(sweep, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    crashed = sweep / "6_loss=dapo,seed=0"
    (crashed / ".hydra").mkdir(parents=True)
    (sweep / "7_loss=dapo,seed=1").mkdir()
    (sweep / "7_loss=dapo,seed=1" / "metrics.jsonl").write_text("")
    out = tmp_path / "out"
    assert main([str(tmp_path / "missing"), str(empty), str(sweep), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"{tmp_path / 'missing'}: no such folder; skipped",
        f"{empty}: no run folder under it (none holds metrics.jsonl or .hydra/); skipped",
        f"{crashed}: no metrics.jsonl (the run failed or logged no step yet); skipped",
        f"{sweep / '7_loss=dapo,seed=1'}: metrics.jsonl holds no step record; skipped",
    ]
    assert len(table_rows((out / "report.md").read_text())) == 3  # two configs and one difference row


def test_nothing_to_report_exits_2_and_says_what_to_do(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "nothing to report" in capsys.readouterr().err


def test_several_sweeps_with_the_same_config_and_seeds_stay_apart(tmp_path):
    first = write_sweep(tmp_path / "a", {"grpo": (GRPO, GRPO_LENGTH, 1.0, "sample_mean")})
    second = write_sweep(tmp_path / "b", {"grpo": (DRGRPO, DRGRPO_LENGTH, 1.0, "sample_mean")})
    runs, problems = find_runs([first, second])
    groups, _, _ = group_seeds(runs)
    assert problems == []
    assert [g.label for g in groups] == [f"loss=grpo [{first}]", f"loss=grpo [{second}]"]
    assert [len(g.runs) for g in groups] == [3, 3]


def test_seeds_spread_over_several_folders_form_one_config(tmp_path):
    write_run(tmp_path / "a" / "run", "grpo", 0, GRPO[0], 4.0, 1.0, "sample_mean")
    write_run(tmp_path / "b" / "run", "grpo", 1, GRPO[1], 5.0, 1.0, "sample_mean")
    groups, _, _ = group_seeds(find_runs([tmp_path / "a", tmp_path / "b"])[0])
    assert [(g.label, g.seeds) for g in groups] == [("loss=grpo", [0, 1])]


def test_unknown_metric_gets_one_line_and_known_ones_are_drawn(sweep, tmp_path, capsys):
    assert main([str(sweep), "--metrics", "entropy,grad_norm,nope", "--out", str(tmp_path / "o"), "--name", "cmp"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("--metrics: no run logged 'nope' as a number; not drawn (available: entropy, grad_norm,")
    assert (tmp_path / "o" / "cmp.png").read_bytes()[:8] == PNG
    table = (tmp_path / "o" / "cmp.md").read_text()
    assert "| loss_scale_vs_token_mean | entropy, last quarter | grad_norm, last quarter |" in table
    # every step of every seed logs entropy 2.0 and grad_norm 1.0: no spread across seeds
    assert table_rows(table)[0].endswith("| 1 | 2 ± 0 | 1 ± 0 |")


def test_baseline_chooses_the_config_differences_are_taken_against(sweep):
    assert main([str(sweep), "--baseline", "loss=drgrpo"]) == 0
    row = table_rows((sweep / "report.md").read_text())[2]
    assert row.startswith("| loss=grpo | +0.300 [+0.073, +0.527] | yes, higher |")


@pytest.mark.slow
def test_joblib_sweep_over_seeds_is_reported_with_bands(tmp_path):
    tiny = ["rollout.prompts_per_rollout=2", "rollout.n_samples_per_prompt=4", "rollout.max_response_len=6",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.max_steps=4",
            "model.d_model=16", "model.n_layers=1", "progress=log"]
    sweep = subprocess.run(
        [sys.executable, "-m", "launchers.train", "-m", "loss=grpo,drgrpo", "seed=0,1", *tiny,
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 4
    report = subprocess.run([sys.executable, "-m", "launchers.reporting.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    rows = table_rows((tmp_path / "report.md").read_text())
    assert rows[0].startswith("| loss=grpo | sample_mean | n=2 (0, 1) | 4 |")
    assert rows[1].startswith("| loss=drgrpo | constant | n=2 (0, 1) | 4 |")
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG
