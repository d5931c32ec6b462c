"""``python benchmarks/calibration run|rejudge|report ...`` from the repository root.

The ``telemetry_core`` that judges is the first one on the path: set ``PYTHONPATH`` to another
checkout to re-judge these recordings with its rules; this repository is only the fallback.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
if str(_here.parent) not in sys.path:  # benchmarks/, for the calibration package
    sys.path.insert(0, str(_here.parent))
if str(_here.parents[1]) not in sys.path:
    sys.path.append(str(_here.parents[1]))

from calibration.matrix import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
