"""The live keys (d, n, m, P, p) over real loopback sockets, through Pilot on the real app.

The trainer side is real: telemetry_core's Publisher answered at update boundaries by a loop thread,
and (where telemetry_core.hub is present) a real TelemetryHub driven by a real PyTorch training loop.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from simic_tui.app import SimicApp
from simic_tui.client import LeasePhase, LinkState, TelemetryClient
from simic_tui.keys import DASHBOARD_BINDINGS
from simic_tui.screens.debug import DebugScreen, KeepLeaseScreen
from simic_tui.store import TelemetryStore
from simic_tui.target import resolve_target
from simic_tui.widgets.base import Panel
from telemetry_core.schema import Ack, Nack
from telemetry_core.transport import Publisher

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from build_recording import Run

pytestmark = pytest.mark.timeout(120)
SIZE = (120, 40)


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(d))


def text(widget: Panel) -> str:
    return str(widget.content)


async def until(pilot, cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def notes(app: SimicApp) -> list[str]:
    return [n.message for n in app._notifications]


# ---------------------------------------------------------------------------------------------
# Live: commands and the paused display against a real trainer side
# ---------------------------------------------------------------------------------------------


class Trainer:
    """The trainer side of a live test: a real Publisher fed by a thread that plays the training
    loop's part at update boundaries (publish, poll commands, acknowledge with the next step)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.pub = Publisher(
            "tcp://127.0.0.1:0", run_name="cartpole-lstm-demo", heartbeat_interval=0.2
        ).start()
        self.run = Run()
        self.debug_frames = self.run.find(lambda s: s.debug is not None and bool(s.debug.layers))
        self.normal_frame = self.run.find(lambda s: s.level.level == "NORMAL" and not s.anomalies)[-1]
        self.step = 0
        self.commands: list = []
        self.lease_until: int | None = None
        self.level = "NORMAL"
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Trainer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pub.close()

    def _loop(self) -> None:
        while not self.stop.is_set():
            debug = self.debug_frames[self.step % len(self.debug_frames)]
            snap = self.run.snapshot(debug if self.level == "DEBUG" else self.normal_frame, self.step + 1)
            snap.step = self.step
            snap.level.level = self.level
            if self.level == "DEBUG" and self.lease_until is not None and self.step > self.lease_until:
                self.level, self.lease_until = "NORMAL", None  # the lease ran out, as in the hub
            snap.level.lease_until = self.lease_until if self.level == "DEBUG" else None
            self.pub.publish_snapshot(snap)
            nxt = self.step + 1
            for peer, cmd in self.pub.poll_commands():
                self.commands.append(cmd)
                if cmd.action in ("lease_debug", "renew"):
                    self.level = "DEBUG"
                    self.lease_until = nxt + (cmd.updates or 50)
                    self.pub.reply(
                        peer,
                        Ack(
                            command_id=cmd.id,
                            action=cmd.action,
                            effective_step=nxt,
                            level="DEBUG",
                            lease_until=nxt + (cmd.updates or 50),
                        ),
                    )
                elif cmd.action == "release":
                    self.level = "NORMAL"
                    self.pub.reply(peer, Ack(command_id=cmd.id, action=cmd.action, effective_step=nxt))
                elif cmd.action == "set_level":
                    self.level = cmd.level
                    self.pub.reply(
                        peer, Ack(command_id=cmd.id, action=cmd.action, effective_step=nxt, level=cmd.level)
                    )
                elif cmd.action == "profile":
                    self.pub.reply(peer, Ack(command_id=cmd.id, action=cmd.action, effective_step=nxt))
                else:
                    self.pub.reply(
                        peer, Nack(command_id=cmd.id, reason="not handled here", code="unknown_action")
                    )
            self.step = nxt
            time.sleep(self.interval)

    def app(self) -> SimicApp:
        assert self.pub.endpoints is not None
        store = TelemetryStore()
        target = resolve_target(self.pub.endpoints.pub.replace("tcp://", ""))
        return SimicApp(store, client=TelemetryClient(target, store, lease_seconds=3.0))


async def test_d_n_m_and_P_send_signed_commands_and_show_the_acknowledgements() -> None:
    with Trainer() as trainer:
        app = trainer.app()
        async with app.run_test(size=SIZE) as pilot:
            client = app.client
            assert client is not None
            await until(
                pilot, lambda: app.store.count > 2 and client.commands_unavailable() == "", what="live"
            )
            await pilot.press("d")
            assert isinstance(app.screen, DebugScreen)
            await until(pilot, lambda: client.lease.phase == LeasePhase.ACTIVE, what="lease acknowledged")
            await until(
                pilot, lambda: any("DEBUG lease acknowledged at step" in m for m in notes(app)), what="toast"
            )
            await until(pilot, lambda: app.store.latest.level.level == "DEBUG", what="trainer at DEBUG")
            await until(  # the countdown
                pilot,
                lambda: "updates left (x releases)" in str(app.screen.query_one("#debug-title").content),
                what="the lease's countdown",
            )
            await pilot.press("escape")  # a lease is held: asked whether to keep it
            assert isinstance(app.screen, KeepLeaseScreen)
            await pilot.press("k")
            await until(pilot, lambda: app.screen is app.dashboard, what="back on the dashboard")
            assert client.lease.phase == LeasePhase.ACTIVE
            header = str(app.dashboard.query_one("#header").content)
            assert "DEBUG lease:" in header and "updates left" in header
            await pilot.press("n")
            await until(
                pilot,
                lambda: any(c.action == "set_level" and c.level == "NORMAL" for c in trainer.commands),
                what="n",
            )
            assert any(c.action == "release" for c in trainer.commands)
            await until(
                pilot, lambda: any("level NORMAL acknowledged" in m for m in notes(app)), what="n ack"
            )
            await pilot.press("m")
            await until(pilot, lambda: any(c.level == "MINIMAL" for c in trainer.commands), what="m")
            await until(pilot, lambda: app.store.latest.level.level == "MINIMAL", what="trainer at MINIMAL")
            await pilot.press("P")
            await until(pilot, lambda: any(c.action == "profile" for c in trainer.commands), what="P")
            await until(pilot, lambda: "profile acknowledged" in client.profile_note, what="profile ack")
            assert trainer.pub.counters.commands_rejected == 0


async def test_the_debug_lease_is_bounded_released_on_request_and_d_toggles() -> None:
    with Trainer(interval=0.03) as trainer:
        app = trainer.app()
        client = app.client
        assert client is not None
        client.lease_updates = 100
        # renewals every ~0.7 s: several within the bound (100 updates at 0.03 s), and a lease that
        # outlives a renewal delayed by a loaded machine (at 0.6 s one expired between "lease active"
        # and the x that releases it, which then had nothing to release)
        client.lease_seconds = 2.0
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.store.count > 2 and not client.status.commands_note, what="ready")
            await pilot.press("d")
            await until(pilot, lambda: client.lease.phase == LeasePhase.ACTIVE, what="lease")
            start = client.lease.effective_step
            assert start is not None
            # Renewed while attached, never past the bound: the trainer leaves DEBUG by itself.
            await until(pilot, lambda: client.lease.phase == LeasePhase.EXPIRED, what="lease ends", timeout=60)
            renews = [c for c in trainer.commands if c.action == "renew"]
            assert renews, "the lease was renewed while attached"
            # Each renewal asks for what is left of the bound as the dashboard sees it (a few updates
            # behind the trainer), so the end is the bound plus that lag, never another full lease.
            assert client.lease.lease_until is not None and client.lease.lease_until < start + 2 * 100
            await until(pilot, lambda: app.store.latest.level.level != "DEBUG", what="trainer left DEBUG")
            # d takes a lease again; Esc asks; x releases it.
            await pilot.press("d")
            await until(pilot, lambda: client.lease.phase == LeasePhase.ACTIVE, what="second lease")
            await pilot.press("escape")
            assert isinstance(app.screen, KeepLeaseScreen)
            # the question must be on screen (mounted, bindings live) before it is answered: pushed is
            # not yet shown, and a key sent in between reaches no binding
            await until(pilot, lambda: app.screen.is_mounted, what="the question shown")
            await pilot.pause()
            await pilot.press("x")
            await until(pilot, lambda: any(c.action == "release" for c in trainer.commands), what="release")
            assert client.lease.phase == LeasePhase.RELEASED and app.screen is app.dashboard
            # On the dashboard d takes one, and d again releases it.
            await pilot.press("d")
            await until(pilot, lambda: client.lease.phase == LeasePhase.ACTIVE, what="third lease")
            released = sum(c.action == "release" for c in trainer.commands)
            await pilot.press("d")
            await until(
                pilot, lambda: sum(c.action == "release" for c in trainer.commands) > released, what="d releases"
            )


async def test_p_freezes_the_display_while_ingest_continues() -> None:
    with Trainer(interval=0.03) as trainer:
        app = trainer.app()
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.store.count > 3, what="frames")
            policy = app.dashboard.query_one("#policy", Panel)
            await pilot.press("p")
            assert app.display_paused
            frozen, count = text(policy), app.store.count
            step = app._paused_step
            assert step is not None
            drawn = policy._drawn_key
            await until(pilot, lambda: app.store.count > count + 10, what="ingest while paused")
            await pilot.pause(0.2)  # a tick or two of the redraw timer
            assert policy._drawn_key == drawn and text(policy) == frozen
            # the header's step is the frozen panels' step too, and it counts what arrived since
            header = str(app.dashboard.query_one("#header").content)
            assert f"paused at step {step} · " in header, header
            new = int(header.split(f"paused at step {step} · ")[1].split(" new")[0])
            assert new >= 10 and f"step {step}" in header.split("\n")[0]
            assert app.store.latest is not None and app.store.latest.step > step
            await pilot.press("p")
            await until(pilot, lambda: policy._drawn_key != drawn, what="a redraw after resuming")
            assert app.client.status.state == LinkState.LIVE


async def test_without_a_connection_file_the_trainer_refuses_the_dashboard_and_it_says_why() -> None:
    """The file holds the CURVE keys: without it not even watching is possible (nothing leaks)."""
    with Trainer() as trainer:
        assert trainer.pub.endpoints is not None
        path = trainer.pub.connection_path
        assert path is not None
        path.unlink()  # as if the file was never copied to this machine
        store = TelemetryStore()
        target = resolve_target(trainer.pub.endpoints.pub.replace("tcp://", ""))
        app = SimicApp(store, client=TelemetryClient(target, store))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "--connection-file" in app.client.status.banner, what="the banner")
            assert trainer.pub.counters.handshake_failures >= 1
            assert store.count == 0 and store.counters.snapshots == 0
            await pilot.press("n")
            await pilot.pause()
            assert any("commands disabled" in m and "--connection-file" in m for m in notes(app))
            assert not any(c.action == "set_level" for c in trainer.commands)
            await pilot.press("question_mark")  # live help lists the trainer commands too
            await pilot.pause()
            # descriptions wrap in their own column
            shown = " ".join(" ".join(str(s.content) for s in app.screen.query(".help-section")).split())
            for binding in DASHBOARD_BINDINGS:
                assert binding.tooltip in shown, binding.id


# ---------------------------------------------------------------------------------------------
# d against a real TelemetryHub, driven by a real PyTorch training loop
# ---------------------------------------------------------------------------------------------


class HubLoop:
    """A small recurrent PPO update loop (real forward, backward, clipping, Adam) under a real hub."""

    def __init__(self) -> None:
        import torch
        from torch import nn

        from telemetry_core.hub import TelemetryHub

        torch.manual_seed(0)
        self.torch = torch

        class Agent(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = nn.Linear(4, 16)
                self.lstm = nn.LSTM(16, 16, batch_first=True)
                self.direction = nn.Linear(16, 2)
                self.force = nn.Linear(16, 3)
                self.critic = nn.Linear(16, 1)

            def forward(self, obs: torch.Tensor):  # (B, T, 4)
                out, state = self.lstm(torch.tanh(self.encoder(obs)))
                return self.direction(out), self.force(out), self.critic(out).squeeze(-1), state

        self.agent = Agent()
        self.opt = torch.optim.Adam(self.agent.parameters(), lr=3e-4)
        self.hub = TelemetryHub(
            self.agent,
            heads={"direction": 2, "force": 3},
            max_grad_norm=0.5,
            total_updates=10_000,
            bind="tcp://127.0.0.1:0",
            run_name="hub-under-test",
            lstm=self.agent.lstm,
        )
        self.obs = torch.randn(8, 16, 4)
        self.actions = (torch.randint(0, 2, (8, 16)), torch.randint(0, 3, (8, 16)))
        self.step = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HubLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.hub.close()
        if self.error is not None:
            raise self.error

    def _logp(self, logits: object, actions: object) -> tuple:
        torch = self.torch
        dist = torch.distributions.Categorical(logits=logits)
        return dist.log_prob(actions).flatten(), dist.entropy().flatten()

    def _run(self) -> None:
        torch, hub, agent = self.torch, self.hub, self.agent
        try:
            while not self.stop.is_set():
                with torch.no_grad():
                    d0, f0, values, _ = agent(self.obs)
                    old_d, _ = self._logp(d0, self.actions[0])
                    old_f, _ = self._logp(f0, self.actions[1])
                values = values.flatten()
                adv = torch.randn_like(values)
                returns = values + adv
                hub.observe_rollout(advantages=adv, returns=returns, values=values)
                for epoch in range(2):
                    d, f, v, state = agent(self.obs)
                    new_d, ent_d = self._logp(d, self.actions[0])
                    new_f, ent_f = self._logp(f, self.actions[1])
                    new, old = new_d + new_f, old_d + old_f
                    ratio = (new - old).exp()
                    norm_adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    pl = -torch.min(ratio * norm_adv, ratio.clamp(0.8, 1.2) * norm_adv).mean()
                    vl = 0.5 * (v.flatten() - returns).pow(2).mean()
                    loss = pl + 0.5 * vl - 0.01 * (ent_d + ent_f).mean()
                    hub.observe_loss_terms(policy_loss=pl, value_loss=vl)
                    self.opt.zero_grad()
                    loss.backward()
                    hub.observe_gradients(loss)
                    torch.nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                    self.opt.step()
                    hub.observe_minibatch(
                        new_logprob=new.detach(),
                        old_logprob=old,
                        advantages=norm_adv,
                        clip_range=0.2,
                        epoch=epoch,
                        head_new_logprobs={"direction": new_d.detach(), "force": new_f.detach()},
                        head_old_logprobs={"direction": old_d, "force": old_f},
                        head_entropies={"direction": ent_d.detach(), "force": ent_f.detach()},
                        policy_loss=pl.detach(),
                        value_loss=vl.detach(),
                    )
                h, c = state
                hub.end_update(self.step, lstm_state=(h.detach(), c.detach()))
                self.step += 1
                time.sleep(0.05)
        except BaseException as exc:  # surfaced by __exit__
            self.error = exc


async def test_d_reaches_a_real_hub_whose_level_changes_and_the_acknowledgement_appears() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("telemetry_core.hub")
    with HubLoop() as loop:
        assert loop.hub.endpoints is not None
        store = TelemetryStore()
        target = resolve_target(loop.hub.endpoints[0].replace("tcp://", ""))
        assert target.can_command, target.note
        app = SimicApp(store, client=TelemetryClient(target, store))
        async with app.run_test(size=SIZE) as pilot:
            client = app.client
            assert client is not None
            await until(
                pilot,
                lambda: store.count >= 2 and client.commands_unavailable() == "",
                timeout=30,
                what="live",
            )
            assert loop.hub.level.name != "DEBUG"
            await pilot.press("d")
            assert client.lease.phase in (LeasePhase.PENDING, LeasePhase.ACTIVE)
            await until(pilot, lambda: client.lease.phase == LeasePhase.ACTIVE, timeout=30, what="ack")
            effective = client.lease.effective_step
            assert effective is not None
            await until(
                pilot,
                lambda: any(f"DEBUG lease acknowledged at step {effective}" in m for m in notes(app)),
                what="the acknowledgement's notification",
            )
            await until(pilot, lambda: loop.hub.level.name == "DEBUG", timeout=30, what="hub at DEBUG")
            await until(
                pilot,
                lambda: (
                    store.latest is not None
                    and store.latest.step >= effective
                    and store.latest_debug is not None
                ),
                timeout=30,
                what="a DEBUG snapshot",
            )
            assert store.latest.level.level == "DEBUG"
            assert "operator lease" in store.latest.level.reason
            assert store.latest_debug[0] >= effective and store.latest_debug[1].layers
            await until(
                pilot,
                lambda: "updates left (x releases)" in str(app.screen.query_one("#debug-title").content),
                timeout=30,
                what="the lease's countdown in the DEBUG screen's title",
            )
            await pilot.press("escape", "k", "n")  # keep the lease, then NORMAL releases it
            await until(pilot, lambda: loop.hub.level.name == "NORMAL", timeout=30, what="hub back at NORMAL")


async def test_an_unresolvable_host_name_is_said_as_such() -> None:
    store = TelemetryStore()
    app = SimicApp(store, client=TelemetryClient(resolve_target("nosuchhost.invalid:5555"), store))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "cannot resolve" in app.client.status.unreachable, timeout=30, what="why")
        assert "'nosuchhost.invalid'" in app.client.status.unreachable
        assert app.client.status.state == LinkState.CONNECTING


async def test_an_unreachable_trainer_shows_connecting_and_keeps_retrying() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    store = TelemetryStore()
    app = SimicApp(store, client=TelemetryClient(resolve_target(f"127.0.0.1:{port}"), store))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.client.status.connect_retries >= 2, what="retries")
        # The header names the address and why, and retries quietly (no attempt counter).
        await until(pilot, lambda: "nothing is listening" in app.client.status.unreachable, timeout=30, what="why")
        await pilot.pause(0.3)
        header = str(app.dashboard.query_one("#header").content)
        assert f"waiting for a trainer at 127.0.0.1:{port}" in header
        assert "retrying quietly" in header and "attempt" not in header
        banner = str(app.dashboard.query_one("#banner").content)
        assert f"nothing is listening on 127.0.0.1:{port}; no connection file for that port in" in banner
        assert "waiting for the first snapshot" in text(app.dashboard.query_one("#policy", Panel))


def header_text(app: SimicApp) -> str:
    return str(app.dashboard.query_one("#header").content)


async def test_a_run_that_ends_shows_finished_and_stays_quiet() -> None:
    """hub.close() publishes the closing frame: the header says finished, not disconnected."""
    pytest.importorskip("torch")
    pytest.importorskip("telemetry_core.hub")
    with HubLoop() as loop:
        assert loop.hub.endpoints is not None
        store = TelemetryStore()
        target = resolve_target(loop.hub.endpoints[0].replace("tcp://", ""))
        app = SimicApp(store, client=TelemetryClient(target, store))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: store.count >= 2, what="live")
            loop.stop.set()
            loop.thread.join(30)
            last = loop.step - 1
            loop.hub.close()
            await until(pilot, lambda: app.client.status.state == LinkState.FINISHED, what="finished")
            await until(pilot, lambda: f"■ finished at {last}/10000" in header_text(app), what="header")
            count = store.count
            # The publisher is gone: the link drops, and the header still says finished, quietly.
            await pilot.pause(3.5)
            assert app.client.status.state == LinkState.FINISHED and store.count == count
            header = header_text(app)
            assert "■ finished at" in header and "lost" not in header and "retrying" not in header
            assert any("the trainer finished at step" in m for m in notes(app))


async def test_a_trainer_that_vanishes_without_its_closing_frame_is_lost() -> None:
    trainer = Trainer(interval=0.03)
    with trainer:
        app = trainer.app()
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.store.count > 3, what="frames")
            trainer.stop.set()
            trainer.thread.join(5)
            trainer.pub.close()  # a Publisher alone: no closing frame, as when a trainer is killed
            await until(pilot, lambda: "✖ trainer lost after step" in header_text(app), what="lost")
            assert "reconnecting quietly" in header_text(app) and "finished" not in header_text(app)


async def test_before_the_first_update_the_header_says_it_waits_for_it() -> None:
    pub = Publisher("tcp://127.0.0.1:0", heartbeat_interval=0.1).start()
    try:
        assert pub.endpoints is not None
        store = TelemetryStore()
        target = resolve_target(pub.endpoints.pub.replace("tcp://", ""))
        app = SimicApp(store, client=TelemetryClient(target, store))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: store.counters.heartbeats > 0, what="a heartbeat")
            await until(pilot, lambda: "waiting for the trainer's first update" in header_text(app), what="waiting")
            assert "no snapshot yet" not in header_text(app)
    finally:
        pub.close()
