"""Run folders as the report sees them: their step records, their config, and the seeds of one config.

Every problem with an input (a missing folder, a run without metrics, a line that is not JSON, a
reward that is not a finite number, a FIFO or an oversized file) is returned as one line of text naming
the file and what was done about it; the caller prints it and goes on with the rest. Nothing here raises
for a damaged file. Files are read by :mod:`launchers.runs.safe_read` (bounded, regular files only);
``.hydra/config.yaml`` is read as plain YAML: nothing in it runs and no ``${...}`` is resolved.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launchers.runs.safe_read import UnsafeInput, parse_json, read_jsonl_lines, read_yaml

METRICS_FILE = "metrics.jsonl"
# Run-level switches that do not change what is trained: runs that differ only in these (and the
# seed) are seeds of one config.
NOT_RECIPE = ("seed", "progress", "resume", "dry_run")
# Step-record fields the report computes with: present means a finite number.
NUMERIC_FIELDS = ("reward_mean", "response_length_mean")


def is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """The step records of a ``metrics.jsonl``, one per step (the last line of a step wins), by step.

    Returns:
        the records and one problem line per skipped line (not JSON, e.g. torn by a crash mid-write, or
        holding NaN/Infinity; not an object; no integer ``step``; a :data:`NUMERIC_FIELDS` value that is
        not a finite number).
    """
    by_step: dict[int, dict] = {}
    problems = []
    try:
        lines = read_jsonl_lines(Path(path))
    except UnsafeInput as err:
        return [], [f"{err}; skipped"]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line)
        except UnsafeInput as err:
            reason = str(err).split(": ", 1)[1]
            if "not a finite number" in reason:  # NaN, Infinity, 1e999: written by no launcher
                reason = reason.removeprefix("not valid JSON (").removesuffix(")")
            elif not reason.startswith("nested"):
                reason = "not JSON (a torn or partial write?)"
            problems.append(f"{path} line {number}: {reason}; line skipped")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
            problems.append(f"{path} line {number}: not a step record (no integer 'step'); line skipped")
            continue
        bad = [k for k in NUMERIC_FIELDS if k in record and not is_number(record[k])]
        if bad:
            problems.append(f"{path} line {number}: {bad[0]} is {record[bad[0]]!r:.40}, not a finite number; "
                            "line skipped")
            continue
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)], problems


def _natural_key(path: Path) -> list:
    """Job 2 before job 10: numbers in the path compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class Run:
    """One run folder: its step records, its config (``.hydra/config.yaml``) and overrides, minus the seed."""

    folder: Path
    source: Path
    records: list[dict]
    recipe: str | None = None
    """The composed config minus :data:`NOT_RECIPE` (canonical JSON); None without ``.hydra/config.yaml``."""
    overrides: list[str] = field(default_factory=list)
    """Command-line overrides minus :data:`NOT_RECIPE` keys."""
    seed: int | None = None

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in self.records]


def _read_hydra(run: Run, problems: list[str]) -> None:
    """Read ``.hydra/config.yaml`` and ``overrides.yaml`` as plain YAML (no code runs, no ``${...}`` resolves)."""
    hydra_dir = run.folder / ".hydra"
    try:
        config = read_yaml(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").exists() else None
        overrides = read_yaml(hydra_dir / "overrides.yaml") if (hydra_dir / "overrides.yaml").exists() else []
    except UnsafeInput as err:
        problems.append(f"{err}; the run is reported on its own, not with its seeds")
        return
    if isinstance(config, dict):
        run.seed = config.get("seed") if isinstance(config.get("seed"), int) else None
        run.recipe = json.dumps({k: v for k, v in config.items() if k not in NOT_RECIPE}, sort_keys=True, default=str)
    if isinstance(overrides, list):
        run.overrides = [str(o) for o in overrides if _override_key(str(o)) not in NOT_RECIPE]


def find_runs(folders: Sequence[Path]) -> tuple[list[Run], list[str]]:
    """Every run folder under ``folders`` (a folder holding ``metrics.jsonl`` or ``.hydra/``), in path order.

    Returns:
        the runs with at least one step record carrying ``reward_mean``, and one problem line per
        folder or file that could not be used.
    """
    runs: list[Run] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for source in folders:
        source = Path(source)
        if not source.exists():
            problems.append(f"{source}: no such folder; skipped")
            continue
        if not source.is_dir():
            problems.append(f"{source}: not a folder (give a sweep folder or a run folder); skipped")
            continue
        candidates = {p.parent for p in source.rglob(METRICS_FILE)} | {p.parent for p in source.rglob(".hydra")}
        if not candidates:
            problems.append(f"{source}: no run folder under it (none holds {METRICS_FILE} or .hydra/); skipped")
            continue
        for folder in sorted(candidates, key=_natural_key):
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            if not (folder / METRICS_FILE).exists():
                problems.append(f"{folder}: no {METRICS_FILE} (the run failed or logged no step yet); skipped")
                continue
            records, bad_lines = read_metrics(folder / METRICS_FILE)
            problems += bad_lines
            if not records:
                problems.append(f"{folder}: {METRICS_FILE} holds no step record; skipped")
                continue
            if not any("reward_mean" in r for r in records):
                problems.append(f"{folder}: no 'reward_mean' in {METRICS_FILE}; skipped")
                continue
            run = Run(folder, source, records)
            _read_hydra(run, problems)
            runs.append(run)
    return runs, problems


@dataclass
class SeedGroup:
    """The runs of one config that differ only in their seed, aligned on the steps they all logged."""

    label: str
    runs: list[Run]
    steps: list[int]

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def per_run(self, key: str) -> list[list[float]]:
        """``key`` at each common step, one list per run that logged it (runs without it are left out)."""
        columns = []
        for run in self.runs:
            by_step = {r["step"]: r for r in run.records}
            if all(is_number(by_step[s].get(key)) for s in self.steps):
                columns.append([float(by_step[s][key]) for s in self.steps])
        return columns


def _split_duplicate_seeds(members: list[Run]) -> list[list[Run]]:
    """One group per source folder when a seed repeats across sources (e.g. two sweeps compared)."""
    seeds = [r.seed for r in members]
    if len(set(seeds)) == len(seeds) or len({r.source for r in members}) == 1:
        return [members]
    by_source: dict[Path, list[Run]] = {}
    for run in members:
        by_source.setdefault(run.source, []).append(run)
    return list(by_source.values())


def group_seeds(runs: Sequence[Run]) -> tuple[list[SeedGroup], list[str], list[str]]:
    """Runs whose config minus the seed is the same form one group, labelled by their distinct overrides.

    Runs without a ``.hydra/config.yaml`` form a group each. Seeds of different lengths are truncated
    to the steps every seed logged (one line says so).

    Returns:
        the groups, the overrides every group shares (left out of the labels when there are several
        groups), and one problem line per group that needed one.
    """
    by_recipe: dict[str, list[Run]] = {}
    for run in runs:
        by_recipe.setdefault(run.recipe or f"folder:{run.folder}", []).append(run)
    member_lists = [part for members in by_recipe.values() for part in _split_duplicate_seeds(members)]
    shared = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    shared_in_order = [o for o in runs[0].overrides if o in shared] if runs else []
    labels = []
    for members in member_lists:
        first = members[0]
        own = [o for o in first.overrides if o not in shared] or first.overrides  # all shared: say them all
        label = " ".join(own) if own else ("defaults" if first.recipe else first.folder.name)
        labels.append(label)
    labels = [f"{label} [{members[0].source}]" if labels.count(label) > 1 else label
              for label, members in zip(labels, member_lists, strict=True)]
    groups, problems = [], []
    for label, members in zip(labels, member_lists, strict=True):
        common = sorted(set.intersection(*(set(r.steps) for r in members)))
        if not common:
            problems.append(f"{label}: its seeds share no logged step; skipped")
            continue
        lengths = [len(r.records) for r in members]
        if len(set(lengths)) > 1:
            problems.append(f"{label}: seeds logged {', '.join(map(str, lengths))} steps; "
                            f"curves and table use the {len(common)} steps all of them logged")
        groups.append(SeedGroup(label, members, common))
    return groups, (shared_in_order if len(member_lists) > 1 else []), problems
