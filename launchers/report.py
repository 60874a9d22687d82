"""``python -m launchers.report SWEEP_DIR``: the sweep report (the code lives in :mod:`launchers.reporting.report`)."""

import sys

from launchers.reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
