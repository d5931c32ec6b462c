"""simic-tui command line: attach | replay | export | demo.

Every failure the operator can cause (a malformed address, a missing or unreadable connection file, a
damaged recording, an incompatible schema, a missing demo) ends in one plain sentence on stderr and
a non-zero exit code, never a traceback. An unreachable trainer is not a failure: the dashboard
opens in a visible "connecting…" state and keeps retrying.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from simic_tui import __version__

__all__ = ["build_parser", "demo_command", "launch_demo", "main", "never_reached"]

EXIT_USAGE = 2
EXIT_FAIL = 1

EPILOG = """\
examples:
  simic-tui demo                                  train the demo PPO and watch it
  simic-tui attach 127.0.0.1:5555                 attach to a local trainer
  simic-tui attach gpu-box:5555 --connection-file run.json
  simic-tui attach 127.0.0.1:5555 127.0.0.1:5557  watch a sweep, one row per trainer
  simic-tui attach --scan                         every local trainer, new ones join
  simic-tui replay runs/demo.simrec               replay a recording
  simic-tui export runs/demo.simrec > demo.jsonl
  simic-tui compare a.simrec b.simrec             compare recordings side by side
"""


class CliError(Exception):
    """A message for the operator; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simic-tui",
        description="Live PPO training-health dashboard for telemetry_core streams.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"simic-tui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    attach = sub.add_parser(
        "attach",
        help="attach to a running trainer (HOST:PORT)",
        description="Attach to a trainer's telemetry stream. A local trainer's connection file (key, "
        "command port, session) is found by port; for a remote trainer copy its connection file and "
        "pass it with --connection-file. The file holds the keys of the encrypted link (CURVE): "
        "without it a trainer refuses the dashboard, unless it was started with curve=False.",
    )
    attach.add_argument(
        "address",
        metavar="HOST:PORT",
        nargs="*",
        help="the trainer's PUB address, e.g. 127.0.0.1:5555; several open the sweep table",
    )
    attach.add_argument(
        "--scan",
        action="store_true",
        help="a sweep table of every trainer whose connection file is in the runtime directory; "
        "trainers that start later join it",
    )
    attach.add_argument(
        "--connection-file", metavar="FILE", help="the trainer's connection file (JSON, mode 0600)"
    )
    attach.add_argument(
        "--lease-updates",
        type=int,
        default=100,
        metavar="N",
        help="the most updates a DEBUG lease from this dashboard lasts (default 100)",
    )
    attach.add_argument(
        "--baseline",
        metavar="FILE",
        help="a known-good recording: the live statistics over its band (b), a banner when they leave it",
    )
    attach.add_argument(
        "--allow-plaintext-commands",
        action="store_true",
        help="send commands to a remote trainer whose connection file has no CURVE keys (the link is "
        "not encrypted: anyone on the path can read and replay them)",
    )

    replay = sub.add_parser(
        "replay",
        help="replay a recording",
        description="Replay a recording (written by TelemetryHub(record=...) or demo --record). A "
        "truncated or corrupt file shows what could be read and says what was skipped.",
    )
    replay.add_argument("file", metavar="FILE")
    replay.add_argument("--at", type=int, metavar="STEP", help="open at this update (default: the last)")
    replay.add_argument("--play", action="store_true", help="start playing from --at (or the start)")
    replay.add_argument("--speed", type=float, default=10.0, help="playback speed, x the recorded pace (10)")

    from simic_tui.compare import MAX_RUNS

    compare = sub.add_parser(
        "compare",
        help="compare recordings side by side",
        description=f"Compare up to {MAX_RUNS} recordings: their health statistics aligned by update (or "
        "environment steps), a summary per run and the incidents only some runs had. Runs are compared "
        "on the statistics they share; the screen names what was left out.",
    )
    compare.add_argument("files", metavar="FILE", nargs="+")

    export = sub.add_parser(
        "export",
        help="export a recording",
        description="Export a recording. JSON lines (the default) is one JSON object per snapshot (its "
        "fields plus session and seq) to stdout or --output. JSON has no NaN or infinity: non-finite "
        "numbers are written as null, like undefined statistics.",
    )
    export.add_argument("file", metavar="FILE")
    export.add_argument("--format", choices=["jsonl"], default="jsonl", help="output format (jsonl, the default)")
    export.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    export.add_argument(
        "--tensorboard", metavar="DIR", help="write TensorBoard scalars and histograms to DIR instead"
    )
    export.add_argument(
        "--x",
        choices=["update", "timesteps"],
        default="update",
        help="TensorBoard x-axis: the update step (default) or the environment timesteps the training "
        "loop's own logger uses (SB3's, CleanRL's global_step), to overlay its curves",
    )

    demo = sub.add_parser(
        "demo",
        help="train a recurrent PPO under telemetry and watch it",
        description="Start the demo trainer (python -m telemetry_core.demo) in a child process and "
        "attach the dashboard to it; quitting the dashboard stops the trainer. With --headless only "
        "the trainer runs, in the foreground.",
    )
    demo.add_argument("--headless", action="store_true", help="run only the trainer, in the foreground")
    demo.add_argument("--port", type=int, help="PUB port (the command port is PORT+1); default: a free one")
    demo.add_argument("--updates", type=int, help="PPO updates to run")
    demo.add_argument("--seed", type=int, help="random seed")
    demo.add_argument("--record", metavar="FILE", help="also record the stream to FILE")
    demo.add_argument(
        "--inject",
        action="append",
        metavar="KIND[@UPDATE]",
        help="inject a pathology (entropy-collapse, kl-spike, nan-gradients, ...); repeatable",
    )
    demo.add_argument("--log", metavar="FILE", help="where the trainer's output goes (default: a temp file)")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _attach(args: argparse.Namespace) -> int:
    from simic_tui.target import TargetError, resolve_target

    if args.scan or len(args.address) > 1:
        if args.baseline:
            raise CliError("--baseline goes with one trainer (HOST:PORT), not a sweep", EXIT_USAGE)
        return _sweep(args)
    if not args.address:
        raise CliError("attach needs HOST:PORT (or --scan for every local trainer)", EXIT_USAGE)
    try:
        target = resolve_target(args.address[0], args.connection_file)
    except TargetError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except PermissionError as exc:  # a runtime directory another user created or opened up
        raise CliError(str(exc)) from None
    if args.allow_plaintext_commands:
        target = replace(target, allow_plaintext=True)
    if args.lease_updates < 1:
        raise CliError("--lease-updates must be at least 1", EXIT_USAGE)
    if args.baseline:
        return _run_baseline(target, args.baseline)
    return _run_live(target, args.lease_updates)


def _run_baseline(target, path: str) -> int:  # type: ignore[no-untyped-def]
    from simic_tui.baseline import load_baseline
    from simic_tui.client import TelemetryClient
    from simic_tui.replay import ReplayError
    from simic_tui.screens.baseline import BaselineApp
    from simic_tui.store import TelemetryStore

    try:
        baseline = load_baseline(path)
    except ReplayError as exc:
        raise CliError(f"--baseline: {exc}") from None
    if baseline.trace.notice:
        print(f"simic-tui: {baseline.trace.notice}", file=sys.stderr)
    store = TelemetryStore()
    app = BaselineApp(store, client=TelemetryClient(target, store), baseline=baseline)
    app.run()
    return _exit_code(app)


def _sweep(args: argparse.Namespace) -> int:
    from simic_tui.screens.sweep import SweepApp
    from simic_tui.sweep import PANEL_INTERVAL, make_run
    from simic_tui.target import TargetError, resolve_target

    if args.connection_file:
        raise CliError("--connection-file names one trainer's file: attach to that one trainer", EXIT_USAGE)
    from simic_tui.sweep import MAX_SWEEP_RUNS

    if len(args.address) > MAX_SWEEP_RUNS:
        raise CliError(
            f"a sweep shows at most {MAX_SWEEP_RUNS} trainers; {len(args.address)} were given", EXIT_USAGE
        )
    runs = []
    seen = set()
    for address in args.address:
        try:
            target = resolve_target(address)
        except TargetError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        except PermissionError as exc:
            raise CliError(str(exc)) from None
        if args.allow_plaintext_commands:
            target = replace(target, allow_plaintext=True)
        if target.pub in seen:
            continue
        seen.add(target.pub)
        runs.append(make_run(target, address))
    app = SweepApp(runs, scan=args.scan)
    app.panel_interval = PANEL_INTERVAL
    app.run()
    return _exit_code(app)


def _exit_code(app) -> int:  # type: ignore[no-untyped-def]
    """The dashboard's own status: 1 after a crash (its traceback is in a private log file)."""
    return app.return_code or 0


def _run_live(target, lease_updates: int = 100) -> int:  # type: ignore[no-untyped-def]
    from simic_tui.app import SimicApp
    from simic_tui.client import TelemetryClient
    from simic_tui.store import TelemetryStore

    store = TelemetryStore()
    client = TelemetryClient(target, store, lease_updates=lease_updates)
    app = SimicApp(store, client=client)
    app.run()
    code = _exit_code(app)
    never = never_reached(client)
    if code == 0 and never:  # quit without ever hearing from a trainer: say where, and fail
        print(f"simic-tui attach: {never}", file=sys.stderr)
        return EXIT_FAIL
    return code


def never_reached(client) -> str:  # type: ignore[no-untyped-def]
    """'' when a trainer ever answered this client, else the address and why nothing did."""
    if client.status.last_frame_at is not None:
        return ""
    from simic_tui.reach import address_of

    why = client.status.unreachable
    return f"no trainer answered at {address_of(client.target)}{': ' + why if why else ''}"


def _replay(args: argparse.Namespace) -> int:
    from simic_tui.app import SimicApp
    from simic_tui.replay import ReplayError, ReplaySource, load_recording
    from simic_tui.store import TelemetryStore

    try:
        loaded = load_recording(args.file)
    except ReplayError as exc:
        raise CliError(str(exc)) from None
    notice = loaded.notice()
    if not loaded.frames:
        raise CliError(f"{args.file}: no snapshot could be read{': ' + notice if notice else ''}")
    if notice:
        print(f"simic-tui: {notice}", file=sys.stderr)
    store = TelemetryStore()
    source = ReplaySource(loaded, store, speed=args.speed)
    if args.at is not None:
        index = next(
            (i for i, (_, s) in enumerate(loaded.frames) if s.step >= args.at), len(loaded.frames) - 1
        )
        source.seek(index + 1)
    else:
        source.seek(1 if args.play else source.total)
    if args.play:
        source.playing = True
    app = SimicApp(store, replay=source, banner=notice)
    app.run()
    return _exit_code(app)


def _compare(args: argparse.Namespace) -> int:
    from simic_tui.compare import build_comparison, load_runs
    from simic_tui.replay import ReplayError
    from simic_tui.screens.compare import CompareApp

    try:
        runs = load_runs(args.files)
    except ReplayError as exc:
        raise CliError(str(exc)) from None
    for run in runs:
        if run.notice:
            print(f"simic-tui: {run.notice}", file=sys.stderr)
    app = CompareApp(build_comparison(runs))
    app.run()
    return _exit_code(app)


def _export(args: argparse.Namespace) -> int:
    from simic_tui.export import export_jsonl
    from simic_tui.replay import ReplayError

    if args.tensorboard:
        return _export_tensorboard(args)
    if args.x != "update":
        raise CliError("--x applies to --tensorboard exports", EXIT_USAGE)
    try:
        if args.output:
            with open(args.output, "wb") as out:
                loaded = export_jsonl(args.file, out)
        else:
            loaded = export_jsonl(args.file, sys.stdout.buffer)
            sys.stdout.flush()
    except ReplayError as exc:
        raise CliError(str(exc)) from None
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        raise CliError(f"cannot write {args.output or 'stdout'}: {exc.strerror or exc}") from None
    notice = loaded.notice()
    where = f" to {args.output}" if args.output else ""
    print(f"simic-tui: exported {len(loaded.frames)} snapshot(s){where}", file=sys.stderr)
    if notice:
        print(f"simic-tui: {notice}", file=sys.stderr)
    return 0


def _export_tensorboard(args: argparse.Namespace) -> int:
    try:  # trainer-side integration, imported only on request (it may need tensorboard/torch)
        from telemetry_core.integrations.tensorboard import export_recording  # type: ignore[import-not-found]
    except ImportError as exc:
        raise CliError(
            f"TensorBoard export is not available here ({exc}); install it with pip install 'simic-tui[tensorboard]'"
        ) from None
    try:
        written = export_recording(args.file, args.tensorboard, x=args.x)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(
        f"simic-tui: wrote TensorBoard events to {args.tensorboard} ({written} snapshot(s))", file=sys.stderr
    )
    return 0


def demo_command(args: argparse.Namespace) -> tuple[list[str], int]:
    """The trainer's command line for ``simic-tui demo`` (validated without importing torch)."""
    from simic_tui.demo import DemoError, demo_available, free_port_pair, trainer_command

    reason = demo_available()
    if reason:
        raise CliError(f"cannot run the demo: {reason}")
    if args.port is not None and not 0 < args.port < 65535:
        raise CliError("--port must be from 1 to 65534 (the command port is PORT+1)", EXIT_USAGE)
    if args.updates is not None and args.updates < 1:
        raise CliError("--updates must be at least 1", EXIT_USAGE)
    from telemetry_core.demo.cli import parse_injection  # torch-free by contract

    for item in args.inject or []:
        try:
            parse_injection(item)
        except ValueError as exc:
            raise CliError(f"--inject {item}: {exc}", EXIT_USAGE) from None
    try:
        port = args.port or free_port_pair()
    except DemoError as exc:
        raise CliError(str(exc)) from None
    return trainer_command(
        port, updates=args.updates, seed=args.seed, record=args.record, inject=args.inject
    ), port


def launch_demo(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Start the trainer child and build the dashboard attached to it: (app, trainer)."""
    from simic_tui.app import SimicApp
    from simic_tui.client import TelemetryClient
    from simic_tui.demo import DemoTrainer
    from simic_tui.store import TelemetryStore
    from simic_tui.target import resolve_target

    command, port = demo_command(args)
    trainer = DemoTrainer(command, log_path=Path(args.log) if args.log else None).start()
    target = replace(
        resolve_target(f"127.0.0.1:{port}"),
        require_pid=trainer.pid,  # only this child's connection file, never a stale one
        cmd=None,
        key=None,
        session=None,
        connection_file=None,
        note=f"waiting for the demo trainer to start (its log: {trainer.log_path})",
    )
    store = TelemetryStore()
    return SimicApp(store, client=TelemetryClient(target, store), trainer=trainer), trainer


def _demo(args: argparse.Namespace) -> int:
    import subprocess

    if args.headless:
        command, _ = demo_command(args)
        proc = subprocess.Popen(command)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the child got the same Ctrl-C; let it finish cleanly
            try:
                return proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
    try:
        app, trainer = launch_demo(args)
    except PermissionError as exc:  # the runtime directory (connection files, the trainer's log)
        raise CliError(str(exc)) from None
    try:
        app.run()
    finally:
        if trainer.poll() is None:
            print("simic-tui: stopping the demo trainer…", file=sys.stderr)
        code = trainer.stop()
    if code not in (0, None):
        print(
            f"simic-tui: the demo trainer exited with code {code}; its log: {trainer.log_path}",
            file=sys.stderr,
        )
        return EXIT_FAIL
    return _exit_code(app)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a command is required: usage on stderr, like any usage error
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handlers = {"attach": _attach, "replay": _replay, "compare": _compare, "export": _export, "demo": _demo}
    started = time.monotonic()
    try:
        return handlers[args.command](args)
    except CliError as exc:
        print(f"simic-tui {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: say so plainly; the traceback only on request
        if os.environ.get("SIMIC_TUI_DEBUG"):
            traceback.print_exc()
        print(
            f"simic-tui {args.command}: internal error after {time.monotonic() - started:.1f} s: {exc!r} "
            "(set SIMIC_TUI_DEBUG=1 for the traceback; please report it)",
            file=sys.stderr,
        )
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
