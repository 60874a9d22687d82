"""``python -m launchers.report SWEEP_DIR``: the sweep report (the code lives in :mod:`launchers.reporting.report`)."""

import sys

from launchers.extras import require_launcher

if __name__ == "__main__":
    require_launcher()
    from launchers.reporting.report import main

    sys.exit(main())
