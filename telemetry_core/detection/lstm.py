"""``lstm_unhealthy``: the recurrent state exploded or vanished, or its gates saturated."""

from __future__ import annotations

import itertools
import math
import statistics
import sys
from collections.abc import Mapping
from typing import Any

from telemetry_core.detection.base import CRITICAL, WARNING, Context, Rule, finite, fmt
from telemetry_core.schema import Anomaly

__all__ = ["LSTMRule"]

MAD_SCALE = 1.4826  # MAD x this estimates the standard deviation of normally distributed values


class LSTMRule(Rule):
    """``lstm_unhealthy``: the recurrent state exploded or vanished, or its gates saturated.

    Critical: the state exploded - h or c beyond its absolute limit (L2 norm above
    ``lstm_norm_max``, or for c the largest |c| above ``lstm_c_max_abs``) *and* that state's L2
    norm far above its own recent level: its log-norm exceeds the median of the last
    ``baseline_min_updates`` unflagged log-norms by more than ``log(lstm_relative_factor)`` *and* by
    more than ``lstm_spread_k`` robust sigmas of the update-to-update changes of the log-norm over the
    last ``lstm_baseline_window`` unflagged updates (1.4826 x their MAD). An LSTM that
    learned to count can hold |c| in the hundreds for its whole life, a steadily learning one grows
    its state by a few percent per update, and a bursty one (sparse rewards, long episodes) moves
    its state norm by tens of percent from update to update: each is judged against its own spread,
    so only a jump that is large both in absolute terms and for this run counts. Before the
    baseline is known (``baseline_min_updates``) the absolute limits alone give a warning. Critical
    too when the share of all input/forget/output gates within ``lstm_gate_eps`` of 0 or 1 exceeds
    ``lstm_gate_saturation_critical`` (a saturated gate passes no gradient); warning when it exceeds
    ``lstm_gate_saturation_warning`` *and* lies more than ``lstm_gate_saturation_jump`` above the
    median of its last ``lstm_baseline_window`` unflagged updates (the warning limit alone before
    ``baseline_min_updates`` are known): a converging LSTM saturates its gates slowly and stays
    there, which is its own level, not an alarm. Warning when h's norm falls below ``lstm_norm_min`` (the
    state carries nothing). NaN/inf states are numerical_instability. Norms flagged against a known
    baseline stay out of it.
    """

    KIND = "lstm_unhealthy"

    def reset(self) -> None:
        # log-norms of h and c (0 norms are held as log of the smallest float: no verdict is lost)
        self.base = {"h": self.rolling("lstm_baseline_window"), "c": self.rolling("lstm_baseline_window")}
        self.gates = self.rolling("lstm_baseline_window")  # share of saturated gates

    def state_dict(self) -> dict[str, Any]:
        return {
            "h_log_norm": self.base["h"].dump(),
            "c_log_norm": self.base["c"].dump(),
            "gate_share": self.gates.dump(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.base["h"].load(state["h_log_norm"])
        self.base["c"].load(state["c_log_norm"])
        self.gates.load(state.get("gate_share", ()))  # absent in a state saved before it was kept

    def _jump(self, name: str, log_norm: float) -> tuple[bool, float | None, float | None]:
        """(jumped far, the recent level's norm, the limit on the norm) of one state.

        The recent level is the median of the last ``baseline_min_updates`` log-norms (it follows a
        state that grows while it learns); the spread is the robust sigma of the update-to-update
        changes of the last ``lstm_baseline_window`` (how bursty this state is, whatever its trend).
        """
        values = list(self.base[name].values)
        if len(values) < max(2, self.base[name].min_known):
            return True, None, None
        level = statistics.median(values[-self.base[name].min_known :])
        steps = [b - a for a, b in itertools.pairwise(values)]
        centre = statistics.median(steps)
        spread = MAD_SCALE * statistics.median(abs(d - centre) for d in steps)
        margin = max(math.log(self.t.lstm_relative_factor), self.t.lstm_spread_k * spread)
        return log_norm > level + margin, math.exp(level), math.exp(level + margin)

    def check(self, ctx: Context) -> list[Anomaly]:
        s = ctx.snapshot.lstm
        if s is None:
            return []
        t = self.t
        found: list[tuple[str, str, float, float]] = []  # severity, words, value, threshold
        cmax = finite(s.c_max_abs)
        for name, norm_raw in (("h", s.h_norm), ("c", s.c_norm)):
            norm = finite(norm_raw)
            if norm is None or norm < 0:
                continue
            log_norm = math.log(max(norm, sys.float_info.min))
            over: list[str] = []
            if norm > t.lstm_norm_max:
                over.append(f"{name} norm {fmt(norm)} > {fmt(t.lstm_norm_max)}")
            if name == "c" and cmax is not None and cmax > t.lstm_c_max_abs:
                over.append(f"|c| max {fmt(cmax)} > {fmt(t.lstm_c_max_abs)}")
            jumped, median, limit_norm = self._jump(name, log_norm)
            if over and jumped:
                rel = (
                    f", {norm / median:.1f}x its recent median {fmt(median)} (limit {fmt(limit_norm)})"
                    if median and limit_norm
                    else ""
                )
                big_c = name == "c" and cmax is not None and cmax > t.lstm_c_max_abs
                value, limit = (cmax, t.lstm_c_max_abs) if big_c and cmax is not None else (norm, t.lstm_norm_max)
                sev = CRITICAL if median is not None else WARNING
                found.append((sev, f"{name} state exploded ({'; '.join(over)}{rel})", value, limit))
            if not (over and jumped) or median is None:
                self.base[name].append(log_norm)
        hn = finite(s.h_norm)
        if hn is not None and hn < t.lstm_norm_min:
            found.append((WARNING, f"h norm {fmt(hn)} has vanished", hn, t.lstm_norm_min))
        sat = [v for x in s.gate_saturation.values() if (v := finite(x)) is not None]
        if sat:
            share = sum(sat) / len(sat)
            worst = max(s.gate_saturation, key=lambda k: finite(s.gate_saturation[k]) or -1.0)
            words = f"{share:.0%} of gates saturated (worst: {worst} {finite(s.gate_saturation[worst]):.0%})"
            level = self.gates.median()
            warn = t.lstm_gate_saturation_warning
            if level is not None:
                warn = max(warn, level + t.lstm_gate_saturation_jump)
                words += f", {share - level:+.0%} against its recent median {level:.0%}"
            if share > t.lstm_gate_saturation_critical:
                found.append((CRITICAL, words, share, t.lstm_gate_saturation_critical))
            elif share > warn:
                found.append((WARNING, words, share, warn))
            if level is None or not share > warn:  # the first updates learn the level, flagged or not
                self.gates.append(share)
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
