"""A run's recipe: which configuration fields may change when a run is resumed, and what changed.

Every field of the configuration tree alters the run's mathematics unless it is listed in
:data:`RUN_INVARIANT`; the comparison walks the whole tree, so fields that other sections add later
(a loss term, a backend, a model kind) are guarded without being named here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from launchers.config.run_config import RunConfig

RUN_INVARIANT = frozenset({
    # How long and how often: the steps already taken do not depend on them (the learning rate is
    # constant; a schedule over max_steps would have to leave this list).
    "trainer.max_steps",
    "trainer.save_every",
    # Display and where the run executes.
    "progress",
    "device",
    # The DP x CP layout, its backend, the micro-batch size and the qkv format: docs/exactness.md makes the step
    # objective and gradient independent of them (float rounding aside; tests/test_preemption.py).
    "parallel",
    "trainer.micro_batch_size",
    # Intra-op threads change the order of float additions only, like the layout.
    "torch_threads",
    # backend=trl: recomputing activations in the backward pass gives the same activations, and
    # another attention kernel computes the same attention (float rounding aside): the memory/speed
    # knobs of a resumed run on other hardware. The rest of backend.* and model.* is guarded.
    "backend.gradient_checkpointing",
    "model.attn_implementation",
    # Switches of the launch itself: dry_run never reaches a run folder; resume differs by design.
    "dry_run",
    "resume",
    "allow_recipe_change",
})
"""Fields (or whole sections) a resume may change: they cannot alter the run's mathematics."""


def run_invariant(field: str) -> bool:
    """True when ``field`` (dotted) is in :data:`RUN_INVARIANT` or inside a section listed there."""
    parts = field.split(".")
    return any(".".join(parts[:n]) in RUN_INVARIANT for n in range(1, len(parts) + 1))


@dataclass(frozen=True)
class Change:
    """One field whose value differs between the run's configuration and the new one."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted path -> value for every leaf of a nested dict (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every field that differs between two configuration trees, in a stable order."""
    a, b = flatten(old), flatten(new)
    return [Change(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(a.keys() | b.keys())
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def config_tree(config: RunConfig) -> dict[str, Any]:
    """The configuration as stored in ``run_config.json`` (field names as on the command line)."""
    return config.model_dump(mode="json", by_alias=True)
