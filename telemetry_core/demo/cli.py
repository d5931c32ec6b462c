"""Command line of the demo trainer: ``python -m telemetry_core.demo [options]``.

This module is torch-free until :func:`main` starts training, so ``--help``, argument errors and
:func:`build_parser` (which ``simic-tui demo`` may reuse to validate its pass-through arguments
without importing torch) answer at once.

Output contract (for a parent process such as ``simic-tui demo``): once the stream is bound, one
line exactly ``simic-tui attach HOST:PORT`` is printed and flushed on stdout (for a wildcard bind,
HOST is this machine's name and ``--connection-file NAME`` follows); with ``--quiet`` it is the only
line before the final summary, which says what telemetry lost, if anything. Ctrl-C (SIGINT) and SIGTERM stop training at once,
close the hub (sockets, connection file, recording) and exit with status 0. Bad arguments exit
with status 2 and a one-line reason.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins the process group (gloo on the CPU, NCCL
with ``--device cuda``) and trains its own environments data-parallel; rank 0 alone binds, records
and prints, so the output contract above holds for the launcher's output::

    torchrun --standalone --nproc_per_node 4 -m telemetry_core.demo --updates 300
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = [
    "DEFAULT_INJECT_FRACTION",
    "INJECTION_KINDS",
    "Injection",
    "build_parser",
    "main",
    "parse_injection",
]

# The pathologies telemetry_core.demo.inject implements (it checks that the two lists agree).
INJECTION_KINDS: tuple[str, ...] = (
    "entropy-collapse",
    "kl-spike",
    "ratio-explosion",
    "value-collapse",
    "nan-gradients",
    "exploding-gradients",
    "lstm-explosion",
)
DEFAULT_INJECT_FRACTION = 0.3
LEVELS = ("off", "minimal", "normal", "debug")
DEFAULT_PORT = 5555


@dataclass(frozen=True)
class Injection:
    """A requested pathology: its kind and the update it starts at (None: 30% of the plan)."""

    kind: str
    update: int | None = None

    def __str__(self) -> str:
        return self.kind if self.update is None else f"{self.kind}@{self.update}"


def parse_injection(text: str) -> Injection:
    """Parse ``KIND`` or ``KIND@UPDATE``; raise ValueError naming the valid choices on bad input."""
    kind, sep, at = str(text).strip().partition("@")
    kind = kind.strip().lower().replace("_", "-")
    if kind not in INJECTION_KINDS:
        raise ValueError(f"unknown injection {kind!r}; choose one of {', '.join(INJECTION_KINDS)}")
    if not sep:
        return Injection(kind)
    try:
        update = int(at)
    except ValueError:
        raise ValueError(f"injection update must be an integer >= 1, got {at!r} in {text!r}") from None
    if update < 1:
        raise ValueError(f"injection update must be >= 1 (updates count from 1), got {update}")
    return Injection(kind, update)


def _injection_arg(text: str) -> Injection:
    try:
        return parse_injection(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 0 <= value <= 65534:
        raise argparse.ArgumentTypeError(
            f"port must lie in 0..65534 (commands use port + 1; 0 picks free ports), got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m telemetry_core.demo",
        description=(
            "Train a recurrent, multi-head PPO on CartPole without velocities (direction x force "
            "level) and stream its telemetry to `simic-tui attach`."
        ),
        epilog=(
            "injections (KIND[@UPDATE], repeatable; default update: 30% of --updates): "
            + ", ".join(INJECTION_KINDS)
        ),
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--port", type=_port, default=None, help=f"stream on tcp://127.0.0.1:PORT (default {DEFAULT_PORT})"
    )
    where.add_argument(
        "--bind",
        metavar="ENDPOINT",
        default=None,
        help="stream on this ZeroMQ endpoint, e.g. tcp://127.0.0.1:6000",
    )
    where.add_argument("--no-network", action="store_true", help="do not open any socket")
    parser.add_argument("--updates", type=_positive_int, default=300, help="PPO updates to run (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--record", metavar="FILE", default=None, help="also record every snapshot to FILE")
    parser.add_argument(
        "--inject",
        metavar="KIND[@UPDATE]",
        type=_injection_arg,
        action="append",
        default=[],
        help="inject a pathology by a realistic mechanism (see below)",
    )
    parser.add_argument(
        "--level", choices=LEVELS, default="normal", type=str.lower, help="telemetry level (default normal)"
    )
    parser.add_argument("--run-name", default="demo", help="run name shown on the dashboard (default demo)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="print only the attach line and a summary")
    return parser


class _Stop(BaseException):
    """Raised in the main thread by the SIGINT and SIGTERM handlers: stop training now.

    Not KeyboardInterrupt: CPython (3.11) remembers a KeyboardInterrupt that passes through code run
    by ``PyRun_String`` (which extension modules use) as "unhandled" even when it is caught later,
    and then ends the process by SIGINT after a clean shutdown (status -2 instead of 0, about one
    Ctrl-C in eight in the first update). A BaseException, so that no ``except Exception`` on the
    way (the hub's error guard) swallows it as a telemetry error.
    """


_stop_requested: list[int] = []  # the signals received (a list: the handler must not rebind a global)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    _stop_requested.append(signum)
    raise _Stop()


def _interrupted(exc: BaseException) -> bool:
    """True for the stop itself, or for an error it caused on its way up.

    Python wraps what a class body's ``__set_name__`` raises in a RuntimeError: a Ctrl-C during
    a lazy import (torch.distributed at the start of training) arrives as one.
    """
    return isinstance(exc, (_Stop, KeyboardInterrupt)) or bool(_stop_requested)


def _set_stop_handlers(handler: Any) -> dict[int, Any]:
    """SIGINT and SIGTERM go to ``handler``; returns the previous handlers (none off the main thread)."""
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread (main() run from a thread)
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "  -"


def main(argv: Sequence[str] | None = None) -> int:
    # First of all: a Ctrl-C during the imports and setup below (seconds: torch, the agent, the
    # bind) stops as cleanly as one during training.
    previous = _set_stop_handlers(_on_stop_signal)
    _stop_requested.clear()
    try:
        return _main(argv)
    except BaseException as exc:
        if isinstance(exc, SystemExit) or not _interrupted(exc):
            raise
        print("interrupted before training started", flush=True)
        return 0
    finally:
        _restore_handlers(previous)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for inj in args.inject:
        if inj.update is not None and inj.update > args.updates:
            parser.error(
                f"--inject {inj}: update {inj.update} is after the last one (--updates {args.updates})"
            )
    if args.bind is not None and not args.bind.strip():
        parser.error("--bind needs an endpoint such as tcp://127.0.0.1:6000")

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)

    from telemetry_core.config import TelemetryConfig, TelemetryLevel
    from telemetry_core.demo.ppo import DemoConfig, iter_train, make_agent, make_hub, summarize

    try:
        rank, device = _join_ranks(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = DemoConfig(seed=args.seed, num_updates=args.updates, device=device)
    if rank != 0:  # under torchrun only rank 0 streams, records and prints
        args.quiet, args.record = True, None
    if args.no_network or rank != 0:
        bind = None
    elif args.bind is not None:
        bind = args.bind.strip()
    else:
        bind = f"tcp://127.0.0.1:{DEFAULT_PORT if args.port is None else args.port}"
    try:
        agent = make_agent(cfg)
        hub = make_hub(
            agent,
            cfg,
            bind=bind,
            record=args.record,
            run_name=args.run_name,
            config=TelemetryConfig(level=TelemetryLevel.parse(args.level)),
        )
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _leave_ranks()
        return 2

    out = sys.stdout if rank == 0 else None
    records: list[Any] = []
    stopped: str | None = "interrupted"
    try:
        if out is not None:
            _announce(hub, bind, args, out)
        for record in iter_train(cfg, hub=hub, agent=agent, injections=args.inject):
            records.append(record)
            if not args.quiet:
                print(_line(record, cfg.num_updates), file=out, flush=True)
        stopped = None
    except BaseException as exc:  # KeyboardInterrupt: main() run where signals stay Python's
        if not _interrupted(exc):
            raise
        stopped = "interrupted"
    finally:
        # A second Ctrl-C while closing (bounded: about a second) must not leave the connection
        # file behind or tear the recording: it is noted and ignored until the hub is closed.
        held = _set_stop_handlers(signal.SIG_IGN)
        try:
            hub.close()
            _leave_ranks()
        finally:
            _restore_handlers(held)
    if out is None:
        return 0
    summary = summarize(records) if records else {}
    last = records[-1] if records else None
    done = f"{stopped} after update {last.update if last else 0}" if stopped else "finished"
    if last is not None:
        print(
            f"{done}: {last.update} updates, {last.global_step} steps in {last.seconds:.0f} s; "
            f"mean return (last 10 updates) {_fmt(summary['last'], '.1f')}, best {_fmt(summary['best'], '.1f')}",
            file=out,
            flush=True,
        )
    else:
        print(f"{done}: no update completed", file=out, flush=True)
    lost = _losses(hub)
    if lost:
        print(f"telemetry lost {lost}", file=out, flush=True)
    return 0


def _losses(hub: Any) -> str:
    """What telemetry could not deliver over the run, in words ('' when nothing was lost)."""
    recorder = getattr(hub, "recorder", None)
    publisher = getattr(hub, "publisher", None)
    parts = []
    if recorder is not None and recorder.dropped:
        why = f" ({recorder.error})" if recorder.error else " (the disk was too slow)"
        parts.append(f"{recorder.dropped} record(s) of {recorder.dropped + recorder.written}{why}")
    if publisher is not None and publisher.counters.dropped:
        parts.append(f"{publisher.counters.dropped} snapshot(s) dropped from the full publish queue")
    return "; ".join(parts)


def _join_ranks(device: str) -> tuple[int, str]:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment): join the process group.

    gloo on the CPU, NCCL with ``--device cuda`` (each rank on ``cuda:LOCAL_RANK``). Returns this
    rank and the device it trains on; (0, device) for a single process.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, device
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), device


def _leave_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _announce(hub: Any, bind: str | None, args: argparse.Namespace, out: Any) -> None:
    if bind is None:
        if not args.quiet:
            print("telemetry: no network (--no-network)", file=out, flush=True)
        return
    endpoints = hub.endpoints
    if endpoints is None:
        print(f"telemetry: could not bind {bind}; training continues without a stream", file=out, flush=True)
        return
    host, _, port = endpoints[0].removeprefix("tcp://").rpartition(":")
    path = getattr(hub.publisher, "connection_path", None)
    if host.strip("[]") in ("0.0.0.0", "::", "*"):
        # A wildcard bind is reached by this machine's name, with the connection file copied over
        # (it holds the CURVE keys a remote dashboard needs).
        import socket

        where = f" --connection-file {path.name}" if path is not None else ""
        print(f"simic-tui attach {socket.gethostname()}:{port}{where}", file=out, flush=True)
    else:
        print(f"simic-tui attach {host}:{port}", file=out, flush=True)
    asked = bind.rpartition(":")[2]
    if asked not in ("0", "*", port) and not args.quiet:  # the default port was taken: say so
        print(f"telemetry: port {asked} is in use (another trainer?); streaming on {port}", file=out, flush=True)
    if path is not None and not args.quiet:
        print(f"telemetry: connection file {path}", file=out, flush=True)


def _line(record: Any, planned: int) -> str:
    entropy = " ".join(f"{h} {v:.2f}" for h, v in record.entropy.items())
    text = (
        f"update {record.update:4d}/{planned}  return {_fmt(record.episode_return, '6.1f')}  "
        f"entropy {entropy}  kl {_fmt(record.approx_kl, '.4f')}  grad {_fmt(record.grad_norm, '.2f')}  "
        f"{record.update_seconds:.2f} s"
    )
    if record.injected:
        text += f"  injected: {', '.join(record.injected)}"
    snapshot = record.snapshot
    if snapshot is not None and getattr(snapshot, "anomalies", None):
        text += "  anomalies: " + ", ".join(f"{a.kind}({a.severity})" for a in snapshot.anomalies)
    return text
