"""Test-wide settings."""

import os
from collections import Counter

import pytest
import torch
from hypothesis import settings

# CI replays the same examples every run (a red CI is then reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Under pytest-xdist (`make test`: one worker per core) each worker is one of the cores: a torch thread
# pool per worker would only put two threads on each core (and spin-wait), so in-process tests and the
# processes they start (OMP_NUM_THREADS) use one thread. Results do not depend on it: the launcher sets
# its own thread count (torch_threads, default 1) and comparisons are made within one process setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SUMMARY_PROPERTY = "summary"


@pytest.fixture
def report_summary(request):
    """Print a text (a property test's summary) in pytest's closing summary, also from an xdist worker.

    ``capsys.disabled()`` prints from a worker are lost; a report's user properties travel to the
    controlling process, whose :func:`pytest_terminal_summary` prints them.
    """
    return lambda text: request.node.user_properties.append((SUMMARY_PROPERTY, text))


def pytest_terminal_summary(terminalreporter):
    summaries = [value for report in terminalreporter.stats.get("passed", [])
                 for name, value in getattr(report, "user_properties", ()) if name == SUMMARY_PROPERTY]
    if summaries:
        terminalreporter.section("property summaries")
        for text in summaries:
            terminalreporter.line(text.strip("\n"))


LONGEST_FILES = ("test_distributed.py", "test_preemption.py")
"""The two files of torchrun launches, 3-4 minutes of one worker each (`--durations`): always started first."""


def pytest_collection_modifyitems(items):
    """Files with the most slow tests first, each file's tests in their own order.

    Under ``--dist loadfile`` workers take whole files in this order: the long files (processes, training)
    start at once on every worker and the many quick files fill the gaps, instead of one long file
    starting last while the other workers idle.
    """
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first_seen = {path: n for n, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (item.path.name not in LONGEST_FILES, -slow[item.path], first_seen[item.path]))


@pytest.fixture(scope="module")
def single_intra_op_thread():
    """One torch intra-op thread for a module of tiny tensors (``pytestmark = pytest.mark.usefixtures(...)``).

    The thread pool only adds latency there: on a busy 2-core machine every op of a 2-thread pool waits for
    a descheduled worker (a parallel repeat_interleave takes milliseconds instead of microseconds).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
