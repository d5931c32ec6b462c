"""Where a snapshot goes once built: the publisher thread (stream, history, recording) or, without a
network, straight to the recorder; and the run's closing frame."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from telemetry_core import protocol
from telemetry_core.config import TelemetryLevel
from telemetry_core.record import Recorder
from telemetry_core.schema import RUN_FINISHED, Counters, Snapshot

__all__ = ["SnapshotOutput"]


class SnapshotOutput:
    """Hands snapshots over without the training thread waiting, and fills their counters.

    Args:
        publisher: a started :class:`telemetry_core.transport.Publisher`, or None without a network.
        recorder: a :class:`telemetry_core.record.Recorder`, or None.
        session: the hub's session id (frame envelopes when there is no publisher).
        counters: the hub's counters; each snapshot carries a copy completed with the transport's.
    """

    # How long the closing frame waits for the publisher thread to send it (it polls every few
    # ms), and then lets ZeroMQ's I/O thread write it out before the socket closes with linger 0.
    FINAL_FRAME_WAIT = 0.5
    FINAL_FRAME_SETTLE = 0.05

    def __init__(self, publisher: Any, recorder: Recorder | None, *, session: str, counters: Counters) -> None:
        self.publisher = publisher
        self.recorder = recorder
        self.session = session
        self.counters = counters
        self.last: Snapshot | None = None  # repeated, marked finished, by publish_finished()
        self._seq = 0

    @classmethod
    def open(
        cls,
        bind: str | None,
        record: str | Path | None,
        *,
        session: str,
        counters: Counters,
        run_name: str,
        strict: bool,
        publisher_options: Mapping[str, Any] | None,
        level: TelemetryLevel,
    ) -> SnapshotOutput:
        """Start the publisher (``bind``: its endpoint, None for no network; ``level``: the status
        it shows first) and open the recording (``record``: its path, or None)."""
        publisher = None
        if bind is not None:
            from telemetry_core.transport import Publisher

            publisher = Publisher(
                bind,
                session=session,
                run_name=run_name,
                strict=strict,
                **dict(publisher_options or {}),
            )
            publisher.start()
            publisher.set_status(0, level.name)
        try:
            recorder = Recorder(record, session=session) if record is not None else None
        except BaseException:
            if publisher is not None:  # nobody else holds it yet
                publisher.close()
            raise
        return cls(publisher, recorder, session=session, counters=counters)

    def publish(self, snapshot: Snapshot) -> None:
        self.last = snapshot
        snapshot.counters = self.counters_now()
        if self.publisher is not None:
            # The publisher thread encodes it (and hands the frame to the recorder), so the
            # training thread pays for the hand-off only; nothing here changes the snapshot after.
            self.publisher.hand_off_snapshot(snapshot, self.recorder.put if self.recorder is not None else None)
            return
        self._seq += 1
        frame = protocol.encode_envelope(
            "snapshot", snapshot, session=self.session, seq=self._seq, step=snapshot.step
        )
        self.counters.snapshots_published += 1
        if self.recorder is not None:
            self.recorder.put(frame)

    def counters_now(self) -> Counters:
        c = msgspec.structs.replace(self.counters)
        if self.publisher is not None:
            self.publisher.fill_counters(c)
        if self.recorder is not None:
            c.records_written = self.recorder.written
            c.records_dropped = self.recorder.dropped
        return c

    def finished_frame(self) -> Snapshot | None:
        """The run's last frame: the last update's statistics again, marked ``run_state="finished"``
        (None when nothing was published, or the run is already marked finished).

        It travels the same way as every snapshot (stream, history, recording), so a dashboard or a
        replay can tell a run that ended from a trainer that vanished. No anomalies or incident
        events: they belong to the update, which was already published.
        """
        last = self.last
        if last is None or last.run_state == RUN_FINISHED:
            return None
        return msgspec.structs.replace(
            last,
            run_state=RUN_FINISHED,
            wall_time=time.time(),
            anomalies=[],
            incident_events=[],
            debug=None,
            profile_trace=None,
        )

    def drain(self) -> None:
        """Give the publisher thread a moment to send what is queued (the closing frame)."""
        pub = self.publisher
        if pub is not None and pub.network:
            deadline = time.monotonic() + self.FINAL_FRAME_WAIT
            while pub.queued and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(self.FINAL_FRAME_SETTLE)

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        if self.recorder is not None:
            self.recorder.close()
