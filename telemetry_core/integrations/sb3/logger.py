"""SB3's logger: the health statistics written into it as ``simic/...`` values, SB3's own ``train/*``
values read back, and the check of the callback's replica losses against them."""

from __future__ import annotations

import math
from typing import Any

from telemetry_core.schema import Snapshot

__all__ = ["loss_mismatches", "sb3_log_values", "train_values"]

# Losses whose means are compared with SB3's logger after each update.
_CHECKS = (
    ("policy", "policy_loss", "train/policy_gradient_loss"),
    ("value", "value_loss", "train/value_loss"),
)


def sb3_log_values(snapshot: Snapshot) -> dict[str, float]:
    """The key health statistics of one update as ``simic/...`` logger values: KL (k3 mean over the
    update, and k3 / k1 of the last epoch that ran — SB3's ``train/approx_kl`` is that epoch's k3,
    whatever epoch ``target_kl`` stopped at), clip fraction, ratio extremes, ESS, entropy and
    normalised entropy per head, a Gaussian head's log-std mean / min / max and
    its pre-clip action saturation (share of samples, and of its worst dimension), the pre-clip gradient norm and its clip rate, explained variance,
    and the number of warning / critical anomalies. Undefined values are left out."""
    out: dict[str, float] = {}
    p, g, v = snapshot.policy, snapshot.gradients, snapshot.value
    if p is not None:
        out["simic/kl_k3_mean"] = p.kl_k3_mean
        if p.kl_k3_per_epoch:
            out["simic/kl_k3_last_epoch"] = p.kl_k3_per_epoch[-1]
            out["simic/kl_k1_last_epoch"] = p.kl_k1_per_epoch[-1]
        out["simic/clip_fraction"] = p.clip_fraction
        out["simic/ratio_max"] = p.ratio_max
        out["simic/ratio_min"] = p.ratio_min
        out["simic/ess_min"] = p.ess_min
        for head, ent in p.entropy.items():
            out[f"simic/entropy/{head}"] = ent
        for head, ent in p.entropy_normalized.items():
            out[f"simic/entropy_normalized/{head}"] = ent
        for head, value in p.log_std_mean.items():
            out[f"simic/log_std_mean/{head}"] = value
            out[f"simic/log_std_min/{head}"] = p.log_std_min.get(head, math.nan)
            out[f"simic/log_std_max/{head}"] = p.log_std_max.get(head, math.nan)
        for head, value in p.action_saturation.items():
            out[f"simic/action_saturation/{head}"] = value
            out[f"simic/action_saturation_max/{head}"] = p.action_saturation_max.get(head, math.nan)
    if g is not None:
        out["simic/grad_norm_preclip"] = g.total_norm
        out["simic/grad_clip_rate"] = g.clip_rate
    if v is not None and v.explained_variance is not None:
        out["simic/explained_variance"] = v.explained_variance
    out["simic/anomalies_warning"] = float(sum(a.severity == "warning" for a in snapshot.anomalies))
    out["simic/anomalies_critical"] = float(sum(a.severity == "critical" for a in snapshot.anomalies))
    return {k: float(x) for k, x in out.items() if isinstance(x, (int, float)) and math.isfinite(x)}


def train_values(logger: Any) -> dict[str, float]:
    """SB3's ``train/*`` values as they stand in its logger (those that are numbers)."""
    return {k: float(v) for k, v in logger.name_to_value.items() if k.startswith("train/") and _is_number(v)}


def loss_mismatches(snapshot: Snapshot, sb3_logged: dict[str, float]) -> list[str]:
    """Our replica losses' means must equal what SB3 logged for the same minibatches: the keys that
    disagree, each with both values."""
    bad = []
    for part, field, key in _CHECKS:
        stats = getattr(snapshot, part)
        ours = None if stats is None else getattr(stats, field)
        theirs = sb3_logged.get(key)
        if ours is None or theirs is None or not (math.isfinite(ours) and math.isfinite(theirs)):
            continue
        if abs(ours - theirs) > 1e-4 * (1.0 + abs(theirs)):
            bad.append(f"{key}: SB3 {theirs:.6g}, callback {ours:.6g}")
    return bad


def _is_number(v: object) -> bool:
    try:
        float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
