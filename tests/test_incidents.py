"""The incident layer: lifecycle (onset, upgrade, clear with hysteresis, re-open), scopes, grouping of
one cause, checkpointing, and the hub's escalation on critical onsets and upgrades within the DEBUG budget."""

from __future__ import annotations

import json

import msgspec
import pytest
import torch
from torch import nn

from telemetry_core import TelemetryHub
from telemetry_core.config import TelemetryConfig, TelemetryLevel, Thresholds
from telemetry_core.incidents import IncidentTracker, scope_of, upstream_rank
from telemetry_core.schema import Anomaly, Snapshot


def judgement(kind: str, severity: str = "warning", step: int = 0, *, value: float | None = 1.0,
              head: str | None = None, rank: int | None = None, message: str = "") -> Anomaly:
    return Anomaly(kind=kind, severity=severity, step=step, message=message or f"{kind} at {step}",
                   action="try something", value=value, threshold=0.5, head=head, rank=rank)


def test_an_incident_opens_once_and_stays_active_while_judged() -> None:
    t = IncidentTracker(clear_updates=3)
    ev = t.update([judgement("kl_spike", step=10)], 10)
    assert [(e.event, e.incident.kind, e.incident.onset_step) for e in ev] == [("onset", "kl_spike", 10)]
    for step in (11, 12):
        assert t.update([judgement("kl_spike", step=step)], step) == []
    (inc,) = t.active()
    assert (inc.id, inc.onset_step, inc.last_step, inc.updates_active, inc.state) == (1, 10, 12, 3, "active")


def test_clear_needs_clear_updates_quiet_updates_exactly() -> None:
    t = IncidentTracker(clear_updates=3)
    t.update([judgement("ev_low")], 1)
    assert t.update([], 2) == [] and t.update([], 3) == []  # quiet 1, 2: still active (hysteresis)
    assert len(t.active()) == 1
    (ev,) = t.update([], 4)  # the third quiet update clears it
    assert (ev.event, ev.incident.state, ev.incident.cleared_step, ev.incident.last_step) == ("clear", "cleared", 4, 1)
    assert t.active() == []


def test_an_intermittent_condition_stays_one_incident() -> None:
    t = IncidentTracker(clear_updates=3)
    onsets = 0
    for step in range(20):
        judged = [judgement("ratio_collapse", step=step)] if step % 3 == 0 else []  # two quiet updates between
        onsets += sum(e.event == "onset" for e in t.update(judged, step))
    assert onsets == 1
    (inc,) = t.active()
    assert inc.updates_active == 7 and inc.onset_step == 0 and inc.last_step == 18


def test_a_judgement_after_clear_reopens_as_a_new_incident() -> None:
    t = IncidentTracker(clear_updates=1)
    first = t.update([judgement("kl_spike")], 1)[0].incident
    (clear,) = t.update([], 2)
    assert clear.event == "clear" and clear.incident.id == first.id
    (again,) = t.update([judgement("kl_spike")], 3)
    assert again.event == "onset" and again.incident.id == first.id + 1 and again.incident.onset_step == 3


def test_severity_upgrade_is_an_event_and_a_downgrade_is_not() -> None:
    t = IncidentTracker(clear_updates=3)
    t.update([judgement("entropy_collapse", "warning", value=0.08, head="force")], 1)
    (up,) = t.update([judgement("entropy_collapse", "critical", value=0.01, head="force")], 2)
    assert up.event == "upgrade" and up.incident.severity == "critical" and up.incident.peak_step == 2
    assert up.incident.value == 0.01 and up.incident.scope == "head:force"
    assert t.update([judgement("entropy_collapse", "warning", value=0.05, head="force")], 3) == []
    (inc,) = t.active()
    assert (inc.severity, inc.peak_severity, inc.value, inc.last_value) == ("warning", "critical", 0.01, 0.05)
    # back to critical: the peak was already critical, so no second upgrade (no second toast)
    assert t.update([judgement("entropy_collapse", "critical", value=0.02, head="force")], 4) == []


def test_the_peak_is_the_worst_value_in_the_kinds_direction() -> None:
    t = IncidentTracker()
    for step, v in enumerate([0.09, 0.05, 0.07]):  # entropy: lower is worse
        t.update([judgement("entropy_collapse", value=v, head="a")], step)
    for step, v in enumerate([12.0, 40.0, 20.0]):  # ratio explosion: higher is worse
        t.update([judgement("ratio_explosion", value=v), judgement("entropy_collapse", value=0.08, head="a")], 3 + step)
    peaks = {i.kind: i.value for i in t.active()}
    assert peaks == {"entropy_collapse": 0.05, "ratio_explosion": 40.0}


def test_scopes_are_separate_incidents() -> None:
    t = IncidentTracker()
    ev = t.update([
        judgement("entropy_collapse", head="direction"),
        judgement("entropy_collapse", head="force"),
        judgement("rank_divergence", rank=3),
        judgement("kl_spike"),
    ], 5)
    assert sorted(e.incident.scope for e in ev) == ["", "head:direction", "head:force", "rank:3"]
    assert scope_of(judgement("x", head="h")) == "head:h" and scope_of(judgement("x", rank=0)) == "rank:0"


def test_one_cause_is_one_group_headed_by_the_most_upstream_signal() -> None:
    t = IncidentTracker(group_updates=1)
    # a learning-rate spike: ratio, value and entropy alarms in the update, KL the next
    t.update([judgement("ratio_explosion", "critical"), judgement("value_collapse"),
              judgement("entropy_collapse", head="force")], 40)
    t.update([judgement("kl_spike", "critical"), judgement("ratio_explosion", "critical")], 41)
    active = t.active()
    head = active[0]
    assert head.kind == "kl_spike" and head.group == head.id
    assert {i.group for i in active} == {head.id}
    assert [i.kind for i in active[1:]] == ["ratio_explosion", "value_collapse", "entropy_collapse"]
    # an onset two updates later is a new group
    (late,) = t.update([judgement("lstm_unhealthy")], 43)
    assert late.incident.group == late.incident.id


def test_upstream_order_matches_the_documented_chain() -> None:
    chain = ["numerical_instability", "gradient_exploding", "kl_spike", "ratio_explosion",
             "value_collapse", "entropy_collapse", "lstm_unhealthy"]
    ranks = [upstream_rank(k) for k in chain]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert upstream_rank("ratio_collapse") == upstream_rank("ratio_explosion")
    assert upstream_rank("ev_low") == upstream_rank("value_collapse")


def test_state_dict_round_trips_through_json() -> None:
    t = IncidentTracker(clear_updates=2)
    t.update([judgement("kl_spike", "critical"), judgement("ev_low")], 7)
    t.update([judgement("kl_spike", "critical")], 8)
    state = json.loads(json.dumps(t.state_dict()))
    u = IncidentTracker(clear_updates=2)
    u.load_state_dict(state)
    assert [msgspec.to_builtins(i) for i in u.active()] == [msgspec.to_builtins(i) for i in t.active()]
    (ev,) = u.update([judgement("kl_spike", "critical")], 9)  # ev_low quiet for 2 updates: clears
    assert ev.event == "clear" and ev.incident.kind == "ev_low"
    (new,) = u.update([judgement("gradient_drift")], 10)
    assert new.incident.id == 3
    with pytest.raises(ValueError):
        u.load_state_dict({"version": 1, "next_id": 1, "open": [{"incident": {"id": "x"}, "quiet": 0}]})


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        IncidentTracker(clear_updates=0)
    with pytest.raises(ValueError):
        IncidentTracker(group_updates=-1)
    with pytest.raises(ValueError):
        Thresholds(incident_clear_updates=0).validate()


# ---- the DEBUG budget --------------------------------------------------------------------------


def run_updates(cfg: TelemetryConfig, start: int, stop: int) -> list[TelemetryLevel]:
    levels = []
    for step in range(start, stop):
        level, reason = cfg.effective(step)
        cfg.note_update(level, reason, 0.1)
        levels.append(level)
    return levels


def test_escalation_is_cut_to_the_budget_and_refused_when_spent() -> None:
    cfg = TelemetryConfig(debug_budget_share=0.1, debug_budget_window=100)
    assert cfg.escalate("numerical_instability", 1) == 11  # 20 wanted, 10 of 100 allowed
    levels = run_updates(cfg, 1, 30)
    assert levels.count(TelemetryLevel.DEBUG) == 10
    assert cfg.escalate("kl_spike", 30) is None and cfg.escalations_refused == 1
    share, window = cfg.debug_share()
    assert window == 29 and share == pytest.approx(10 / 29)
    run_updates(cfg, 30, 112)  # the DEBUG updates leave the window
    assert cfg.escalate("kl_spike", 112) == 112 + cfg.escalation_updates["kl_spike"]


def test_escalations_overlap_within_the_budget() -> None:
    cfg = TelemetryConfig(debug_budget_share=0.08, debug_budget_window=100)  # 8 updates
    assert cfg.escalate("kl_spike", 1) == 6  # 5 updates: 1..5
    assert run_updates(cfg, 1, 2) == [TelemetryLevel.DEBUG]
    # 10 wanted from 2; spent 1, planned 2..5: room for 3 more -> until 9
    assert cfg.escalate("ratio_explosion", 2) == 9
    assert run_updates(cfg, 2, 20).count(TelemetryLevel.DEBUG) == 7


def test_operator_leases_count_in_the_share_but_not_against_the_budget() -> None:
    cfg = TelemetryConfig(debug_budget_share=0.1, debug_budget_window=20)
    cfg.set_override(TelemetryLevel.DEBUG, until_step=10, reason="operator lease until step 10")
    run_updates(cfg, 0, 10)
    assert cfg.debug_share() == (1.0, 10)
    assert cfg.escalate("kl_spike", 10) == 12  # the budget of 2 updates is untouched by the lease


# ---- the hub: incidents in every snapshot, escalation on critical only ---------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.pi = nn.Linear(16, 3)
        self.v = nn.Linear(16, 1)


def train_update(hub: TelemetryHub, net: Net, opt: torch.optim.Optimizer, step: int, *, nan: bool = False,
                 lr_scale: float = 1.0) -> Snapshot | None:
    g = torch.Generator().manual_seed(step)
    obs = torch.randn(64, 4, generator=g)
    if nan:
        obs[3, 1] = float("nan")
    actions = torch.randint(0, 3, (64,), generator=g)
    with torch.no_grad():
        old = torch.distributions.Categorical(logits=net.pi(net.body(obs)), validate_args=False).log_prob(actions)
    returns = torch.randn(64, generator=g)
    adv = torch.randn(64, generator=g)
    hub.observe_rollout(advantages=adv, returns=returns, values=net.v(net.body(obs)).squeeze(-1).detach())
    for group in opt.param_groups:
        group["lr"] = 1e-3 * lr_scale
    for epoch in range(2):
        h = net.body(obs)
        dist = torch.distributions.Categorical(logits=net.pi(h), validate_args=False)
        new = dist.log_prob(actions)
        ratio = (new - old).exp()
        ent = dist.entropy()
        value = net.v(h).squeeze(-1)
        loss = -(ratio * adv).mean() + 0.5 * ((value - returns) ** 2).mean() - 0.01 * ent.mean()
        opt.zero_grad()
        loss.backward()
        hub.observe_gradients(loss)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        opt.step()
        hub.observe_minibatch(new_logprob=new.detach(), old_logprob=old, advantages=adv, clip_range=0.2,
                              epoch=epoch, head_entropies={"action": ent.detach()}, value_loss=loss.detach())
    return hub.end_update(step)


def test_the_hub_reports_incidents_and_escalates_on_a_critical_onset_only() -> None:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    hub = TelemetryHub(net, heads={"action": 3}, max_grad_norm=0.5, total_updates=40, bind=None,
                       record=None, strict=True)
    try:
        snaps = {s: train_update(hub, net, opt, s) for s in range(12)}
        # whatever warnings a tiny random problem raises, they never switch DEBUG on
        assert all(s is not None and s.level.level == "NORMAL" for s in snaps.values())
        for s in snaps.values():
            assert {i.kind for i in s.incidents} <= {a.kind for a in s.anomalies} | {
                i.kind for p in snaps.values() for i in p.incidents}
        nan = train_update(hub, net, opt, 12, nan=True)
        assert nan is not None
        onsets = [e for e in nan.incident_events if e.event == "onset"]
        assert any(e.incident.kind == "numerical_instability" and e.incident.severity == "critical" for e in onsets)
        head = next(i for i in nan.incidents if i.kind == "numerical_instability")
        assert head.group == head.id  # the most upstream signal heads its group
        # named at the onset update itself, at NORMAL, in model order
        assert nan.level.level == "NORMAL" and "in body.0.weight, body.0.bias" in head.message
        assert all(i.group == head.id for i in nan.incidents if i.onset_step == 12)
        after = train_update(hub, net, opt, 13)
        assert after is not None and after.level.level == "DEBUG"
        assert after.level.reason.startswith("anomaly numerical_instability")
        # still named after the update that broke, until it clears
        assert any(i.kind == "numerical_instability" for i in after.incidents)
        assert after.level.debug_window == 14 and after.level.debug_share == pytest.approx(1 / 14)
        assert "incidents" in hub.state_dict()
    finally:
        hub.close()
