"""Test-wide settings."""

import os

import pytest
import torch
from hypothesis import settings

# CI replays the same examples every run (a red CI is then reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


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
