"""``python -m launchers.report SWEEP_DIR``: one PNG of reward and response-length curves per job, and a
markdown table of final metrics, from a Hydra multirun folder (or any folder of run folders)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

SMOOTH = 5


@dataclass
class JobRun:
    """The metrics of one job of a sweep."""

    name: str
    records: list[dict]

    def column(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.records if key in r]


def job_name(run_dir: Path) -> str:
    """The job's overrides (Hydra's .hydra/overrides.yaml), else the folder name."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.exists():
        items = [ln.removeprefix("- ").strip() for ln in overrides.read_text().splitlines() if ln.startswith("- ")]
        if items:
            return " ".join(items)
    return run_dir.name


def load_sweep(sweep_dir: Path) -> list[JobRun]:
    """Every run folder under ``sweep_dir`` holding a non-empty metrics.jsonl, in folder order."""
    runs = []
    for path in sorted(sweep_dir.rglob("metrics.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            runs.append(JobRun(job_name(path.parent), records))
    return runs


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _quarter(values: list[float], last: bool) -> list[float]:
    q = max(len(values) // 4, 1)
    return values[-q:] if last else values[:q]


def markdown_table(runs: list[JobRun]) -> str:
    """Final figures per job: reward in the first and last quarter of steps, lengths, loss scale."""
    head = (
        "| job | aggregation | steps | reward (first quarter) | reward (last quarter) | gain | "
        "response length (last quarter) | loss_scale_vs_token_mean | final grad_norm |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for run in runs:
        reward = run.column("reward_mean")
        first, last = _mean(_quarter(reward, False)), _mean(_quarter(reward, True))
        rows.append(
            f"| {run.name} | {run.records[-1].get('aggregation', '?')} | {run.records[-1]['step']} | {first:.3f} | "
            f"{last:.3f} | {last - first:+.3f} | {_mean(_quarter(run.column('response_length_mean'), True)):.2f} | "
            f"{_mean(run.column('loss_scale_vs_token_mean')):.4g} | {run.records[-1].get('grad_norm', float('nan')):.3g} |"
        )
    return head + "\n".join(rows) + "\n"


def _smooth(values: list[float], width: int = SMOOTH) -> list[float]:
    return [_mean(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def plot(runs: list[JobRun], path: Path) -> None:
    """Reward and response-length curves (moving average of 5 steps), one line per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_length) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        steps = run.column("step")
        ax_reward.plot(steps, _smooth(run.column("reward_mean")), label=run.name)
        ax_length.plot(steps, _smooth(run.column("response_length_mean")), label=run.name)
    ax_reward.set(title="reward (mean per step, 5-step moving average)", xlabel="optimizer step", ylabel="reward")
    ax_length.set(title="response length (tokens, 5-step moving average)", xlabel="optimizer step", ylabel="tokens")
    for ax in (ax_reward, ax_length):
        ax.grid(alpha=0.3)
    ax_reward.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Write ``report.png`` and ``report.md`` into the sweep folder (or ``--out``)."""
    parser = argparse.ArgumentParser(prog="python -m launchers.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. multirun/2026-11-26/13-00-00")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"sweep_dir: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    runs = load_sweep(args.sweep_dir)
    if not runs:
        print(f"sweep_dir: no metrics.jsonl under {args.sweep_dir}; run a sweep first (python -m launchers.train -m ...)",
              file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (out / "report.md").write_text(table)
    plot(runs, out / "report.png")
    print(table)
    print(f"wrote {out / 'report.png'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
