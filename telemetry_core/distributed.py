"""Telemetry across torch.distributed ranks: one collective per update, never a hang.

When PPO runs under ``torchrun``, every rank holds its own :class:`~telemetry_core.hub.TelemetryHub`.
The hub builds a :class:`RankAggregator` when ``torch.distributed`` is initialised, and then, on every
rank and at every update, whatever the level and whatever any dashboard does:

1. **One collective.** Each rank's key statistics (:func:`stat_keys`: pre-clip gradient norm, NaN and
   Inf gradient elements, k3 KL, entropy per head, policy and value loss, update and rollout time)
   and the level word (below) form one fixed-layout float64 vector; a single ``all_gather`` gives
   every rank the whole ``world x L`` matrix. At OFF, or when a rank's telemetry failed this update,
   that rank still joins the same collective with NaN statistics, so no rank can skip it and leave
   the others waiting.
2. **Where it sits: before the transfer.** The vector is built *on the device* from the tensors the
   reducers hand the hub (mirroring their ``build`` arithmetic in float64, so each value equals that
   rank's own snapshot exactly), the gathered matrix joins the pending tensors and comes back in
   the hub's single host transfer. On NCCL (CUDA tensors, the process group's device) that adds no
   host sync: the few host-side numbers (times, denominators, losses handed over as Python floats,
   the level word) go up through a pinned buffer with a non-blocking copy. On gloo the vector lives
   on the CPU. Only at OFF, where there is no transfer, is the gathered matrix read on its own.
3. **Level travels in the vector.** Rank 0 decides the level (operator lease, ``set_level``,
   auto-escalation, lease expiry) at an update boundary for the update *after* next and sends it in
   the next update's vector; at that update's boundary every rank (rank 0 included) adopts the level
   it received from rank 0. Every rank therefore changes level at the same step, one update later
   than a single-process hub would (commands are acknowledged with that step).
4. **Layouts are compared once.** At construction, after a bounded rendezvous through the c10d
   store (a hub built on some ranks only raises after :data:`HANDSHAKE_TIMEOUT`, naming the missing
   ranks, instead of hanging), the ranks all_gather a hash of the vector's layout (statistic names,
   layout version) and rank 0's initial level. On a mismatch (different ``heads``, different
   versions) aggregation and the level sync turn off on every rank with a warning naming the ranks;
   no per-update collective is attempted, so nothing can hang. Each rank then keeps its own level.
5. **Only rank 0 binds.** Other ranks get ``bind=None`` (no sockets, no connection file) and record,
   if asked, to ``<name>.rank<R><suffix>``; their snapshots are still returned by ``end_update``.

``rank_divergence`` (judged by :class:`RankJudge` from the gathered matrix, identically on every rank):

* **Non-finite:** a rank with NaN/Inf gradient elements, or a NaN/Inf judged statistic, while at least
  one other rank is clean, diverges (critical). When every rank is broken it is not a rank problem
  (each rank's ``numerical_instability`` says so).
* **Far from the others** (warning): for each judged statistic (:data:`JUDGED`) with median ``m`` over
  the finite ranks and ``MAD = median |x - m|``, a rank diverges when ``|x - m|`` exceeds
  ``rank_divergence`` x 1.4826 x max(MAD, typical MAD) *and* ``rank_divergence_min_rel`` x ``|m|``.
  The typical MAD is the median of the statistic's per-update MADs over the last
  ``rank_baseline_window`` updates; until ``baseline_min_updates`` are known no finite verdict is
  given (a rank's usual spread is unknown), and updates that flagged a rank stay out of it.
  **Two ranks:** the median is the mean and both ranks are exactly one MAD from it, so the update's
  own MAD says nothing; the pair diverges when its half-spread exceeds the limit set by the typical
  half-spread alone, and the rank named is the one that moved more from its own previous value
  (both, when neither has one).
* **Stragglers** (warning): a rank whose rollout time (end of the previous ``end_update`` to
  ``observe_rollout``: the part of a PPO update that runs without collectives) exceeds
  ``rank_straggler`` x the median of the *other* ranks' and is ``rank_straggler_min_seconds`` slower,
  for ``rank_straggler_patience`` updates in a row. Under synchronous gradient averaging every rank's
  update takes the same wall time (fast ranks wait inside all-reduce), so the update time is judged
  only when some rank has no rollout time.

One anomaly per flagged rank (``Anomaly.rank``); the kind escalates on rank 0 like any other, except
for a rank that only straggles (DEBUG would measure nothing about slowness and slow every rank).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from telemetry_core.config import TelemetryConfig, TelemetryLevel, Thresholds
from telemetry_core.kinds import SPECS
from telemetry_core.schema import Anomaly, RankStats

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONTROL_KEYS",
    "HANDSHAKE_TIMEOUT",
    "JUDGED",
    "LAYOUT_VERSION",
    "LevelWord",
    "RankAggregator",
    "RankJudge",
    "distributed_ready",
    "group_size",
    "layout_hash",
    "plan_level",
    "stat_keys",
]

log = logging.getLogger("telemetry_core")

LAYOUT_VERSION = 1
HANDSHAKE_TIMEOUT = 120.0  # seconds a rank waits for every other rank's hub before raising
MAD_SCALE = 1.4826  # MAD -> sigma of a normal distribution
CONTROL_KEYS: tuple[str, ...] = ("ctl.level", "ctl.reason", "ctl.until")
# Statistics judged for divergence (entropy.<head> for every head); counts and times are judged apart.
JUDGED: tuple[str, ...] = ("grad_norm", "kl", "entropy.*", "policy_loss", "value_loss")
# Judged only for being non-finite: the surrogate loss of normalised advantages is noise around 0, so
# neither a relative floor nor a spread says anything about one rank's value.
NONFINITE_ONLY: tuple[str, ...] = ("policy_loss",)

REASON_CONFIGURED, REASON_OPERATOR, REASON_ESCALATION = 0, 1, 2

_ACTION = SPECS["rank_divergence"].action
_STRAGGLER_ACTION = (
    "Every collective waits for the slowest rank: check this rank's host load, its environment "
    "workers and simulator, its share of environments, and its device clocks."
)


def stat_keys(heads: Sequence[str]) -> list[str]:
    """The per-rank statistics, in vector order (RankStats.keys)."""
    return [
        "grad_norm",
        "grad_nan",
        "grad_inf",
        "kl",
        *[f"entropy.{h}" for h in heads],
        "policy_loss",
        "value_loss",
        "update_seconds",
        "rollout_seconds",
    ]


def layout_hash(layout: Sequence[str]) -> int:
    """A 48-bit hash of the vector layout (exact in a float64, so it can ride a float collective)."""
    text = json.dumps([LAYOUT_VERSION, list(layout)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


def distributed_ready() -> bool:
    """True when torch.distributed is available and its default process group is initialised."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return bool(dist.is_available() and dist.is_initialized())


def group_size(group: Any = None) -> int:
    """Ranks in ``group`` (the default group when None); a group of one needs no aggregation."""
    import torch.distributed as dist

    return int(dist.get_world_size(group))


@dataclass(frozen=True)
class LevelWord:
    """The level rank 0 decided, as it travels in the vector: level, why (code) and until when."""

    level: TelemetryLevel
    code: int = REASON_CONFIGURED
    until: int | None = None

    def values(self) -> list[float]:
        return [float(self.level), float(self.code), math.nan if self.until is None else float(self.until)]

    @classmethod
    def from_values(cls, values: Sequence[float]) -> LevelWord:
        level, code, until = values
        if not (math.isfinite(level) and 0 <= level <= int(TelemetryLevel.DEBUG)):
            raise ValueError(f"rank 0 sent an invalid level word {list(values)!r}")
        return cls(
            TelemetryLevel(int(level)),
            int(code) if math.isfinite(code) else REASON_CONFIGURED,
            int(until) if math.isfinite(until) else None,
        )

    def reason(self) -> str:
        """How a rank other than 0 explains the level it follows."""
        if self.code == REASON_OPERATOR:
            what = (
                f"operator lease until step {self.until}" if self.until is not None else "operator override"
            )
        elif self.code == REASON_ESCALATION:
            what = f"anomaly escalation until step {self.until}"
        else:
            what = "configured"
        return f"rank 0: {what}"


def plan_level(config: TelemetryConfig, step: int) -> tuple[LevelWord, str]:
    """The level ``config`` gives update ``step``, as a word for the vector and rank 0's reason."""
    level, reason = config.effective(step)
    if config.override_level is not None:
        return LevelWord(level, REASON_OPERATOR, config.override_until), reason
    if level != config.level:
        active = config.active_escalations(step)
        return LevelWord(level, REASON_ESCALATION, max(active.values()) if active else None), reason
    return LevelWord(level), reason


# ---------------------------------------------------------------------------------------------
# The judge (host only): RankStats and rank_divergence from the gathered matrix
# ---------------------------------------------------------------------------------------------


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def _ranks_text(ranks: Sequence[int]) -> str:
    return "rank " + str(ranks[0]) if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


class RankJudge:
    """Turns each update's ``world x keys`` matrix into :class:`RankStats` and ``rank_divergence``.

    Host-only and deterministic, so every rank that runs it on the same matrix reaches the same
    verdict. Keeps a small rolling state: each judged statistic's recent per-update MADs and each
    rank's previous value (to name the rank that moved when two ranks disagree).
    """

    KIND = "rank_divergence"  # its spec in telemetry_core.kinds names this class as its rule

    def __init__(self, thresholds: Thresholds, keys: Sequence[str]) -> None:
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
        for name in ("rank_divergence", "rank_straggler"):
            if not getattr(thresholds, name) > 0:
                raise ValueError(f"Thresholds.{name} must be > 0, got {getattr(thresholds, name)!r}")
        if thresholds.rank_baseline_window < 1:
            raise ValueError(
                f"Thresholds.rank_baseline_window must be >= 1, got {thresholds.rank_baseline_window!r}"
            )
        self.thresholds = thresholds
        self.keys = list(keys)
        self.judged = [k for k in self.keys if k in JUDGED or k.startswith("entropy.")]
        self.spread_judged = [k for k in self.judged if k not in NONFINITE_ONLY]
        self.reset()

    def reset(self) -> None:
        window = max(1, self.thresholds.rank_baseline_window)
        self._spread: dict[str, deque[float]] = {k: deque(maxlen=window) for k in self.judged}
        # each rank's own values of updates where all ranks agreed (its usual level)
        self._usual: dict[str, dict[int, deque[float]]] = {k: {} for k in self.judged}
        self._far: dict[str, dict[int, int]] = {k: {} for k in self.judged}  # consecutive far updates
        self._active: set[int] = set()
        self._slow: dict[int, int] = {}  # rank -> consecutive slow updates
        self.onsets: list[Anomaly] = []

    def state_dict(self) -> dict[str, Any]:
        """The rolling state ``judge`` carries between updates, as plain Python types (JSON-safe)."""
        return {
            "keys": list(self.keys),
            "spread": {k: list(d) for k, d in self._spread.items()},
            "usual": {k: {str(r): list(d) for r, d in ranks.items()} for k, ranks in self._usual.items()},
            "far": {k: {str(r): n for r, n in ranks.items()} for k, ranks in self._far.items()},
            "active": sorted(self._active),
            "slow": {str(r): n for r, n in self._slow.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ValueError (state untouched) for another key layout."""
        if list(state.get("keys", ())) != self.keys:
            raise ValueError(f"rank state for keys {state.get('keys')!r}, this judge has {self.keys!r}")
        window = max(1, self.thresholds.rank_baseline_window)
        spread = {
            k: deque((float(v) for v in state["spread"].get(k, ())), maxlen=window) for k in self.judged
        }
        usual = {
            k: {
                int(r): deque((float(v) for v in vs), maxlen=window)
                for r, vs in state["usual"].get(k, {}).items()
            }
            for k in self.judged
        }
        far = {k: {int(r): int(n) for r, n in state["far"].get(k, {}).items()} for k in self.judged}
        active = {int(r) for r in state["active"]}
        slow = {int(r): int(n) for r, n in state["slow"].items()}
        self._spread, self._usual, self._far, self._active, self._slow = spread, usual, far, active, slow

    def typical_spread(self, key: str) -> float | None:
        """Median of ``key``'s recent per-update MADs, once ``baseline_min_updates`` are known."""
        values = self._spread[key]
        if len(values) < max(1, self.thresholds.baseline_min_updates):
            return None
        return statistics.median(values)

    def judge(self, step: int, rows: Sequence[Sequence[float]]) -> tuple[RankStats, list[Anomaly]]:
        """Judge one update; ``rows[r]`` holds rank r's values in ``keys`` order.

        Returns the update's RankStats and one ``rank_divergence`` anomaly per flagged rank (rank
        order); ``self.onsets`` holds those whose rank was not flagged in the previous update.
        """
        t = self.thresholds
        n = len(rows)
        window = max(1, t.rank_baseline_window)
        if any(len(row) != len(self.keys) for row in rows):
            raise ValueError(f"each rank's row must hold {len(self.keys)} values ({', '.join(self.keys)})")
        col = {k: [float(row[j]) for row in rows] for j, k in enumerate(self.keys)}
        stats = RankStats(world_size=n, keys=list(self.keys), per_rank=col)
        for k, values in col.items():
            fin = _finite(values)
            stats.mean[k] = math.fsum(fin) / len(fin) if fin else math.nan
            stats.min[k] = min(fin) if fin else math.nan
            stats.max[k] = max(fin) if fin else math.nan
            stats.median[k] = statistics.median(fin) if fin else math.nan

        # rank -> [(severity, words, value, threshold)]
        found: dict[int, list[tuple[str, str, float | None, float | None]]] = {}
        flags: dict[str, set[int]] = {}

        def flag(
            rank: int, key: str, severity: str, words: str, value: float | None, limit: float | None
        ) -> None:
            found.setdefault(rank, []).append((severity, words, value, limit))
            flags.setdefault(key, set()).add(rank)

        # 1. non-finite gradients or statistics on some ranks while others are clean
        broken: dict[int, list[tuple[str, str]]] = {}  # rank -> [(key, words)]
        nans, infs = col.get("grad_nan", [0.0] * n), col.get("grad_inf", [0.0] * n)
        for r in range(n):
            nan = int(nans[r]) if math.isfinite(nans[r]) else 0
            inf = int(infs[r]) if math.isfinite(infs[r]) else 0
            if nan or inf:
                broken.setdefault(r, []).append(("grad_nan", f"{nan} NaN and {inf} inf gradient elements"))
        for k in self.judged:
            values = col[k]
            if not _finite(values):
                continue  # not measured on any rank (or broken everywhere): not a rank difference
            for r, v in enumerate(values):
                if not math.isfinite(v):
                    broken.setdefault(r, []).append((k, f"{k} {_fmt(v)}"))
        if broken and len(broken) < n:
            clean = n - len(broken)
            for r, items in sorted(broken.items()):
                for k, _ in items[1:]:
                    flags.setdefault(k, set()).add(r)
                flag(
                    r,
                    items[0][0],
                    "critical",
                    f"non-finite numbers ({'; '.join(w for _, w in items)}) while {clean} other "
                    f"rank{'s are' if clean > 1 else ' is'} finite",
                    None,
                    None,
                )

        # 2. finite statistics far from the rank median, for rank_divergence_patience updates
        for k in self.spread_judged:
            values = col[k]
            idx = [r for r, v in enumerate(values) if math.isfinite(v)]
            if len(idx) < 2:
                continue
            xs = [values[r] for r in idx]
            m = statistics.median(xs)
            dev = {r: abs(values[r] - m) for r in idx}
            mad = statistics.median(dev.values())
            typical = self.typical_spread(k)
            far: list[int] = []
            limit = math.nan
            if typical is not None:
                spread = max(mad if len(idx) >= 3 else 0.0, typical)
                limit = max(t.rank_divergence * MAD_SCALE * spread, t.rank_divergence_min_rel * abs(m))
                far = [r for r in idx if dev[r] > limit and r not in broken]
            counts = self._far[k]
            for r in range(n):
                counts[r] = counts.get(r, 0) + 1 if r in far else 0
            flagged = [r for r in far if counts[r] >= t.rank_divergence_patience]
            if flagged and len(idx) == 2:
                a, b = idx
                for r in self._mover(k, values, idx):
                    usual = self._usual_level(k, r)
                    was = f"; rank {r} moved (its usual {_fmt(usual)})" if usual is not None else ""
                    flag(
                        r,
                        k,
                        "warning",
                        f"ranks {a} and {b} disagree on {k} for {counts[r]} updates: {_fmt(values[a])} vs "
                        f"{_fmt(values[b])}, half-spread {_fmt(dev[a])} > limit {_fmt(limit)} (typical "
                        f"half-spread {_fmt(typical or 0.0)}){was}",
                        values[r],
                        limit,
                    )
            else:
                for r in flagged:
                    flag(
                        r,
                        k,
                        "warning",
                        f"{k} {_fmt(values[r])} is {_fmt(dev[r])} from the rank median {_fmt(m)} (limit "
                        f"{_fmt(limit)}) for {counts[r]} updates",
                        values[r],
                        limit,
                    )
            if not far:  # spreads and values of updates where every rank agreed
                self._spread[k].append(mad)
                for r in idx:
                    self._usual[k].setdefault(r, deque(maxlen=window)).append(values[r])

        # 3. stragglers
        stragglers: list[int] = []
        rollout = col.get("rollout_seconds", [])
        time_key = "rollout_seconds" if rollout and len(_finite(rollout)) == n else "update_seconds"
        times = col.get(time_key, [])
        for r in range(n):
            tr = times[r] if r < len(times) else math.nan
            others = [x for j, x in enumerate(times) if j != r and math.isfinite(x)]
            mo = statistics.median(others) if others else math.nan
            slow = math.isfinite(tr) and tr > t.rank_straggler * mo and tr - mo > t.rank_straggler_min_seconds
            self._slow[r] = self._slow.get(r, 0) + 1 if slow else 0
            if slow and self._slow[r] >= t.rank_straggler_patience:
                stragglers.append(r)
                what = "rollout" if time_key == "rollout_seconds" else "update"
                flag(
                    r,
                    time_key,
                    "warning",
                    f"straggles: {what} {tr:.3f} s vs {mo:.3f} s median of the other ranks "
                    f"({tr / mo if mo > 0 else math.inf:.1f}x, limit {t.rank_straggler:g}x) for "
                    f"{self._slow[r]} updates",
                    tr,
                    t.rank_straggler * mo,
                )
        stats.straggle_key = time_key
        stats.straggler_ranks = stragglers
        stats.divergent_ranks = sorted(
            r for r, items in found.items() if r not in stragglers or len(items) > 1
        )
        stats.flags = {k: sorted(v) for k, v in flags.items()}

        anomalies: list[Anomaly] = []
        for r in sorted(found):
            items = found[r]
            critical = any(s == "critical" for s, _, _, _ in items)
            first = next((i for i in items if i[0] == "critical"), items[0])
            only_slow = all(w.startswith("straggles") for _, w, _, _ in items)
            anomalies.append(
                Anomaly(
                    kind="rank_divergence",
                    severity="critical" if critical else "warning",
                    step=step,
                    message=f"Rank {r} of {n}: " + "; ".join(w for _, w, _, _ in items) + ".",
                    action=_STRAGGLER_ACTION if only_slow else _ACTION,
                    value=first[2],
                    threshold=first[3],
                    rank=r,
                )
            )
        # A straggler alone does not escalate: DEBUG measures nothing about its slowness and would
        # slow every rank further. It becomes an onset once the rank also diverges.
        judged = [a for a in anomalies if a.rank not in stragglers or a.rank in stats.divergent_ranks]
        self.onsets = [a for a in judged if a.rank not in self._active]
        self._active = {a.rank for a in judged if a.rank is not None}
        return stats, anomalies

    def _usual_level(self, key: str, rank: int) -> float | None:
        values = self._usual[key].get(rank)
        return statistics.median(values) if values else None

    def _mover(self, key: str, values: Sequence[float], idx: Sequence[int]) -> list[int]:
        """Of two disagreeing ranks, the one farther (relatively) from its own usual level: the median
        of its values in recent updates where the ranks agreed. Both when that is unknown or a tie."""
        usual = {r: self._usual_level(key, r) for r in idx}
        if any(u is None for u in usual.values()):
            return list(idx)
        moves = {r: abs(values[r] - u) / max(abs(u), 1e-12) for r, u in usual.items() if u is not None}
        a, b = idx
        if moves[a] == moves[b]:
            return list(idx)
        return [a if moves[a] > moves[b] else b]


# ---------------------------------------------------------------------------------------------
# The aggregator (torch): the vector, the collective, the level word
# ---------------------------------------------------------------------------------------------


def comm_device(backend: str, model_device: torch.device) -> torch.device:
    """The process group's device: CUDA for NCCL, the CPU for gloo (a gloo+NCCL group follows the model)."""
    import torch

    backend = backend.lower()
    if "nccl" in backend and (model_device.type == "cuda" or "gloo" not in backend):
        if model_device.type == "cuda":
            return model_device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RankAggregator:
    """Gathers every rank's key statistics once per update (see the module docstring).

    Construction is collective: every rank of ``group`` must build one (the hub does so when
    torch.distributed is initialised, on every rank); a rank that waits more than
    :data:`HANDSHAKE_TIMEOUT` for the others raises a RuntimeError naming the missing ranks.
    """

    _built = 0  # aggregators built in this process (rendezvous keys)

    def __init__(
        self,
        *,
        heads: Sequence[str],
        thresholds: Thresholds,
        device: torch.device,
        initial: LevelWord,
        initial_reason: str,
        group: Any = None,
    ) -> None:
        import torch
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.world_size = int(dist.get_world_size(group))
        self.backend = str(dist.get_backend(group))
        self.device = comm_device(self.backend, torch.device(device))
        self.keys = stat_keys(heads)
        self.layout = [*self.keys, *CONTROL_KEYS]
        self.layout_hash = layout_hash(self.layout)
        self.judge = RankJudge(thresholds, self.keys)
        self.enabled = True
        self.disabled_reason = ""
        self._pinned: torch.Tensor | None = None
        self._next: tuple[LevelWord, str] = (initial, initial_reason)
        self._sent: tuple[LevelWord, str] = self._next
        self._gathered: torch.Tensor | None = None
        self.received: LevelWord | None = None
        self.rows: list[list[float]] | None = None
        self._handshake()

    @property
    def leads(self) -> bool:
        """Rank 0 decides the level and publishes."""
        return self.rank == 0

    # -- construction: one small collective --------------------------------------------------------
    def _rendezvous(self) -> None:
        """Wait (bounded) until every rank built its aggregator, through the c10d store, so that a hub
        built on some ranks only (the usual ``if rank == 0:`` habit) raises instead of hanging in
        the handshake collective. Only for the default group (its store is the one we can reach)."""
        if self.group is not None:
            return
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store()
        except Exception:  # pragma: no cover - a torch without it: the collective alone
            return
        index = RankAggregator._built
        RankAggregator._built += 1  # the n-th hub of every rank meets the n-th of the others
        prefix = f"simic_telemetry/{index}/"
        store.set(prefix + str(self.rank), str(self.layout_hash))
        keys = [prefix + str(r) for r in range(self.world_size)]
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        while not store.check(keys):
            if time.monotonic() > deadline:
                missing = [r for r, k in enumerate(keys) if not store.check([k])]
                raise RuntimeError(
                    f"TelemetryHub under torch.distributed: {_ranks_text(missing)} built no hub within "
                    f"{HANDSHAKE_TIMEOUT:g} s. Build one on every rank (only rank 0 binds and publishes), "
                    "or pass distributed=False to the hubs for rank-local telemetry."
                )
            time.sleep(0.02)

    def _handshake(self) -> None:
        import torch

        self._rendezvous()
        word, reason = self._next
        mine = torch.tensor(
            [float(self.layout_hash), float(len(self.layout)), float(LAYOUT_VERSION), *word.values()],
            dtype=torch.float64,
        ).to(self.device)
        out = torch.empty(self.world_size * mine.numel(), dtype=torch.float64, device=self.device)
        self._dist.all_gather_single(out, mine, group=self.group)
        rows = out.view(self.world_size, -1).tolist()
        ref = rows[0][:3]
        differ = [r for r, row in enumerate(rows) if row[:3] != ref]
        if differ:
            sizes = ", ".join(f"rank {r}: {int(rows[r][1])}" for r in [0, *differ])
            self.enabled = False
            self.disabled_reason = (
                f"statistics layout differs across ranks ({_ranks_text(differ)} differ from rank 0; "
                f"vector sizes {sizes}; check that every rank passes the same heads and runs the same "
                "telemetry_core): cross-rank aggregation and the level sync are off"
            )
            warnings.warn(f"telemetry rank {self.rank}: {self.disabled_reason}", RuntimeWarning, stacklevel=3)
            log.warning("telemetry rank %d: %s", self.rank, self.disabled_reason)
            return
        first = LevelWord.from_values(rows[0][3:6])
        self._next = self._sent = (first, reason if self.leads else first.reason())
        self.received = first

    # -- per update ---------------------------------------------------------------------------------
    def plan(self, word: LevelWord, reason: str) -> None:
        """Rank 0: the level to send in the next update's vector."""
        self._next = (word, reason)

    def launch(
        self,
        pending: Mapping[str, torch.Tensor],
        *,
        grads: Any,
        policy: Any,
        value: Any,
        update_seconds: float,
        rollout_seconds: float,
    ) -> torch.Tensor | None:
        """Build this rank's vector from the reducers' pending tensors and all_gather it (no host sync).

        Returns the gathered ``world * L`` tensor to add to the hub's pending transfer (None when
        aggregation is off). Must be followed by :meth:`finish` (or :meth:`settle`) in the same update.
        """
        if not self.enabled:
            return None
        import torch

        from telemetry_core.reductions.policy import _SUM_K3

        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        num: list[torch.Tensor] = []
        add: list[float] = []
        den: list[float] = []

        def entry(t: torch.Tensor | None, offset: float = 0.0, denominator: float = 1.0) -> None:
            num.append(zero if t is None else t.to(self.device, torch.float64))
            add.append(offset)
            den.append(denominator)

        nan = math.nan
        # Mirrors GradientReducer.build: total / calls; NaN/Inf estimates (int-truncated).
        g = pending.get("grad.stats")
        calls = int(getattr(grads, "calls", 0) or 0)
        if g is not None and calls:
            total, nan_est, inf_est = grads.rank_sums().unbind()
            entry(total, 0.0, float(calls))
            entry(torch.trunc(nan_est))
            entry(torch.trunc(inf_est))
        else:
            entry(None, nan)
            entry(None, 0.0)
            entry(None, 0.0)
        # Mirrors PolicyReducer.build: k3 sum / samples; entropy sum (over its per-epoch sums) / count per head.
        s = pending.get("policy.summary")
        samples = float(sum(getattr(policy, "_sizes", ())))
        if s is not None and samples:
            entry(s[_SUM_K3], 0.0, samples)
        else:
            entry(None, nan)
        counts = getattr(policy, "_entropy_counts", {})
        for key in self.keys:
            if key.startswith("entropy."):
                head = key.removeprefix("entropy.")
                e = pending.get(f"policy.entropy.{head}")
                n = sum(counts.get(head, {}).values())
                if e is not None and n:
                    entry(e.reshape(-1)[0] if e.numel() == 1 else e.sum(), 0.0, float(n))
                else:
                    entry(None, nan)
        # Mirrors ScalarSeries.result: (host sum + device sum) / count.
        for series, name in (
            (getattr(policy, "_loss", None), "policy.loss"),
            (getattr(value, "_loss", None), "value.loss"),
        ):
            count = len(series) if series is not None else 0
            if not count:
                entry(None, nan)
                continue
            host = list(series._host)
            total = math.fsum(host) if all(math.isfinite(v) for v in host) else sum(host)
            d = pending.get(name)
            entry(None if d is None else d[0], float(total), float(count))
        entry(None, float(update_seconds))
        entry(None, float(rollout_seconds))
        word, reason = self._next
        for v in word.values():
            entry(None, v)
        self._sent = (word, reason)
        host = self._to_device(add + den)
        local = (torch.stack(num) + host[: len(add)]) / host[len(add) :]
        return self._gather(local)

    def _to_device(self, values: list[float]) -> torch.Tensor:
        """The host-side numbers on the collective's device; on CUDA through a pinned buffer, no sync."""
        import torch

        host = torch.tensor(values, dtype=torch.float64)
        if self.device.type != "cuda":
            moved = host
        else:
            if self._pinned is None or self._pinned.numel() != host.numel():
                self._pinned = torch.empty(host.numel(), dtype=torch.float64).pin_memory()
            # Safe to overwrite: the previous update's transfer synchronised after its copy.
            self._pinned.copy_(host)
            moved = self._pinned.to(self.device, non_blocking=True)
        return moved

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        import torch

        out = torch.empty(self.world_size * local.numel(), dtype=torch.float64, device=self.device)
        self._dist.all_gather_single(out, local, group=self.group)
        self._gathered = out
        return out

    def finish(self, values: Sequence[float] | None, step: int) -> tuple[RankStats, list[Anomaly]]:
        """After the transfer: read the level word, build RankStats and judge the ranks."""
        if not self.enabled:
            return RankStats(
                world_size=self.world_size, enabled=False, disabled_reason=self.disabled_reason
            ), []
        if values is None:
            raise ValueError("the gathered rank statistics are missing from the transfer")
        self._absorb(values)
        assert self.rows is not None
        k = len(self.keys)
        return self.judge.judge(step, [row[:k] for row in self.rows])

    def settle(self) -> LevelWord | None:
        """End of every update on every rank: make sure this rank joined the collective, return the word.

        Joins with NaN statistics when :meth:`launch` did not run this update (OFF, or telemetry
        failed before it); reads the gathered matrix itself when the transfer did not.
        """
        if not self.enabled:
            return None
        try:
            if self.rows is None:
                if self._gathered is None:
                    self._gather_nan()
                assert self._gathered is not None
                self._absorb(self._gathered.tolist())  # at OFF: the update's one transfer
            return self.received
        finally:
            self._gathered = None
            self.rows = None

    def _gather_nan(self) -> None:
        import torch

        word, reason = self._next
        self._sent = (word, reason)
        values = [math.nan] * len(self.keys) + word.values()
        self._gather(torch.tensor(values, dtype=torch.float64).to(self.device))

    def _absorb(self, values: Sequence[float]) -> None:
        width = len(self.layout)
        if len(values) != width * self.world_size:
            raise ValueError(f"expected {width * self.world_size} gathered values, got {len(values)}")
        self.rows = [list(values[r * width : (r + 1) * width]) for r in range(self.world_size)]
        self.received = LevelWord.from_values(self.rows[0][len(self.keys) :])

    def level_now(self) -> tuple[TelemetryLevel, str] | None:
        """The level every rank adopts at this boundary (rank 0's word), with this rank's reason."""
        word = self.received
        if word is None:
            return None
        reason = self._sent[1] if self.leads else word.reason()
        return word.level, reason
