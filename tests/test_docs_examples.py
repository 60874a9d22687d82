"""Every runnable example of README.md and docs/ runs as written; the documentation site builds.

The fenced ```python and ```bash blocks are read from the Markdown itself, so an example cannot drift
from the code: each runs in a fresh process on the CPU, offline, in a temporary folder that mirrors the
repository root (links to its files and folders), so files the example writes (outputs/, multirun/,
an app of its own) land there. A block is left out only when the line right above its fence is
``<!-- not-run: REASON -->`` with a reason (GPU, several GPUs, verl/slime, ``make train``, ...).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
RUNNABLE = ("python", "bash")
NOT_RUN = re.compile(r"^<!-- not-run:(.*)-->$")
FENCE = re.compile(r"^```(\w*)\s*$")
# Generated or ignored folders a block must not see through the mirror (it writes its own).
NOT_MIRRORED = {".git", ".venv", "outputs", "multirun", "site", ".pytest_cache", ".hypothesis", ".ruff_cache"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the reason, when the line above the fence marks it

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with the not-run marker right above it (if any)."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = NOT_RUN.match(lines[i - 1].strip()) if i > 0 else None
        blocks.append(Block(page, i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            marker.group(1).strip() if marker else None))
        i = end + 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
# A block that appears twice (README.md and docs/index.md share the front page's examples) runs once.
TO_RUN = list({b.code: b for b in reversed(ALL_BLOCKS) if b.language in RUNNABLE and b.not_run is None}.values())[::-1]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """A folder that looks like the repository root: a link to each top-level entry."""
    folder = tmp_path_factory.mktemp("repo")
    for entry in ROOT.iterdir():
        if entry.name not in NOT_MIRRORED:
            (folder / entry.name).symlink_to(entry)
    return folder


def run_block(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "HYDRA_"))}
    env.update(
        CUDA_VISIBLE_DEVICES="",  # CPU only, whatever the machine has
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",  # no download
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # python, rl-loss-validate
        OMP_NUM_THREADS="1",
    )
    work = cwd / f"block-{block.page.stem}-{block.line}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    for entry in cwd.iterdir():
        if entry.is_symlink():
            (work / entry.name).symlink_to(entry.resolve())
    if block.language == "python":
        argv = [sys.executable, "-c", block.code]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=240)


def test_docs_have_runnable_examples():
    assert len(TO_RUN) >= 10, [b.name for b in TO_RUN]


def test_every_not_run_block_says_why():
    unexplained = [b.name for b in ALL_BLOCKS if b.not_run is not None and not b.not_run]
    assert not unexplained, f"<!-- not-run: REASON --> needs a reason: {unexplained}"


def test_every_not_run_marker_sits_above_a_runnable_block():
    misplaced = [b.name for b in ALL_BLOCKS if b.not_run is not None and b.language not in RUNNABLE]
    assert not misplaced, f"not-run markers above blocks that never run: {misplaced}"


@pytest.mark.slow
@pytest.mark.parametrize("block", TO_RUN, ids=lambda b: b.name)
def test_example_runs_as_written(block, mirror):
    result = run_block(block, mirror)
    assert result.returncode == 0, (
        f"{block.name} ({block.language}) exited {result.returncode}\n--- code\n{block.code}"
        f"--- stdout\n{result.stdout[-3000:]}--- stderr\n{result.stderr[-3000:]}"
    )


@pytest.mark.slow
def test_documentation_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()


# --- docs/layout.md: the code layout, generated from the modules' docstrings ------------------------------------

LAYOUT = ROOT / "docs" / "layout.md"
LAYOUT_BEGIN, LAYOUT_END = "<!-- layout: begin (generated) -->", "<!-- layout: end -->"


def first_paragraph(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line."""
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def layout_section() -> str:
    """The module list of docs/layout.md: every rl_loss module and every launchers module and subpackage."""
    rows = ["## `rl_loss`: the library", ""]
    for path in sorted((ROOT / "rl_loss").rglob("*.py")):
        if path.name != "__init__.py" or path.parent.name == "rl_loss":
            rows.append(f"- `{path.relative_to(ROOT)}`: {first_paragraph(path)}")
    rows += ["", "## `launchers`: the programs", ""]
    for path in sorted((ROOT / "launchers").glob("*.py")):
        rows.append(f"- `{path.relative_to(ROOT)}`: {first_paragraph(path)}")
    for package in sorted(p.parent for p in (ROOT / "launchers").rglob("*/__init__.py")):
        rows += ["", f"### `{package.relative_to(ROOT)}/`", "", first_paragraph(package / "__init__.py"), ""]
        for path in sorted(package.glob("*.py")):
            if path.name != "__init__.py":
                rows.append(f"- `{path.name}`: {first_paragraph(path)}")
    return "\n".join([LAYOUT_BEGIN, *rows, LAYOUT_END])


def test_layout_page_lists_every_module_with_its_docstring():
    text = LAYOUT.read_text()
    current = text[text.index(LAYOUT_BEGIN):text.index(LAYOUT_END) + len(LAYOUT_END)]
    assert current == layout_section(), "docs/layout.md is stale: regenerate it with python -m tests.test_docs_examples"


if __name__ == "__main__":  # regenerate the module list of docs/layout.md
    text = LAYOUT.read_text()
    start, end = text.index(LAYOUT_BEGIN), text.index(LAYOUT_END) + len(LAYOUT_END)
    LAYOUT.write_text(text[:start] + layout_section() + text[end:])
    print(f"wrote {LAYOUT}")
