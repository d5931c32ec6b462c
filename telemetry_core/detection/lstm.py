"""``lstm_unhealthy``: the recurrent state exploded or vanished, or its gates saturated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from telemetry_core.detection.base import CRITICAL, WARNING, Context, Rule, finite, fmt
from telemetry_core.schema import Anomaly

__all__ = ["LSTMRule"]


class LSTMRule(Rule):
    """``lstm_unhealthy``: the recurrent state exploded or vanished, or its gates saturated.

    Critical: the state exploded - h or c beyond its absolute limit (L2 norm above
    ``lstm_norm_max``, or for c the largest |c| above ``lstm_c_max_abs``) *and* that state's L2
    norm above ``lstm_relative_factor`` x its largest value over the last
    ``lstm_baseline_window`` updates (once known): an LSTM that learned to count can hold |c| in
    the hundreds for its whole life, and its state grows steadily while it learns; the largest
    recent value (not the median) tracks that growth, so only a sudden jump counts. Before
    that baseline is known the absolute limits alone give a warning. Critical too when the share
    of all input/forget/output gates within ``lstm_gate_eps`` of 0 or 1 exceeds
    ``lstm_gate_saturation_critical``; warning when it exceeds ``lstm_gate_saturation_warning``
    (a saturated gate passes no gradient). Warning when h's norm falls below ``lstm_norm_min``
    (the state carries nothing). NaN/inf states are numerical_instability. Norms flagged against a
    known baseline stay out of it.
    """

    KIND = "lstm_unhealthy"

    def reset(self) -> None:
        self.base = {"h": self.rolling("lstm_baseline_window"), "c": self.rolling("lstm_baseline_window")}

    def state_dict(self) -> dict[str, Any]:
        return {"h_norm": self.base["h"].dump(), "c_norm": self.base["c"].dump()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.base["h"].load(state["h_norm"])
        self.base["c"].load(state["c_norm"])

    def check(self, ctx: Context) -> list[Anomaly]:
        s = ctx.snapshot.lstm
        if s is None:
            return []
        t = self.t
        found: list[tuple[str, str, float, float]] = []  # severity, words, value, threshold
        cmax = finite(s.c_max_abs)
        for name, norm_raw in (("h", s.h_norm), ("c", s.c_norm)):
            norm = finite(norm_raw)
            if norm is None:
                continue
            over: list[str] = []
            if norm > t.lstm_norm_max:
                over.append(f"{name} norm {fmt(norm)} > {fmt(t.lstm_norm_max)}")
            if name == "c" and cmax is not None and cmax > t.lstm_c_max_abs:
                over.append(f"|c| max {fmt(cmax)} > {fmt(t.lstm_c_max_abs)}")
            rolling = self.base[name]
            base = rolling.largest()
            jumped = base is None or norm > t.lstm_relative_factor * base
            if over and jumped:
                rel = f", {norm / base:.0f}x its largest recent norm" if base else ""
                big_c = name == "c" and cmax is not None and cmax > t.lstm_c_max_abs
                value, limit = (cmax, t.lstm_c_max_abs) if big_c and cmax is not None else (norm, t.lstm_norm_max)
                sev = CRITICAL if base is not None else WARNING
                found.append((sev, f"{name} state exploded ({'; '.join(over)}{rel})", value, limit))
            if not (over and jumped) or base is None:
                rolling.append(norm)
        hn = finite(s.h_norm)
        if hn is not None and hn < t.lstm_norm_min:
            found.append((WARNING, f"h norm {fmt(hn)} has vanished", hn, t.lstm_norm_min))
        sat = [v for x in s.gate_saturation.values() if (v := finite(x)) is not None]
        if sat:
            share = sum(sat) / len(sat)
            worst = max(s.gate_saturation, key=lambda k: finite(s.gate_saturation[k]) or -1.0)
            words = f"{share:.0%} of gates saturated (worst: {worst} {finite(s.gate_saturation[worst]):.0%})"
            if share > t.lstm_gate_saturation_critical:
                found.append((CRITICAL, words, share, t.lstm_gate_saturation_critical))
            elif share > t.lstm_gate_saturation_warning:
                found.append((WARNING, words, share, t.lstm_gate_saturation_warning))
        if not found:
            return []
        found.sort(key=lambda f: f[0] != CRITICAL)
        sev, _, value, limit = found[0]
        return [
            self.anomaly(
                sev,
                ctx.step,
                "LSTM unhealthy: " + "; ".join(f[1] for f in found) + ".",
                value=value,
                threshold=limit,
            )
        ]
