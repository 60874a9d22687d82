"""``python -m launchers.report FOLDER [FOLDER ...]``: compare configs over seeds, as curves with 95 % bands and a table.

Each FOLDER is a Hydra multirun folder, a run folder, or any folder of run folders. Runs whose config
differs only in ``seed`` (and switches that change nothing trained: ``progress``, ``resume``,
``dry_run``) are the seeds of one config and form one curve and one table row.

What is drawn and computed:

- **Interval**: the mean over seeds ± the half-width of the 95 % Student-t interval of the mean, t with
  n - 1 degrees of freedom (:mod:`launchers.reporting.seed_stats` says why). With 3 seeds the band is wide —
  t = 4.30 — which is the point: a difference inside it is not a difference. One seed: the curve
  alone, no band, and the table says n=1.
- **Curves**: each seed's per-step values are first smoothed with a trailing moving average over
  ``--smooth`` steps (default 5: one step's reward is a mean over one batch only), then the mean and
  the band are taken across seeds at each step. The table uses the raw values.
- **Table**, one row per config: reward in the last quarter of the steps, gain (last quarter - first
  quarter), response length in the last quarter, each a per-seed figure averaged over seeds ± its
  interval; loss_scale_vs_token_mean averaged over every step and seed. A second table gives each
  config's difference to the first (or ``--baseline``) config with Welch's 95 % interval.
- **Alignment**: seeds of one config that logged different numbers of steps are truncated to the
  steps all of them logged (a line says so); configs of different lengths keep their own lengths.
- **Damaged inputs** (a missing or empty folder, a run without metrics, a line that is not JSON) get
  one line each on stderr and the rest is reported. Exit code 0 when anything was reported, 2 if not.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from launchers.reporting.seed_stats import LEVEL, Interval, mean_interval, welch_interval
from launchers.runs.run_records import SeedGroup, find_runs, group_seeds

SMOOTH = 5
DEFAULT_METRICS = ("reward_mean", "response_length_mean")


def quarter_means(values: Sequence[float]) -> tuple[float, float]:
    """Means of the first and of the last quarter of ``values`` (at least one value each)."""
    q = max(len(values) // 4, 1)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def _fmt(interval: Interval, digits: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{interval.mean:{sign}.{digits}f}"
    return f"{text} ± {interval.half_width:.{digits}f}" if interval.defined else text


def _seeds_cell(group: SeedGroup) -> str:
    seeds = ", ".join("?" if s is None else str(s) for s in group.seeds)
    return f"n={len(group.runs)} ({seeds})"


def group_figures(group: SeedGroup) -> dict[str, Interval]:
    """Per-seed figures of one config and their intervals across seeds."""
    first_last = [quarter_means(r) for r in group.per_run("reward_mean")]
    lengths = [quarter_means(r)[1] for r in group.per_run("response_length_mean")]
    scales = [sum(r) / len(r) for r in group.per_run("loss_scale_vs_token_mean")]
    return {
        "reward_last": mean_interval([last for _, last in first_last]),
        "gain": mean_interval([last - first for first, last in first_last]),
        "length_last": mean_interval(lengths),
        "loss_scale": mean_interval(scales),
    }


def _metric_cell(group: SeedGroup, metric: str) -> str:
    """Last-quarter mean of ``metric`` ± its interval across seeds, 3 significant digits."""
    interval = mean_interval([quarter_means(r)[1] for r in group.per_run(metric)])
    if not interval.n:
        return "-"
    return f"{interval.mean:.3g} ± {interval.half_width:.2g}" if interval.defined else f"{interval.mean:.3g}"


def markdown_table(groups: Sequence[SeedGroup], metrics: Sequence[str] = ()) -> str:
    """One row per config: seeds, steps, last-quarter reward, gain, last-quarter length, loss scale, ``metrics``."""
    head = (
        "| config | aggregation | seeds | steps | reward, last quarter | gain (last - first quarter) | "
        "response length, last quarter | loss_scale_vs_token_mean |"
        + "".join(f" {m}, last quarter |" for m in metrics)
        + "\n|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(metrics) + "\n"
    )
    rows = []
    for group in groups:
        fig = group_figures(group)
        aggregation = group.runs[0].records[-1].get("aggregation", "?")
        scale = f"{fig['loss_scale'].mean:.4g}" if fig["loss_scale"].n else "-"
        length = _fmt(fig["length_last"], 2) if fig["length_last"].n else "-"
        rows.append(
            f"| {group.label} | {aggregation} | {_seeds_cell(group)} | {len(group.steps)} | "
            f"{_fmt(fig['reward_last'], 3)} | {_fmt(fig['gain'], 3, signed=True)} | {length} | {scale} |"
            + "".join(f" {_metric_cell(group, m)} |" for m in metrics)
        )
    return head + "\n".join(rows) + "\n"


def difference_table(groups: Sequence[SeedGroup], baseline: SeedGroup) -> str:
    """Each other config minus ``baseline``: last-quarter reward and length, Welch 95 % intervals."""
    head = (
        f"| config | reward, last quarter, minus {baseline.label} | differs? | "
        f"response length, last quarter, minus {baseline.label} | differs? |\n|---|---:|---|---:|---|\n"
    )
    base = {key: [quarter_means(r)[1] for r in baseline.per_run(key)] for key in DEFAULT_METRICS}
    rows = []
    for group in groups:
        if group is baseline:
            continue
        cells = []
        for key, digits in zip(DEFAULT_METRICS, (3, 2), strict=True):
            diff = welch_interval([quarter_means(r)[1] for r in group.per_run(key)], base[key])
            if not diff.defined:
                cells += [f"{diff.mean:+.{digits}f}", "n/a (needs 2+ seeds on both sides)"]
            else:
                span = f"[{diff.low:+.{digits}f}, {diff.high:+.{digits}f}]"
                verdict = ("yes, higher" if diff.low > 0 else "yes, lower") if diff.excludes_zero() else "no"
                cells += [f"{diff.mean:+.{digits}f} {span}", verdict]
        rows.append(f"| {group.label} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def notes(groups: Sequence[SeedGroup], shared: Sequence[str], smooth: int) -> str:
    """The lines under the tables that say how every number was made."""
    lines = [
        f"Mean over seeds ± half-width of the {LEVEL:.0%} Student-t interval of the mean (t with n-1 degrees "
        "of freedom); n=1: no interval. Quarters are of the steps every seed of a config logged; "
        "loss_scale_vs_token_mean is the mean over all steps and seeds.",
        f"Differences: Welch's {LEVEL:.0%} interval (unequal variances); 'differs' when it excludes 0. "
        "One interval per comparison, not corrected for the number of comparisons.",
        f"Curves: each seed smoothed by a trailing {smooth}-step moving average, then mean and band across seeds.",
    ]
    if shared:
        lines.append("Every config also sets: " + " ".join(f"`{o}`" for o in shared) + ".")
    return "\n".join(f"- {line}" for line in lines) + "\n"


def _trailing_mean(values: Sequence[float], width: int) -> list[float]:
    return [sum(values[max(0, i - width + 1) : i + 1]) / (i + 1 - max(0, i - width + 1)) for i in range(len(values))]


def band(columns: Sequence[Sequence[float]], smooth: int) -> tuple[list[float], list[float]]:
    """Mean and interval half-width across runs at each step, after smoothing each run (NaN band if n=1)."""
    smoothed = [_trailing_mean(c, smooth) for c in columns]
    per_step = [mean_interval(values) for values in zip(*smoothed, strict=True)]
    return [i.mean for i in per_step], [i.half_width for i in per_step]


def plot(groups: Sequence[SeedGroup], metrics: Sequence[str], path: Path, smooth: int) -> None:
    """One panel per metric, one mean curve and 95 % band per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if len(metrics) in (2, 4) else min(len(metrics), 3)
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.4 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for index, group in enumerate(groups):
            columns = group.per_run(metric)
            if not columns:
                continue
            mean, half = band(columns, smooth)
            color = f"C{index % 10}"
            ax.plot(group.steps, mean, color=color, label=f"{group.label} (n={len(columns)})")
            if len(columns) > 1:
                ax.fill_between(group.steps, [m - h for m, h in zip(mean, half, strict=True)],
                                [m + h for m, h in zip(mean, half, strict=True)], color=color, alpha=0.2, linewidth=0)
        ax.set(title=f"{metric}: mean over seeds, {LEVEL:.0%} t-band", xlabel="optimizer step", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"each seed smoothed over {smooth} steps (trailing mean); band: {LEVEL:.0%} Student-t interval "
                 "of the mean across seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_metrics(requested: Sequence[str], groups: Sequence[SeedGroup]) -> tuple[list[str], list[str]]:
    """The requested metrics that some run logged as numbers, and one line per one that none did."""
    available = sorted({k for g in groups for r in g.runs for k, v in r.records[-1].items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
    kept, problems = [], []
    for name in requested:
        if name in available:
            kept.append(name)
        else:
            problems.append(f"--metrics: no run logged '{name}' as a number; not drawn "
                            f"(available: {', '.join(available)})")
    return kept, problems


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launchers.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", metavar="FOLDER",
                        help="multirun folders (multirun/DATE/TIME), run folders, or folders of either")
    parser.add_argument("--out", type=Path, default=None,
                        help="where NAME.png and NAME.md go (default: the first FOLDER that holds a run)")
    parser.add_argument("--name", default="report", help="file name stem of the outputs (default: report)")
    parser.add_argument("--metrics", default="", help="more metrics to draw, comma-separated, e.g. entropy,grad_norm")
    parser.add_argument("--smooth", type=int, default=SMOOTH,
                        help=f"trailing moving-average width of each seed's curve, in steps (default {SMOOTH}; 1: none)")
    parser.add_argument("--baseline", default=None, help="the config the differences are taken against (default: the first)")
    return parser


def _output_problem(out: Path, name: str) -> str | None:
    """One line when ``--out`` (or ``--name``) cannot hold the report, else None."""
    if "/" in name or name in ("", ".", ".."):
        return f"--name: a file name stem without '/' is needed (got {name!r}); e.g. --name report"
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == out else f"lies under the file {folder}"
                return f"--out: {out} {what}, not a folder; give a folder with --out"
            break
    return None


def main(argv: list[str] | None = None) -> int:
    """Write NAME.png and NAME.md, print the tables; one line per input problem on stderr, never a traceback."""
    args = _parser().parse_args(argv)
    try:
        return _report(args)
    except (OSError, RecursionError, MemoryError) as err:  # e.g. a folder that cannot be listed
        print(f"report: stopped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return 2


def _report(args: argparse.Namespace) -> int:
    """The body of :func:`main`."""
    if args.smooth < 1:
        print(f"--smooth: must be a whole number of steps >= 1 (got {args.smooth})", file=sys.stderr)
        return 2
    runs, problems = find_runs(args.folders)
    groups, shared, group_problems = group_seeds(runs)
    problems += group_problems
    extra = [m.strip() for m in args.metrics.split(",") if m.strip()]
    metrics, metric_problems = _check_metrics([m for m in extra if m not in DEFAULT_METRICS], groups)
    problems += metric_problems
    baseline = groups[0] if groups else None
    if args.baseline is not None and groups:
        matches = [g for g in groups if g.label == args.baseline] or [g for g in groups if args.baseline in g.label]
        if len(matches) == 1:
            baseline = matches[0]
        else:
            problems.append(f"--baseline: {'no' if not matches else 'more than one'} config matches "
                            f"'{args.baseline}' (configs: {'; '.join(g.label for g in groups)}); using {baseline.label}")
    for line in problems:
        print(line, file=sys.stderr)
    if not groups:
        print("nothing to report: no run with step records under "
              f"{' '.join(map(str, args.folders))}; run a sweep first (python -m launchers.train -m ...)", file=sys.stderr)
        return 2
    out = args.out or runs[0].source
    if problem := _output_problem(out, args.name):
        print(problem, file=sys.stderr)
        return 2
    text = markdown_table(groups, metrics)
    if len(groups) > 1:
        text += "\n" + difference_table(groups, baseline)
    text += "\n" + notes(groups, shared, args.smooth)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text(text)
        plot(groups, [*DEFAULT_METRICS, *metrics], out / f"{args.name}.png", args.smooth)
    except OSError as err:
        print(f"--out: cannot write the report into {out} ({err.strerror}); give a writable folder with --out",
              file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {out / f'{args.name}.png'} and {out / f'{args.name}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
