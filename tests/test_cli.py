"""The simic-tui command line, run as the operator runs it: clear sentences and exit codes, never a
traceback; export writes one JSON object per snapshot; the demo's trainer child is stopped cleanly;
the dashboard process never imports torch."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from simic_tui import __version__
from simic_tui.demo import DemoTrainer, demo_available, free_port_pair, trainer_command
from telemetry_core.record import FILE_MAGIC, FORMAT_VERSION

FIXTURE = Path(__file__).parent / "fixtures" / "ppo_run.simrec"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simic_tui.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def assert_plain_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    err = proc.stderr.strip()
    assert err.startswith("simic-tui"), err
    for word in words:
        assert word in err, (word, err)


def test_help_and_version() -> None:
    out = cli("--help")
    assert out.returncode == 0
    for command in ("attach", "replay", "export", "demo"):
        assert command in out.stdout
    assert cli("--version").stdout.strip() == f"simic-tui {__version__}"
    export_help = cli("export", "--help").stdout
    assert "null" in export_help and "NaN" in export_help  # says what happens to NaN in JSON
    assert "--connection-file" in cli("attach", "--help").stdout


@pytest.mark.parametrize(
    "address,words",
    [
        ("localhost", ("malformed address", "HOST:PORT")),
        ("1.2.3.4:99999", ("port must be a number",)),
        ("::1:5555", ("IPv6", "brackets")),
        ("bad host!:5555", ("not a host name",)),
    ],
)
def test_attach_rejects_malformed_addresses(address: str, words: tuple[str, ...]) -> None:
    assert_plain_error(cli("attach", address), 2, *words)


def test_attach_reports_a_missing_or_unsafe_connection_file(tmp_path: Path) -> None:
    assert_plain_error(
        cli("attach", "127.0.0.1:5555", "--connection-file", str(tmp_path / "x.json")), 2, "does not exist"
    )
    loose = tmp_path / "loose.json"
    loose.write_text(
        json.dumps(
            {"pub": "tcp://127.0.0.1:5555", "cmd": "tcp://127.0.0.1:5556", "session": "s", "key": "ab" * 32}
        )
    )
    loose.chmod(0o644)
    assert_plain_error(
        cli("attach", "127.0.0.1:5555", "--connection-file", str(loose)), 2, "readable by other users"
    )
    loose.chmod(0o600)
    assert_plain_error(
        cli("attach", "127.0.0.1:6000", "--connection-file", str(loose)), 2, "port 5555, not 6000"
    )
    bad_key = tmp_path / "badkey.json"
    bad_key.write_text(json.dumps({"pub": "tcp://127.0.0.1:5555", "cmd": "x", "session": "s", "key": "zz"}))
    bad_key.chmod(0o600)
    assert_plain_error(cli("attach", "127.0.0.1:5555", "--connection-file", str(bad_key)), 2, "not valid")


def _header(schema_major: int, session: str = "s") -> bytes:
    return struct.pack("<8sHHH", FILE_MAGIC, FORMAT_VERSION, schema_major, len(session)) + session.encode()


def test_replay_and_export_refuse_what_is_not_a_usable_recording(tmp_path: Path) -> None:
    assert_plain_error(cli("replay", str(tmp_path / "none.simrec")), 1, "does not exist")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_plain_error(cli("replay", str(text)), 1, "not a simic-tui recording")
    future = tmp_path / "future.simrec"
    future.write_bytes(_header(99))
    assert_plain_error(cli("replay", str(future)), 1, "schema 99", "reads schema 1.")
    empty = tmp_path / "empty.simrec"
    empty.write_bytes(_header(1))
    assert_plain_error(cli("replay", str(empty)), 1, "no snapshot could be read")
    assert_plain_error(cli("export", str(future), "--format", "jsonl"), 1, "schema 99")
    # Without --format the export is JSON lines, the one format.
    default, explicit = cli("export", str(FIXTURE)), cli("export", str(FIXTURE), "--format", "jsonl")
    assert default.returncode == 0 and default.stdout == explicit.stdout and default.stdout.count("\n") > 1


def test_no_command_prints_usage_and_exits_2() -> None:
    proc = cli()
    assert proc.returncode == 2 and "usage: simic-tui" in proc.stderr and "attach" in proc.stderr
    assert proc.stdout == ""


def test_export_jsonl_writes_one_object_per_snapshot_with_nan_as_null(tmp_path: Path) -> None:
    from simic_tui.replay import load_recording

    loaded = load_recording(FIXTURE)
    proc = cli("export", str(FIXTURE), "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(loaded.frames)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [env.seq for env, _ in loaded.frames]
    assert {r["session"] for r in records} == {loaded.session}
    assert [r["step"] for r in records] == [s.step for _, s in loaded.frames]
    nan_rows = [r for r in records if r["gradients"]["nan_count"] > 0]
    assert nan_rows and nan_rows[0]["gradients"]["total_norm"] is None  # NaN -> null
    assert not re.search(r":\s*-?(NaN|Infinity)\b", proc.stdout)  # strict JSON: no bare NaN tokens
    assert f"exported {len(lines)} snapshot(s)" in proc.stderr
    out = tmp_path / "run.jsonl"
    proc = cli("export", str(FIXTURE), "--format", "jsonl", "-o", str(out))
    assert proc.returncode == 0 and out.read_text().splitlines() == lines


def test_export_of_a_truncated_recording_writes_what_could_be_read_and_says_so(tmp_path: Path) -> None:
    from simic_tui.replay import load_recording

    data = FIXTURE.read_bytes()
    cut = tmp_path / "cut.simrec"
    cut.write_bytes(data[: len(data) // 2])
    proc = cli("export", str(cut), "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    n = len(proc.stdout.splitlines())
    assert 0 < n < len(load_recording(FIXTURE).frames)
    assert "truncated" in proc.stderr and f"Showing the {n} snapshot(s)" in proc.stderr


def test_export_into_a_closed_pipe_is_quiet() -> None:
    proc = subprocess.run(
        f"{sys.executable} -m simic_tui.cli export {FIXTURE} --format jsonl | head -c 10",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "error" not in proc.stderr


def test_demo_rejects_bad_arguments_before_starting_anything() -> None:
    reason = demo_available()
    if reason:  # no trainer on this machine: that is the message
        assert_plain_error(cli("demo"), 1, "cannot run the demo", reason)
        return
    assert_plain_error(cli("demo", "--inject", "bogus"), 2, "unknown injection 'bogus'", "kl-spike")
    assert_plain_error(cli("demo", "--port", "65535"), 2, "--port must be from 1 to 65534")
    assert_plain_error(cli("demo", "--updates", "0"), 2, "--updates must be at least 1")


def test_demo_trainer_command_carries_every_flag() -> None:
    port = free_port_pair()
    cmd = trainer_command(port, updates=5, seed=3, record="r.simrec", inject=["kl-spike@40", "nan-gradients"])
    assert cmd[:3] == [sys.executable, "-m", "telemetry_core.demo"]
    assert cmd[3:] == [
        "--port", str(port), "--updates", "5", "--seed", "3", "--record", "r.simrec",
        "--inject", "kl-spike@40", "--inject", "nan-gradients",
    ]  # fmt: skip


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    mode = sys.argv[1]
    if mode == "stubborn":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        # as the real demo child does (it installs its own handlers): a disposition inherited from
        # the process that started it (SIGINT ignored there) must not make it deaf to Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print("trainer up", flush=True)
    try:
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("closing hub and recording", flush=True)
        sys.exit(0)
    """
)


def test_quitting_the_demo_stops_its_trainer_child_cleanly(tmp_path: Path) -> None:
    """The stop path a quitting dashboard takes: SIGINT (the trainer's Ctrl-C path), then escalate."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / "trainer.log"
    trainer = DemoTrainer([sys.executable, str(script), "polite"], log_path=log).start()
    deadline = time.monotonic() + 20
    while "trainer up" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert trainer.poll() is None
    assert trainer.stop(timeout=10) == 0
    assert "closing hub and recording" in log.read_text()

    stubborn = DemoTrainer([sys.executable, str(script), "stubborn"], log_path=tmp_path / "s.log").start()
    while "trainer up" not in (tmp_path / "s.log").read_text() and time.monotonic() < deadline + 20:
        time.sleep(0.05)
    codes: list[int | None] = []
    stopper = threading.Thread(target=lambda: codes.append(stubborn.stop(timeout=0.5)), daemon=True)
    stopper.start()
    stopper.join(60)  # generous: a stop that waited on the stubborn child would never return
    assert codes == [-signal.SIGTERM], "the stop escalated to SIGTERM"


def test_the_dashboard_process_never_imports_torch() -> None:
    """Run the real app headless on the fixture recording in a fresh interpreter; torch stays out."""
    code = textwrap.dedent(
        f"""
        import asyncio, json, sys
        import simic_tui.cli, simic_tui.client, simic_tui.export, simic_tui.demo
        from simic_tui.app import SimicApp
        from simic_tui.replay import ReplaySource, load_recording
        from simic_tui.store import TelemetryStore

        async def main():
            store = TelemetryStore()
            replay = ReplaySource(load_recording({str(FIXTURE)!r}), store)
            replay.seek(replay.total)
            app = SimicApp(store, replay=replay)
            async with app.run_test(size=(120, 40)) as pilot:
                await pilot.press("d")
                await pilot.press("escape", "t", "escape", "a", "escape", "question_mark")
                await pilot.pause()
        asyncio.run(main())
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "gymnasium"))))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_a_foreign_or_open_runtime_directory_is_explained_in_a_sentence(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    (runtime / "simic-tui").mkdir(parents=True, mode=0o700)
    (runtime / "simic-tui").chmod(0o755)  # as another user's umask would leave it
    proc = cli("attach", "127.0.0.1:5555", env={"SIMIC_RUNTIME_DIR": str(runtime)})
    assert_plain_error(proc, 1, "open to other users", "SIMIC_RUNTIME_DIR")
    assert "internal error" not in proc.stderr


def test_the_demo_log_is_private_and_never_follows_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(runtime))
    trainer = DemoTrainer([sys.executable, "-c", "print('hello from the trainer')"]).start()
    assert trainer.proc is not None and trainer.proc.wait(30) == 0
    log = trainer.log_path
    assert log is not None and log.parent == runtime / "simic-tui"
    assert (log.stat().st_mode & 0o777) == 0o600 and "hello" in log.read_text()
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    planted = tmp_path / "planted.log"
    planted.symlink_to(victim)
    with pytest.raises(OSError):
        DemoTrainer([sys.executable, "-c", "pass"], log_path=planted).start()
    assert victim.read_text() == "keep me"


async def test_a_crash_exits_1_with_its_traceback_in_a_private_file_not_on_the_screen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from simic_tui.app import SimicApp
    from simic_tui.store import TelemetryStore

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(runtime))
    app = SimicApp(TelemetryStore())
    with pytest.raises(ZeroDivisionError):
        async with app.run_test() as pilot:
            app.call_later(lambda: 1 / 0)
            await pilot.pause()
    assert app.return_code == 1
    shown = capsys.readouterr().err  # what reached the terminal
    assert "internal error ZeroDivisionError" in shown and "Traceback" not in shown
    (crash,) = (runtime / "simic-tui").glob("crash-*.log")
    assert (crash.stat().st_mode & 0o777) == 0o600 and "Traceback" in crash.read_text()


def test_a_moved_default_port_is_in_the_attach_line_and_said() -> None:
    import argparse
    import io

    from telemetry_core.demo.cli import _announce

    class Hub:
        endpoints = ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558")

        class publisher:
            connection_path = None

    out = io.StringIO()
    _announce(Hub(), "tcp://127.0.0.1:5555", argparse.Namespace(quiet=False), out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "simic-tui attach 127.0.0.1:5557"
    assert lines[1] == "telemetry: port 5555 is in use (another trainer?); streaming on 5557"
    out = io.StringIO()
    _announce(Hub(), "tcp://127.0.0.1:5557", argparse.Namespace(quiet=False), out)
    assert out.getvalue().splitlines() == ["simic-tui attach 127.0.0.1:5557"]


def test_a_wildcard_bind_prints_an_attach_line_that_works(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import io
    import socket

    from telemetry_core.demo.cli import _announce

    class Hub:
        endpoints = ("tcp://0.0.0.0:5555", "tcp://0.0.0.0:5556")

        class publisher:
            connection_path = Path("/run/user/1/simic-tui/all-5555.json")

    out = io.StringIO()
    _announce(Hub(), "tcp://0.0.0.0:5555", argparse.Namespace(quiet=True), out)
    line = out.getvalue().splitlines()[0]
    assert line == f"simic-tui attach {socket.gethostname()}:5555 --connection-file all-5555.json"
