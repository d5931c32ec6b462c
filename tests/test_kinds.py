"""The registry of anomaly kinds is complete, and everything that names kinds derives from it: the
config's kinds and escalation durations, the detector's rules and action texts, the dashboard's
panels. A kind missing a piece anywhere fails here, not on an operator's screen."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
import subprocess
import sys

import pytest

from simic_tui.judge import PANEL_KINDS, kind_panel
from telemetry_core.config import ANOMALY_KINDS, DEFAULT_ESCALATION_UPDATES, TelemetryConfig, Thresholds
from telemetry_core.detection import DETECTED_KINDS, RULES, AnomalyDetector
from telemetry_core.kinds import PANELS, SCOPES, SPECS, WORSE, KindSpec, panel_kinds, upstream_rank

FIELDS = {f.name for f in dataclasses.fields(Thresholds)}


def _rule(spec: KindSpec) -> type:
    module, _, name = spec.rule.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("kind", list(SPECS))
def test_every_kind_is_complete(kind: str) -> None:
    spec = SPECS[kind]
    assert spec.name == kind
    rule = _rule(spec)
    assert kind == rule.KIND, f"{spec.rule} judges {rule.KIND!r}, not {kind!r}"
    assert spec.panel in PANELS
    assert spec.title and spec.title == spec.title.upper() and len(spec.title) <= 20
    assert spec.label and "\n" not in spec.label and len(spec.label) <= 100
    assert spec.action.endswith(".") and len(spec.action) > 40
    assert isinstance(spec.escalation_updates, int) and spec.escalation_updates >= 1
    assert spec.scope in SCOPES and spec.worse in WORSE
    assert isinstance(spec.upstream, int) and spec.upstream >= 0
    missing = [name for name in spec.thresholds if name not in FIELDS]
    assert not missing, f"{kind} names Thresholds fields that do not exist: {missing}"


@pytest.mark.parametrize("kind", list(SPECS))
def test_every_threshold_a_rule_reads_is_listed_in_its_spec(kind: str) -> None:
    """The spec's ``thresholds`` is what the dashboard shows next to an alarm: a limit the rule
    reads but the spec does not list would be a limit the operator cannot see."""
    spec = SPECS[kind]
    rule = _rule(spec)
    # the rule's class and its bases up to Rule, and the module's helper functions they call
    classes = [c for c in rule.__mro__ if c.__module__ == rule.__module__]
    source = "".join(inspect.getsource(c) for c in classes)
    module = sys.modules[rule.__module__]
    for name, fn in vars(module).items():
        if inspect.isfunction(fn) and fn.__module__ == module.__name__ and f"{name}(" in source:
            source += inspect.getsource(fn)
    read = {m for m in re.findall(r"\bt\.([a-z_0-9]+)", source) if m in FIELDS}
    read |= {m for m in re.findall(r'"([a-z_0-9]+)"', source) if m in FIELDS and m.endswith("_window")}
    if "entropy_limit(" in source:
        read |= {"entropy_collapse", "entropy_collapse_per_head"}
    if "ev_limit(" in source:
        read |= {"ev_warmup", "ev_early", "ev_mid", "ev_late"}
    assert bool(read) == bool(spec.thresholds), f"{spec.rule} reads {sorted(read)}"
    unlisted = read - set(spec.thresholds) - {"baseline_min_updates"}
    assert not unlisted, f"{kind}'s rule reads {sorted(unlisted)} but its spec does not list them"


def test_config_detector_and_dashboard_derive_from_the_registry() -> None:
    assert tuple(SPECS) == ANOMALY_KINDS
    assert {k: s.escalation_updates for k, s in SPECS.items()} == DEFAULT_ESCALATION_UPDATES
    assert TelemetryConfig().escalation_updates == DEFAULT_ESCALATION_UPDATES
    # The detector judges every kind whose rule lives in telemetry_core.detection, one rule each.
    in_detection = [k for k, s in SPECS.items() if s.rule.startswith("telemetry_core.detection.")]
    assert list(DETECTED_KINDS) == in_detection
    assert [r.KIND for r in RULES] == in_detection
    assert set(SPECS) - set(DETECTED_KINDS) == {"rank_divergence"}
    # The dashboard's kinds are the detector's (plus the aggregator's), each in exactly one panel.
    shown = [k for kinds in PANEL_KINDS.values() for k in kinds]
    assert sorted(shown) == sorted(ANOMALY_KINDS) and set(DETECTED_KINDS) <= set(shown)
    assert panel_kinds() == PANEL_KINDS and list(PANEL_KINDS) == list(PANELS)
    assert all(kind_panel(k) == SPECS[k].panel for k in SPECS)


def test_rules_use_their_specs_action() -> None:
    det = AnomalyDetector(Thresholds(), total_updates=None)
    assert {k: r.action for k, r in det.rules.items()} == {k: SPECS[k].action for k in DETECTED_KINDS}
    from telemetry_core.distributed import RankJudge

    assert RankJudge.KIND == "rank_divergence"
    judge = RankJudge(Thresholds(), ["grad_norm", "grad_nan", "grad_inf"])
    _, found = judge.judge(1, [[1.0, 0.0, 0.0], [1.0, 5.0, 0.0], [1.0, 0.0, 0.0]])
    assert [a.action for a in found] == [SPECS["rank_divergence"].action]


def test_upstream_order_puts_causes_before_consequences() -> None:
    chain = [
        ["numerical_instability"],
        ["gradient_exploding"],
        ["kl_spike", "std_collapse", "std_explosion"],  # a log-std that jumps moves every ratio
        ["ratio_explosion", "ratio_collapse", "action_saturation"],  # an exploded std spills past the bounds
        ["value_collapse", "ev_low"],
        ["entropy_collapse"],
        ["lstm_unhealthy"],
        ["gradient_drift", "gradient_vanishing", "performance_degradation", "rank_divergence"],
    ]
    assert sorted(k for tier in chain for k in tier) == sorted(SPECS)
    ranks = [{upstream_rank(k) for k in tier} for tier in chain]
    assert all(len(r) == 1 for r in ranks), ranks  # one rank per tier
    flat = [next(iter(r)) for r in ranks]
    assert flat == sorted(flat) and len(set(flat)) == len(flat)
    assert upstream_rank("not_a_kind") > max(flat)


def test_registry_and_detector_are_torch_free() -> None:
    code = (
        "import telemetry_core.kinds, telemetry_core.detection, telemetry_core.anomaly, simic_tui.judge\n"
        "import sys, json; print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    modules = set(json.loads(out.strip().splitlines()[-1]))
    assert "torch" not in modules
