"""Test-wide settings."""

import os

from hypothesis import settings

# CI replays the same examples every run (a red CI is then reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
