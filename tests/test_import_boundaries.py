"""The two sides of the product stay apart: the dashboard never imports torch, the trainer side
never imports textual or rich. Checked in fresh subprocesses so nothing else has imported them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        "import simic_tui",
        "import simic_tui.cli",
        "import telemetry_core, telemetry_core.schema, telemetry_core.protocol, telemetry_core.config",
    ],
)
def test_dashboard_side_never_imports_torch(code: str) -> None:
    modules = _modules_after(code)
    assert "torch" not in modules, f"{code!r} imported torch"


def test_telemetry_core_never_imports_textual_or_rich() -> None:
    modules = _modules_after(
        "import telemetry_core, telemetry_core.config, telemetry_core.schema, telemetry_core.protocol\n"
        "import telemetry_core.reductions.transfer, telemetry_core.hub, telemetry_core.transport\n"
        "import telemetry_core.distributed, telemetry_core.debug, telemetry_core.demo.cli\n"
        "import telemetry_core.demo.ppo, telemetry_core.integrations.tensorboard"
    )
    assert "torch" in modules  # the reductions really were imported
    leaked = {m for m in modules if m.split(".")[0] in {"textual", "rich", "simic_tui"}}
    assert not leaked, f"telemetry_core imported {sorted(leaked)}"
