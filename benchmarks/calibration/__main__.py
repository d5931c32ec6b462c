"""``python benchmarks/calibration run|rejudge|report ...`` from the repository root."""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
for _path in (str(_here.parents[1]), str(_here.parent)):  # the repository root, then benchmarks/
    if _path not in sys.path:
        sys.path.insert(0, _path)

from calibration.matrix import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
