"""TelemetryHub end to end: real PyTorch updates of a recurrent multi-head actor-critic, real
ZeroMQ sockets on loopback, real recordings.

Covers exactly one host materialisation per update, the stream and its commands, and the hub rows
of the fault table (commands applied at boundaries and acknowledged with their step, DEBUG lease
by updates and by renewal deadline, auto-escalation per anomaly kind, telemetry errors never
raised into training, port in use, fork, exit with messages queued, recording).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
import zmq
from torch import nn
from torch.overrides import TorchFunctionMode

from telemetry_core import protocol
from telemetry_core.config import TelemetryConfig, TelemetryLevel
from telemetry_core.hub import TelemetryHub
from telemetry_core.record import read_recording
from telemetry_core.schema import Ack, History, Nack, Snapshot

pytestmark = pytest.mark.timeout(120)

HEADS = {"direction": 2, "force": 3}
OBS, HID, ENVS, T = 4, 16, 8, 6


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny loop's ops are microseconds: two intra-op threads on a loaded 2-core machine only
    contend (an update measured 7 s instead of 0.3 s), which let DEBUG leases expire mid-test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SIMIC_RUNTIME_DIR", str(d))


class Agent(nn.Module):
    """Encoder -> LSTM -> one categorical head per action dimension + critic."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(OBS, HID), nn.Tanh())
        self.lstm = nn.LSTM(HID, HID)
        self.heads = nn.ModuleDict({k: nn.Linear(HID, n) for k, n in HEADS.items()})
        self.critic = nn.Linear(HID, 1)

    def forward(self, obs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> Any:
        x = self.encoder(obs)  # (T, B, H)
        out, new_state = self.lstm(x, state)
        logits = {k: head(out) for k, head in self.heads.items()}
        return logits, self.critic(out).squeeze(-1), x, new_state


class Loop:
    """A real (tiny) recurrent PPO update on random rollouts, with every hub call in place."""

    def __init__(
        self,
        hub_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        lr: float = 3e-3,
        device: str = "cpu",
    ) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.agent = Agent().to(self.device)
        self.opt = torch.optim.SGD(self.agent.parameters(), lr=lr)
        kwargs: dict[str, Any] = {"bind": None, "strict": True, "total_updates": 100}
        kwargs.update(hub_kwargs or {})
        self.hub = TelemetryHub(
            self.agent, heads=HEADS, max_grad_norm=0.5, lstm=self.agent.lstm, run_name="test", **kwargs
        )
        self.step = 0
        self.nan_grad = False
        self.ent_coef = 0.01

    def update(self, epochs: int = 2, minibatches: int = 3) -> Snapshot | None:
        hub, agent = self.hub, self.agent
        self.step += 1
        dev = self.device
        obs = torch.randn(T, ENVS, OBS, device=dev)
        state0 = (torch.zeros(1, ENVS, HID, device=dev), torch.zeros(1, ENVS, HID, device=dev))
        with torch.no_grad():
            logits, values, _, final_state = agent(obs, state0)
            actions = {
                k: torch.distributions.Categorical(logits=v, validate_args=False).sample()
                for k, v in logits.items()
            }
            old_head = {
                k: torch.distributions.Categorical(logits=logits[k], validate_args=False).log_prob(actions[k])
                for k in HEADS
            }
        rewards = torch.randn(T, ENVS, device=dev)
        returns = rewards.flip(0).cumsum(0).flip(0)
        advantages = returns - values
        hub.observe_rollout(
            raw_advantages=advantages.reshape(-1),
            returns=returns.reshape(-1),
            values=values.reshape(-1),
            episode_returns=[10.0, 12.0, 9.5],
            episode_lengths=[20, 25, 18],
        )
        env_ids = torch.arange(ENVS, device=dev)
        for epoch in range(epochs):
            for chunk in env_ids.chunk(minibatches):
                logits, new_values, _, _ = agent(obs[:, chunk], (state0[0][:, chunk], state0[1][:, chunk]))
                dists = {
                    k: torch.distributions.Categorical(logits=logits[k], validate_args=False) for k in HEADS
                }
                new_head = {k: dists[k].log_prob(actions[k][:, chunk]).reshape(-1) for k in HEADS}
                old_h = {k: old_head[k][:, chunk].reshape(-1) for k in HEADS}
                ent = {k: dists[k].entropy().reshape(-1) for k in HEADS}
                new_lp = sum(new_head.values())
                old_lp = sum(old_h.values())
                adv = advantages[:, chunk].reshape(-1)
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = (new_lp - old_lp).exp()
                pg = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
                vl = 0.5 * (new_values - returns[:, chunk]).pow(2).mean()
                loss = pg + 0.5 * vl - self.ent_coef * sum(e.mean() for e in ent.values())
                hub.observe_loss_terms(policy_loss=pg, value_loss=vl)
                self.opt.zero_grad()
                loss.backward()
                if self.nan_grad:  # a NaN gradient; the step is skipped, as AMP's GradScaler does
                    agent.critic.weight.grad[0, 0] = math.nan
                hub.observe_gradients(loss.detach())
                nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                if not self.nan_grad:
                    self.opt.step()
                hub.observe_minibatch(
                    new_logprob=new_lp.detach(),
                    old_logprob=old_lp,
                    advantages=adv,
                    clip_range=0.2,
                    epoch=epoch,
                    head_new_logprobs={k: v.detach() for k, v in new_head.items()},
                    head_old_logprobs=old_h,
                    head_entropies={k: v.detach() for k, v in ent.items()},
                    actions=torch.stack([actions[k][:, chunk].reshape(-1) for k in HEADS], 1),
                    policy_loss=pg.detach(),
                    value_loss=vl.detach(),
                    entropy_coef=self.ent_coef,
                )
        return hub.end_update(
            self.step,
            lstm_state=final_state,
            lstm_inputs=agent.encoder(obs).detach(),
            lstm_input_state=state0,
        )

    def close(self) -> None:
        self.hub.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


# ---------------------------------------------------------------------------------------------
# One materialisation per update
# ---------------------------------------------------------------------------------------------

MATERIALISING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__len__"}


class SyncCounter(TorchFunctionMode):
    """Counts every tensor method that moves data to the host (or branches on a tensor's value)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in MATERIALISING and name != "__len__":
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _counting_update(loop: Loop) -> tuple[Counter[str], Snapshot | None]:
    """Run one update, counting materialisations inside the hub's calls only."""
    counter = SyncCounter()
    hub = loop.hub
    originals = {}
    for name in (
        "observe_rollout",
        "observe_loss_terms",
        "observe_gradients",
        "observe_minibatch",
        "end_update",
    ):
        fn = getattr(hub, name)
        originals[name] = fn

        def wrapped(*a: Any, __fn: Any = fn, **k: Any) -> Any:
            with counter:
                return __fn(*a, **k)

        setattr(hub, name, wrapped)
    try:
        snap = loop.update()
    finally:
        for name, fn in originals.items():
            setattr(hub, name, fn)
    return counter.calls, snap


@pytest.mark.parametrize("level", ["MINIMAL", "NORMAL", "DEBUG"])
def test_a_whole_update_materialises_exactly_once(level: str) -> None:
    lp = Loop({"config": TelemetryConfig(level=TelemetryLevel[level], auto_escalate=False)})
    try:
        lp.update()  # warm-up update (first-call paths)
        calls, snap = _counting_update(lp)
    finally:
        lp.close()
    assert snap is not None and snap.level.level == level
    # 2 epochs x 3 minibatches observed, one transfer at the end: the only host materialisation.
    assert calls == Counter({"tolist": 1}), calls


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("level", ["MINIMAL", "NORMAL", "DEBUG"])
def test_a_whole_cuda_update_syncs_only_in_its_one_transfer(
    level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every hub call of a CUDA update runs under torch.cuda.set_sync_debug_mode("error"), except
    the update's one transfer, which is counted."""
    import telemetry_core.hub.collect as collect_module  # where the update's transfer is called

    transfers = []
    real_transfer = collect_module.transfer

    def counted_transfer(pending: Any) -> Any:
        transfers.append(sorted({t.device.type for t in pending.values()}))
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_transfer(pending)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(collect_module, "transfer", counted_transfer)
    lp = Loop({"config": TelemetryConfig(level=TelemetryLevel[level], auto_escalate=False)}, device="cuda")
    try:
        lp.update()  # warm-up update (first-call paths, plans, cached index tensors)
        transfers.clear()
        hub = lp.hub
        for name in (
            "observe_rollout",
            "observe_loss_terms",
            "observe_gradients",
            "observe_minibatch",
            "end_update",
        ):
            fn = getattr(hub, name)

            def strict(*a: Any, __fn: Any = fn, **k: Any) -> Any:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return __fn(*a, **k)
                finally:
                    torch.cuda.set_sync_debug_mode(0)

            setattr(hub, name, strict)
        snap = lp.update()
    finally:
        lp.close()
    assert snap is not None and snap.level.level == level and snap.gradients is not None
    assert transfers == [["cuda"]]


def test_off_computes_and_publishes_nothing() -> None:
    lp = Loop({"config": TelemetryConfig(level=TelemetryLevel.OFF, auto_escalate=False)})
    try:
        calls, snap = _counting_update(lp)
    finally:
        lp.close()
    assert snap is None and sum(calls.values()) == 0


# ---------------------------------------------------------------------------------------------
# Snapshot contents per level
# ---------------------------------------------------------------------------------------------


def test_normal_snapshot_holds_every_section_with_sane_values(loop: Loop) -> None:
    snap = loop.update()
    assert snap is not None
    assert snap.step == 1 and snap.level.level == "NORMAL" and snap.phase == "warmup"
    g, p, v, a, lstm, ep = snap.gradients, snap.policy, snap.value, snap.advantage, snap.lstm, snap.episodes
    assert g is not None and g.calls == 6 and g.total_norm > 0 and 0 <= g.clip_rate <= 1
    assert len(g.param_norms) == len(snap.run.param_names) == len(list(loop.agent.parameters()))
    assert set(g.group_norms) == {"encoder", "lstm", "heads", "critic"}
    assert p is not None and p.minibatches == 6 and p.epochs == 2 and set(p.entropy) == set(HEADS)
    assert p.kl_k3_mean >= 0 and p.ratio_min <= 1 <= p.ratio_max
    assert all(0 < e <= 1.0001 for e in p.entropy_normalized.values())
    assert v is not None and v.explained_variance is not None and math.isfinite(v.value_loss)
    assert a is not None and a.raw.count == T * ENVS and a.normalized.count == 2 * T * ENVS
    assert lstm is not None and lstm.h_norm > 0 and set(lstm.gate_saturation) == {"input", "forget", "output"}
    assert ep is not None and ep.count == 3 and ep.return_mean == pytest.approx((10 + 12 + 9.5) / 3)
    assert snap.debug is None
    assert snap.run.heads == HEADS and snap.run.max_grad_norm == 0.5
    assert snap.thresholds == loop.hub.thresholds
    # The snapshot is exactly what a dashboard decodes.
    frame = protocol.encode_envelope("snapshot", snap, session="s", seq=1, step=1)
    decoded = protocol.decode_body(protocol.decode_envelope(frame))
    assert msgspec.msgpack.encode(decoded) == msgspec.msgpack.encode(snap)


def test_entropy_per_epoch_and_a_wrong_sign_coefficient_reach_the_snapshot_and_the_detector() -> None:
    """Each epoch's normalised entropy (equal epochs: their mean is the update's), the coefficient
    the loop reported, and a negative one judged critical for the run on the same update."""
    lp = Loop()
    try:
        snap = lp.update(epochs=3)
        assert snap is not None and snap.policy is not None
        assert snap.policy.entropy_coef == 0.01
        assert not [a for a in snap.anomalies if a.kind == "entropy_collapse"]
        for head, per_epoch in snap.policy.entropy_normalized_per_epoch.items():
            assert len(per_epoch) == 3
            assert sum(per_epoch) / 3 == pytest.approx(snap.policy.entropy_normalized[head], rel=1e-9)
        assert set(snap.policy.entropy_normalized_per_epoch) == {h for h, n in HEADS.items() if n > 1}
        lp.ent_coef = -0.5
        snap = lp.update()
        assert snap is not None and snap.policy is not None and snap.policy.entropy_coef == -0.5
        (a,) = [a for a in snap.anomalies if a.kind == "entropy_collapse" and a.head is None]
        assert a.severity == "critical" and a.value == -0.5 and "rewards determinism" in a.message
    finally:
        lp.close()


def test_minimal_leaves_out_the_distributions_and_debug_has_its_report() -> None:
    lp = Loop({"config": TelemetryConfig(level=TelemetryLevel.MINIMAL, auto_escalate=False)})
    try:
        lp.hub.config.level = TelemetryLevel.DEBUG  # takes effect at the next boundary
        snap = lp.update()
        assert snap is not None and snap.level.level == "MINIMAL"
        assert snap.gradients is not None and snap.policy is not None
        assert snap.advantage is None and snap.lstm is None and snap.debug is None
        assert snap.gradients.param_norms == [] and snap.gradients.hist_counts == []
        snap = lp.update()
        assert snap is not None and snap.level.level == "DEBUG" and snap.debug is not None
        assert len(snap.debug.layers) == len(list(lp.agent.parameters()))
        assert snap.debug.conflict is not None and snap.debug.conflict.policy_value_cosine is not None
        assert snap.debug.outliers and snap.debug.outliers[0].head == "joint"
    finally:
        lp.close()


def test_network_and_no_network_give_the_same_statistics() -> None:
    a, b = Loop({"bind": None}, seed=3), Loop({"bind": "tcp://127.0.0.1:0"}, seed=3)
    try:
        for _ in range(3):
            torch.manual_seed(100 + a.step)
            sa = a.update()
            torch.manual_seed(100 + b.step)
            sb = b.update()
            assert sa is not None and sb is not None
            assert sa.policy == sb.policy and sa.gradients == sb.gradients and sa.value == sb.value
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------
# Errors never reach training
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_counted_and_logged_once_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    lp = Loop({"strict": False})
    try:
        for _ in range(3):
            lp.hub.observe_minibatch(
                new_logprob=torch.zeros(4), old_logprob=torch.zeros(5), clip_range=0.2, epoch=0
            )
        snap = lp.update()
        assert snap is not None and snap.counters.telemetry_errors == 3
        warnings = [r for r in caplog.records if "telemetry error" in r.getMessage()]
        assert len(warnings) == 1 and "old_logprob" in warnings[0].getMessage()
    finally:
        lp.close()


def test_public_guard_counts_an_integrations_error_and_closed_reports_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lp = Loop({"strict": False})
    try:
        for _ in range(2):
            with lp.hub.guard("my_callback"):
                raise KeyError("train/approx_kl")
        snap = lp.update()
        assert snap is not None and snap.counters.telemetry_errors == 2
        warnings = [r for r in caplog.records if "my_callback" in r.getMessage()]
        assert len(warnings) == 1 and "approx_kl" in warnings[0].getMessage()
        assert not lp.hub.closed
    finally:
        lp.close()
    assert lp.hub.closed
    strict = Loop({"strict": True})
    try:
        with pytest.raises(KeyError), strict.hub.guard("my_callback"):
            raise KeyError("x")
    finally:
        strict.close()


def test_strict_mode_reraises_with_the_argument_named(loop: Loop) -> None:
    with pytest.raises((ValueError, TypeError), match="old_logprob"):
        loop.hub.observe_minibatch(
            new_logprob=torch.zeros(4), old_logprob=torch.zeros(5), clip_range=0.2, epoch=0
        )


def test_constructor_rejects_bad_arguments_clearly() -> None:
    agent = Agent()
    with pytest.raises(ValueError, match="heads"):
        TelemetryHub(agent, heads={}, max_grad_norm=0.5, bind=None)
    with pytest.raises(ValueError, match="max_grad_norm"):
        TelemetryHub(agent, heads=HEADS, max_grad_norm=-1.0, bind=None)
    with pytest.raises(ValueError, match="total_updates"):
        TelemetryHub(agent, heads=HEADS, max_grad_norm=0.5, total_updates=0, bind=None)
    with pytest.raises(ValueError, match=r"nothing|group|prefix|match"):
        TelemetryHub(agent, heads=HEADS, max_grad_norm=0.5, groups={"actor": "nonexistent."}, bind=None)


# ---------------------------------------------------------------------------------------------
# Auto-escalation
# ---------------------------------------------------------------------------------------------


def test_nan_gradients_escalate_to_debug_for_their_duration_then_revert() -> None:
    config = TelemetryConfig(escalation_updates={"numerical_instability": 2})
    lp = Loop({"config": config, "strict": False})
    try:
        lp.update()
        lp.nan_grad = True
        snap = lp.update()
        lp.nan_grad = False
        assert snap is not None
        kinds = {a.kind for a in snap.anomalies}
        assert "numerical_instability" in kinds
        assert snap.gradients is not None and snap.gradients.nan_count > 0
        nxt = lp.update()
        assert nxt is not None and nxt.level.level == "DEBUG"
        assert nxt.level.reason.startswith("anomaly ") and "until step" in nxt.level.reason
        assert nxt.debug is not None
        levels = [lp.update().level.level for _ in range(3)]  # type: ignore[union-attr]
        assert levels[-1] == "NORMAL"
    finally:
        lp.close()


def test_auto_escalation_can_be_switched_off() -> None:
    lp = Loop({"config": TelemetryConfig(auto_escalate=False), "strict": False})
    try:
        lp.nan_grad = True
        lp.update()
        nxt = lp.update()
        assert nxt is not None and nxt.level.level == "NORMAL"
    finally:
        lp.close()


# ---------------------------------------------------------------------------------------------
# Commands over real sockets
# ---------------------------------------------------------------------------------------------


class Dashboard:
    """A minimal real dashboard: SUB + DEALER speaking protocol.py, like simic_tui's client."""

    def __init__(self, hub: TelemetryHub) -> None:
        path = hub.publisher.connection_path
        self.info = protocol.read_connection_file(path)
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        protocol.client_curve(self.sub, self.info)
        self.sub.connect(self.info.pub)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        protocol.client_curve(self.dealer, self.info)
        self.dealer.connect(self.info.cmd)
        self.key = self.info.key_bytes

    def send(self, action: str, **fields: Any) -> str:
        cmd = protocol.new_command(action, session=self.info.session, client="test", **fields)
        env = protocol.encode_envelope("command", cmd, session=self.info.session, seq=0, step=0)
        self.dealer.send_multipart([protocol.sign(self.key, env), env])
        return cmd.id

    def reply(self, timeout: float = 5.0) -> Any:
        if not self.dealer.poll(int(timeout * 1000)):
            raise AssertionError("no reply")
        mac, env = self.dealer.recv_multipart()
        body = protocol.decode_body(protocol.decode_envelope(env))
        if mac == b"":  # the trainer's constant refusal of a badly signed command: unsigned, echoes nothing
            assert (
                isinstance(body, Nack)
                and body.command_id == ""
                and body.code in ("unsigned", "bad_signature")
            )
        else:
            assert protocol.verify(self.key, mac, env)
        return body

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _deliver(lp: Loop) -> None:
    """Give the publisher thread a moment to receive and check queued commands."""
    deadline = time.monotonic() + 5
    while not lp.hub.publisher._inbox and time.monotonic() < deadline:
        time.sleep(0.01)


def test_debug_lease_is_acknowledged_with_its_step_and_ends_after_its_updates() -> None:
    lp = Loop({"bind": "tcp://127.0.0.1:0"})
    dash = Dashboard(lp.hub)
    try:
        lp.update()
        cid = dash.send("lease_debug", updates=2, lease_seconds=60)
        _deliver(lp)
        first = lp.update()  # step 2: the command is applied at its end
        ack = dash.reply()
        assert isinstance(ack, Ack) and ack.command_id == cid
        assert ack.effective_step == 3 and ack.lease_until == 5 and ack.level == "DEBUG"
        assert first is not None and first.level.level == "NORMAL"  # never mid-update
        s3, s4, s5 = lp.update(), lp.update(), lp.update()
        assert (
            s3 is not None and s3.level.level == "DEBUG" and s3.level.reason == "operator lease until step 5"
        )
        assert s3.level.lease_until == 5 and s3.debug is not None
        assert s4 is not None and s4.level.level == "DEBUG"
        assert s5 is not None and s5.level.level == "NORMAL" and s5.debug is None
    finally:
        dash.close()
        lp.close()


LEASE_S = 4.0  # generous: updates of this loop take up to a second on a loaded 2-core machine


def test_lease_that_is_not_renewed_expires_and_renewal_keeps_it() -> None:
    lp = Loop({"bind": "tcp://127.0.0.1:0"})
    dash = Dashboard(lp.hub)
    try:
        dash.send("lease_debug", updates=1000, lease_seconds=LEASE_S)
        _deliver(lp)
        lp.update()
        assert isinstance(dash.reply(), Ack)
        assert lp.update().level.level == "DEBUG"  # type: ignore[union-attr]
        dash.send("renew", updates=1000, lease_seconds=LEASE_S)
        _deliver(lp)
        lp.update()
        assert isinstance(dash.reply(), Ack)
        assert lp.update().level.level == "DEBUG"  # type: ignore[union-attr]
        time.sleep(LEASE_S + 0.2)  # the dashboard "died": no renewal within lease_seconds
        lp.update()  # the boundary notices the missed renewal
        assert lp.update().level.level == "NORMAL"  # type: ignore[union-attr]
        dash.send("renew", updates=10)
        _deliver(lp)
        lp.update()
        nack = dash.reply()
        assert isinstance(nack, Nack) and nack.code == "no_lease"
    finally:
        dash.close()
        lp.close()


def test_set_level_release_profile_and_history() -> None:
    lp = Loop({"bind": "tcp://127.0.0.1:0"})
    dash = Dashboard(lp.hub)
    try:
        lp.update()
        dash.send("set_level", level="minimal")
        _deliver(lp)
        lp.update()
        ack = dash.reply()
        assert isinstance(ack, Ack) and ack.level == "MINIMAL"
        snap = lp.update()
        assert (
            snap is not None and snap.level.level == "MINIMAL" and snap.level.reason == "operator set MINIMAL"
        )
        dash.send("set_level", level="loud")
        _deliver(lp)
        lp.update()
        nack = dash.reply()
        assert isinstance(nack, Nack) and "loud" in nack.reason
        dash.send("release")
        _deliver(lp)
        lp.update()
        assert isinstance(dash.reply(), Ack)
        assert lp.update().level.level == "NORMAL"  # type: ignore[union-attr]
        # profile: torch.profiler for 2 updates; the trace path comes back in a snapshot
        dash.send("profile", profile_updates=2)
        _deliver(lp)
        lp.update()
        assert isinstance(dash.reply(), Ack)
        traces = [s.profile_trace for s in (lp.update(), lp.update(), lp.update()) if s and s.profile_trace]
        assert len(traces) == 1 and Path(traces[0]).stat().st_size > 0
        # history: every published snapshot is available for backfill
        dash.send("history", since_seq=0)
        hist = dash.reply()
        assert isinstance(hist, History) and len(hist.frames) == lp.step
        steps = [protocol.decode_envelope(f).step for f in hist.frames]
        assert steps == list(range(1, lp.step + 1))
    finally:
        dash.close()
        lp.close()


def test_unauthenticated_and_wrong_session_commands_change_nothing() -> None:
    lp = Loop({"bind": "tcp://127.0.0.1:0"})
    dash = Dashboard(lp.hub)
    try:
        lp.update()
        cmd = protocol.new_command("lease_debug", session=dash.info.session, updates=5)
        env = protocol.encode_envelope("command", cmd, session=dash.info.session, seq=0, step=0)
        dash.dealer.send_multipart([protocol.sign(b"wrong key" * 4, env), env])
        assert isinstance(dash.reply(), Nack)
        dash.send("lease_debug", updates=5)  # correct key but ...
        dash.info.session = "someone-else"
        dash.send("lease_debug", updates=5)  # ... wrong session
        time.sleep(0.3)
        lp.update()
        replies = [dash.reply(), dash.reply()]  # the refusal comes at once, the Ack at the boundary
        assert sorted(type(r).__name__ for r in replies) == ["Ack", "Nack"]
        (nack,) = [r for r in replies if isinstance(r, Nack)]
        assert nack.code == "wrong_session"
        snaps = [lp.update() for _ in range(2)]
        assert snaps[-1] is not None and snaps[-1].counters.commands_rejected >= 2
    finally:
        dash.close()
        lp.close()


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


def test_port_in_use_training_continues_without_network_or_strict_raises() -> None:
    first = Loop({"bind": "tcp://127.0.0.1:0"})
    try:
        pub_endpoint = first.hub.endpoints.pub  # type: ignore[union-attr]
        second = Loop({"bind": pub_endpoint, "strict": False})
        try:
            assert second.hub.publisher is not None and not second.hub.publisher.network
            snap = second.update()
            assert snap is not None and snap.gradients is not None
        finally:
            second.close()
        with pytest.raises(Exception, match=r"in use|Address"):
            Loop({"bind": pub_endpoint, "strict": True})
    finally:
        first.close()


def test_close_never_blocks_on_a_subscriber_that_never_reads() -> None:
    lp = Loop({"bind": "tcp://127.0.0.1:0"})
    dash = Dashboard(lp.hub)  # a subscriber that never reads
    try:
        snap = lp.update()
        assert snap is not None
        for i in range(300):
            snap.step = i
            lp.hub.publisher.publish_snapshot(snap)
        connection_file = lp.hub.publisher.connection_path
        assert connection_file is not None and connection_file.exists()
        closer = threading.Thread(target=lp.close, daemon=True)
        closer.start()
        closer.join(60)  # generous: a close that waited on the reader would never return
        assert not closer.is_alive(), "close() blocked behind a subscriber that never reads"
        assert not connection_file.exists()
    finally:
        dash.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_publishes() -> None:
    lp = Loop({"bind": "tcp://127.0.0.1:0"})
    dash = Dashboard(lp.hub)
    try:
        time.sleep(0.3)  # let the subscription reach the publisher
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a DataLoader-worker-like child: no torch math here (its thread pool is the parent's)
            try:
                snap = lp.hub.end_update(99)
                frame = lp.hub.publisher.publish_snapshot(Snapshot(step=99, wall_time=0.0))
                os.write(w, b"none" if snap is None and frame == b"" else b"sent")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(r, 4) == b"none"
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # only heartbeats, never the child's snapshot
            if dash.sub.poll(100):
                topic, env = dash.sub.recv_multipart()
                assert topic == protocol.TOPIC_HEARTBEAT, protocol.decode_envelope(env).step
        assert lp.update() is not None  # the parent still publishes
    finally:
        dash.close()
        lp.close()


def test_recording_holds_every_published_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "run.simrec"
    lp = Loop({"record": path})
    try:
        snaps = [lp.update() for _ in range(4)]
    finally:
        lp.close()
    rec = read_recording(path)
    assert rec.session == lp.hub.session and not rec.problems
    decoded = [protocol.decode_body(protocol.decode_envelope(f)) for f in rec.frames]
    closing = decoded.pop()  # close() records the run's end: the last update again, marked finished
    assert closing.run_state == "finished" and closing.step == 4
    assert [d.step for d in decoded] == [1, 2, 3, 4]
    for got, want in zip(decoded, snaps):
        assert msgspec.msgpack.encode(got) == msgspec.msgpack.encode(want)
    assert decoded[-1].counters.records_written >= 3


def test_state_dict_round_trips_the_host_side_state(loop: Loop) -> None:
    for _ in range(3):
        loop.update()
    state = loop.hub.state_dict()
    other = Loop()
    try:
        other.hub.load_state_dict(state)
        assert other.hub.state_dict() == state
    finally:
        other.close()


# ---------------------------------------------------------------------------------------------
# A loop as it is: numpy numbers, unambiguous names, one head's entropy, epochs counted
# ---------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self, actions: int = 3) -> None:
        super().__init__()
        self.actor = nn.Linear(4, actions)
        self.critic = nn.Linear(4, 1)


def _tiny_hub(**kwargs: Any) -> TelemetryHub:
    torch.manual_seed(0)
    base: dict[str, Any] = {"heads": {"action": 3}, "max_grad_norm": 0.5, "bind": None, "strict": True}
    base.update(kwargs)
    return TelemetryHub(Tiny(), **base)


def _logprobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.1
    return (old + torch.randn(n, generator=g, dtype=torch.float64) * 0.05).float(), old.float()


def test_numpy_numbers_are_taken_wherever_a_number_is() -> None:
    """gymnasium's Discrete.n is np.int64, hyper-parameters read from numpy arrays or configs are
    numpy scalars: all of them are numbers to the hub, and what it publishes holds Python numbers."""
    hub = _tiny_hub(
        heads={"action": np.int64(3)},
        max_grad_norm=np.float32(0.5),
        total_updates=np.int64(10),
        clip_range=np.array(0.25),
    )
    try:
        assert type(hub.heads["action"]) is int and type(hub.total_updates) is int
        assert hub.max_grad_norm == pytest.approx(0.5) and hub.clip_range == 0.25
        n = 64
        hub.observe_rollout(raw_advantages=torch.randn(n), returns=torch.randn(n), values=torch.randn(n))
        new, old = _logprobs(n, 1)
        hub.observe_minibatch(new_logprob=new, old_logprob=old, clip_range=np.float32(0.2), epoch=np.int64(1),
                              entropy=torch.rand(n), policy_loss=np.float32(0.5), value_loss=np.array(1.5))
        hub.early_stop(epoch=np.int32(1), kl=np.float32(0.03))
        snap = hub.end_update(np.int64(5))
    finally:
        hub.close()
    assert snap is not None and type(snap.step) is int and snap.step == 5
    assert snap.policy.clip_range == pytest.approx(float(np.float32(0.2)))
    assert snap.policy.early_stop_epoch == 1 and snap.policy.epochs == 1
    assert snap.policy.policy_loss == pytest.approx(0.5) and snap.value.value_loss == pytest.approx(1.5)
    assert snap.run.planned_updates == 10 and snap.run.heads == {"action": 3}
    frame = protocol.encode_envelope("snapshot", snap, session="s", seq=1, step=snap.step)
    assert protocol.decode_body(protocol.decode_envelope(frame)).step == 5  # no numpy scalar inside


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"heads": {"action": "3"}}, TypeError, "heads['action'] (number of actions) must be a number"),
        ({"heads": {"action": 2.5}}, ValueError, "heads['action'] (number of actions) must be an integer"),
        ({"heads": {"action": np.int64(0)}}, ValueError, ">= 1"),
        ({"heads": {"action": True}}, TypeError, "must be a number, got bool"),
        ({"max_grad_norm": torch.tensor(0.5)}, TypeError, "reading a tensor would sync"),
        ({"max_grad_norm": np.float32("nan")}, ValueError, "max_grad_norm must be a finite number"),
        ({"max_grad_norm": np.float64(0.0)}, ValueError, "max_grad_norm must be a finite number > 0"),
        ({"total_updates": 2.0}, ValueError, "total_updates must be an integer"),
        ({"clip_range": -0.1}, ValueError, "clip_range must be a finite number >= 0"),
    ],
)
def test_non_numbers_are_refused_naming_the_argument(kwargs: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error) as info:
        _tiny_hub(**kwargs)
    assert words in str(info.value)


def test_minibatch_numbers_are_checked_through_the_guard(caplog: pytest.LogCaptureFixture) -> None:
    new, old = _logprobs(8, 2)
    hub = _tiny_hub()
    try:
        with pytest.raises(TypeError, match="epoch must be a number, got str"):
            hub.observe_minibatch(new_logprob=new, old_logprob=old, clip_range=0.2, epoch="1")
        with pytest.raises(TypeError, match="needs clip_range="):
            hub.observe_minibatch(new_logprob=new, old_logprob=old)
        with pytest.raises(TypeError, match="step must be a number"):
            hub.end_update("7")
    finally:
        hub.close()
    lenient = _tiny_hub(strict=False)
    try:
        lenient.observe_minibatch(new_logprob=new, old_logprob=old, clip_range=torch.tensor(0.2))
        assert lenient.counters.telemetry_errors == 1  # counted and logged, never raised into training
        assert "reading a tensor would sync" in caplog.text
    finally:
        lenient.close()


def test_raw_advantages_and_the_older_name_give_the_same_statistics() -> None:
    g = torch.Generator().manual_seed(3)
    raw, ret, val = (torch.randn(50, generator=g) for _ in range(3))
    got = []
    for name in ("raw_advantages", "advantages"):
        hub = _tiny_hub()
        try:
            hub.observe_rollout(**{name: raw}, returns=ret, values=val)
            snap = hub.end_update(1)
        finally:
            hub.close()
        assert snap is not None
        got.append(snap.advantage.raw)
    assert got[0] == got[1]
    ref = raw.double().numpy()
    assert got[0].count == 50 and got[0].mean == pytest.approx(ref.mean(), rel=1e-12)
    assert got[0].std == pytest.approx(ref.std(), rel=1e-12)
    hub = _tiny_hub()
    try:
        with pytest.raises(TypeError, match="not both"):
            hub.observe_rollout(raw_advantages=raw, advantages=raw, returns=ret, values=val)
        with pytest.raises(TypeError, match="needs raw_advantages="):
            hub.observe_rollout(returns=ret, values=val)
    finally:
        hub.close()


def test_entropy_of_a_single_head_policy() -> None:
    new, old = _logprobs(40, 4)
    ent = torch.rand(40) * math.log(3)
    got = []
    for kwargs in ({"entropy": ent}, {"head_entropies": {"action": ent}}):
        hub = _tiny_hub()
        try:
            hub.observe_minibatch(new_logprob=new, old_logprob=old, clip_range=0.2, **kwargs)
            snap = hub.end_update(1)
        finally:
            hub.close()
        assert snap is not None
        got.append((snap.policy.entropy, snap.policy.entropy_normalized))
    assert got[0] == got[1]
    assert got[0][0]["action"] == pytest.approx(ent.double().mean().item(), rel=1e-6)
    hub = _tiny_hub()
    two = _tiny_hub(heads={"a": 2, "b": 3})
    try:
        with pytest.raises(TypeError, match="not both"):
            hub.observe_minibatch(new_logprob=new, old_logprob=old, clip_range=0.2, entropy=ent,
                                  head_entropies={"action": ent})
        with pytest.raises(ValueError, match=r"single-head policy; this hub has heads \['a', 'b'\]"):
            two.observe_minibatch(new_logprob=new, old_logprob=old, clip_range=0.2, entropy=ent)
    finally:
        hub.close()
        two.close()


def _epoch_run(
    rollout: int | None, sizes: list[list[int]], *, explicit: bool = False, marks: str = "", seed: int = 5
) -> tuple[Snapshot, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """One update of minibatches of the given sizes per epoch; epochs given, counted, or marked by
    next_epoch() at each epoch's "start" or "end". Returns the snapshot and (true epoch, new, old)."""
    hub = _tiny_hub(clip_range=0.2)
    seen = []
    try:
        if rollout is not None:
            hub.observe_rollout(raw_advantages=torch.randn(rollout), returns=torch.randn(rollout),
                                values=torch.randn(rollout))
        for epoch, mbs in enumerate(sizes):
            if marks == "start":
                hub.next_epoch()
            for k, n in enumerate(mbs):
                new, old = _logprobs(n, seed + 100 * epoch + k)
                given = {"epoch": epoch} if explicit else {}
                hub.observe_minibatch(new_logprob=new, old_logprob=old, **given)
                seen.append((epoch, new, old))
            if marks == "end":
                hub.next_epoch()
        snap = hub.end_update(1)
    finally:
        hub.close()
    assert snap is not None
    return snap, seen


def _k3_per_epoch(seen: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[float]:
    out: dict[int, list[np.ndarray]] = {}
    for epoch, new, old in seen:
        lr = new.double().numpy() - old.double().numpy()
        out.setdefault(epoch, []).append(np.expm1(lr) - lr)
    return [float(np.concatenate(v).mean()) for _, v in sorted(out.items())]


@pytest.mark.parametrize(
    ("rollout", "sizes"),
    [
        (1024, [[256] * 4] * 3),  # CleanRL: the buffer split evenly
        (1000, [[300, 300, 300, 100]] * 2),  # a short last minibatch (SB3, TorchRL without drop_last)
        (1000, [[300, 300, 300]] * 3),  # the remainder dropped (drop_last)
        (96, [[96]] * 4),  # one minibatch per epoch
    ],
)
def test_epochs_are_counted_against_the_rollout_when_the_loop_does_not_say(
    rollout: int, sizes: list[list[int]]
) -> None:
    counted, seen = _epoch_run(rollout, sizes)
    given, _ = _epoch_run(rollout, sizes, explicit=True)
    assert counted.policy.epochs == given.policy.epochs == len(sizes)
    assert counted.policy.kl_k3_per_epoch == given.policy.kl_k3_per_epoch
    np.testing.assert_allclose(counted.policy.kl_k3_per_epoch, _k3_per_epoch(seen), rtol=1e-9, atol=1e-15)


def test_next_epoch_marks_epochs_wherever_the_loop_calls_it() -> None:
    """Sampling with replacement (more samples per epoch than the buffer holds) cannot be counted by
    size: next_epoch() at the start of each epoch counts it; at the end of each epoch too, from the
    first call on (the run then counts by calls only)."""
    sizes = [[64] * 5] * 3  # 320 samples per epoch from a rollout of 100
    snap, seen = _epoch_run(100, sizes, marks="start")
    assert snap.policy.epochs == 3
    np.testing.assert_allclose(snap.policy.kl_k3_per_epoch, _k3_per_epoch(seen), rtol=1e-9, atol=1e-15)
    hub = _tiny_hub(clip_range=0.2)
    try:
        for step, per_epoch in ((1, [50, 50]), (2, [64] * 5)):  # one pass, then with replacement
            hub.observe_rollout(raw_advantages=torch.randn(100), returns=torch.randn(100),
                                values=torch.randn(100))
            seen = []
            for epoch in range(3):
                for k, n in enumerate(per_epoch):
                    new, old = _logprobs(n, 10 * epoch + k)
                    hub.observe_minibatch(new_logprob=new, old_logprob=old)
                    seen.append((epoch, new, old))
                hub.next_epoch()
            snap = hub.end_update(step)
            assert snap is not None and snap.policy.epochs == 3, step
            want = _k3_per_epoch(seen)
            np.testing.assert_allclose(snap.policy.kl_k3_per_epoch, want, rtol=1e-9, atol=1e-15)
    finally:
        hub.close()


def test_without_rollout_or_marks_every_minibatch_is_epoch_zero_and_early_stop_takes_the_last() -> None:
    snap, _ = _epoch_run(None, [[32, 32]] * 3)
    assert snap.policy.epochs == 1 and snap.policy.minibatches == 6
    hub = _tiny_hub(clip_range=0.2)
    try:
        hub.observe_rollout(raw_advantages=torch.randn(64), returns=torch.randn(64), values=torch.randn(64))
        for _ in range(5):  # epochs 0, 0, 1, 1, 2
            new, old = _logprobs(32, 9)
            hub.observe_minibatch(new_logprob=new, old_logprob=old)
        hub.early_stop(kl=0.5)
        snap = hub.end_update(1)
        assert snap is not None and snap.policy.epochs == 3 and snap.policy.early_stop_epoch == 2
        # the count starts again with the next update
        hub.observe_rollout(raw_advantages=torch.randn(64), returns=torch.randn(64), values=torch.randn(64))
        hub.observe_minibatch(new_logprob=new, old_logprob=old)
        hub.early_stop()
        snap = hub.end_update(2)
        assert snap is not None and snap.policy.epochs == 1 and snap.policy.early_stop_epoch == 0
    finally:
        hub.close()


def test_close_publishes_a_closing_frame_on_the_stream_and_in_the_recording(tmp_path: Path) -> None:
    """The run's end travels like every snapshot: the last update again, marked finished."""
    path = tmp_path / "run.simrec"
    lp = Loop({"bind": "tcp://127.0.0.1:0", "record": str(path)})
    dash = Dashboard(lp.hub)
    try:
        time.sleep(0.3)  # let the subscription reach the publisher
        last = None
        for _ in range(3):
            last = lp.update()
        assert last is not None and last.run_state == "running"
        lp.close()
        finished = None
        deadline = time.monotonic() + 30
        while finished is None and time.monotonic() < deadline:
            if dash.sub.poll(100):
                topic, data = dash.sub.recv_multipart()
                if topic == protocol.TOPIC_SNAPSHOT:
                    env = protocol.decode_envelope(data)
                    snap = protocol.decode_body(env)
                    if snap.run_state == "finished":
                        finished = (env, snap)
        assert finished is not None, "the closing frame reached a live subscriber"
        env, snap = finished
        assert env.seq == 4 and snap.step == last.step and snap.anomalies == [] and snap.incident_events == []
        assert snap.policy == last.policy and snap.gradients == last.gradients
        frames = [protocol.decode_body(protocol.decode_envelope(f)) for f in read_recording(path).frames]
        assert [s.run_state for s in frames] == ["running"] * 3 + ["finished"]
        lp.close()  # a second close publishes nothing more
    finally:
        dash.close()


def test_close_without_any_update_publishes_no_closing_frame(tmp_path: Path) -> None:
    path = tmp_path / "empty.simrec"
    lp = Loop({"record": str(path)})
    lp.close()
    assert read_recording(path).frames == []


def test_end_update_carries_the_loops_timesteps() -> None:
    hub = TelemetryHub(nn.Linear(2, 2), heads={"a": 2}, max_grad_norm=1.0, bind=None)
    try:
        first = hub.end_update(1)
        assert first is not None and first.timesteps is None
        second = hub.end_update(2, timesteps=np.int64(256))  # a numpy integer, as any number
        assert second is not None and second.timesteps == 256 and type(second.timesteps) is int
        third = hub.end_update(3, timesteps=-5)  # a bad one is left out and counted, never raised
        assert third is not None and third.timesteps is None and third.counters.telemetry_errors == 1
    finally:
        hub.close()
    strict = TelemetryHub(nn.Linear(2, 2), heads={"a": 2}, max_grad_norm=1.0, bind=None, strict=True)
    try:
        with pytest.raises(ValueError, match="timesteps must be an integer"):
            strict.end_update(1, timesteps=2.5)
    finally:
        strict.close()
