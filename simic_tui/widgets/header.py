"""The status header (run, step, phase, level, link, counts) and the banner for problems.

Segments have priorities: on a narrow terminal the least important ones are dropped whole rather
than cut mid-word. Nothing here reads a clock: ages and rates come from the status and the store,
whose clocks are injectable, so snapshot tests are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textual.content import Content
from textual.widgets import Static

from simic_tui.client import LinkState, LinkStatus
from simic_tui.fmt import fmt_count
from simic_tui.judge import Verdict
from simic_tui.store import TelemetryStore
from simic_tui.widgets.incidents import badge_parts
from simic_tui.widgets.ranks import rank_flags, ranks_of

__all__ = ["Banner", "HeaderModel", "StatusHeader", "fit_segments"]

SEP = " │ "


@dataclass
class HeaderModel:
    """Everything the header shows, gathered by the app each tick."""

    store: TelemetryStore
    status: LinkStatus
    lease: str = ""  # lease description ('' when none)
    profile: str = ""
    paused: bool = False
    paused_behind: int = 0  # snapshots ingested since the display froze
    paused_step: int | None = None  # the step on screen while paused (the panels' step)
    replay: str = ""  # replay position / speed ('' when live)
    commands_note: str = ""


Segment = tuple[int, list[tuple[str, str]]]  # (priority, [(text, style)])


def fit_segments(segments: Sequence[Segment], width: int) -> Content:
    """Join segments with separators, dropping the least important until the line fits."""
    keep = list(segments)
    while keep:
        total = sum(len(t) for _, parts in keep for t, _ in parts) + len(SEP) * (len(keep) - 1) + 1
        if total <= width or len(keep) == 1:
            break
        drop = max(range(len(keep)), key=lambda i: (keep[i][0], i))
        del keep[drop]
    pieces: list[tuple[str, str] | str] = [" "]
    for i, (_, parts) in enumerate(keep):
        if i:
            pieces.append((SEP, "$text-muted"))
        pieces.extend(parts)
    return Content.assemble(*pieces).truncate(width, ellipsis=True)


_STATE = {
    LinkState.CONNECTING: ("◌ connecting…", "bold $warning"),
    LinkState.LIVE: ("● live", "bold $success"),
    LinkState.STALE: ("○ stale", "bold $warning"),
    LinkState.DISCONNECTED: ("✖ disconnected", "bold $error"),
    LinkState.INCOMPATIBLE: ("✖ incompatible", "bold $error"),
    LinkState.REPLAY: ("▶ replay", "bold $focus"),
}


class StatusHeader(Static):
    """Two lines: what is being watched, and how the link is doing."""

    DEFAULT_CSS = "StatusHeader { height: 2; }"
    _shown: Content | None = None

    def show(self, model: HeaderModel) -> None:
        width = max(self.size.width, 20)
        store, status = model.store, model.status
        snap = store.latest
        line1: list[Segment] = [(0, [("simic-tui", "bold $focus")])]
        if snap is not None:
            line1.append((1, [(snap.run.name or "(unnamed run)", "bold")]))
            if store.session:
                line1.append((6, [("session ", "$text-muted"), (store.session[:8], "")]))
            planned = snap.run.planned_updates
            # paused: the step the frozen panels show, not the newest one
            shown = model.paused_step if model.paused and model.paused_step is not None else snap.step
            step = [("step ", "$text-muted"), (str(shown), "bold")]
            if planned:
                step += [(f"/{planned}", ""), (f" ({100 * shown / planned:.0f}%)", "$text-muted")]
            line1.append((0, step))
            badge = badge_parts(store.incidents)
            if badge:  # the incidents asking for attention: never dropped for width
                line1.append((0, badge))
            line1.append((4, [("phase ", "$text-muted"), (snap.phase, "")]))
            level_style = "bold $warning" if snap.level.level == "DEBUG" else "bold"
            line1.append((0, [("level ", "$text-muted"), (snap.level.level, level_style)]))
            line1.append((3, [(snap.level.reason, "$text-muted")]))
            rs = ranks_of(snap)
            if rs is not None:  # multi-rank: how many, and the ranks flagged now
                ranks: list[tuple[str, str]] = [("ranks ", "$text-muted"), (str(rs.world_size), "bold")]
                if not rs.enabled:
                    ranks.append((" ▲ not aggregated", "bold $warning"))
                for f in rank_flags(snap)[:3]:
                    ranks.append(
                        (f" {f.text()}", "bold $error" if f.verdict == Verdict.CRIT else "bold $warning")
                    )
                line1.append((2, ranks))
        else:
            line1.append((1, [("no snapshot yet", "$text-muted")]))

        text, style = _STATE[status.state]
        state: list[tuple[str, str]] = [(text, style)]
        if model.replay:
            state = [(model.replay, style)]
        elif status.state == LinkState.INCOMPATIBLE and status.their_version:
            state.append((f" (schema {status.their_version[0]}.{status.their_version[1]})", "$error"))
        elif status.detail:
            state.append((f" {status.detail}", "$text-muted"))
        line2: list[Segment] = [(0, state)]
        if status.unencrypted and not model.replay:  # anyone on the path can read and rewrite it
            line2.append((0, [("⚠ unencrypted", "bold reverse $error")]))
        if not model.replay:
            line2.append((5, [(f"{store.rate():.1f} upd/s", "")]))
        c = store.counters
        bad_style = "bold $error" if c.bad_frames else ""
        bad: list[tuple[str, str]] = [("bad frames ", "$text-muted"), (fmt_count(c.bad_frames), bad_style)]
        if c.bad_frames and width >= 150:
            codes = ", ".join(f"{k} {v}" for k, v in c.bad_by_code.most_common(3))
            bad.append((f" ({codes})", "$text-muted"))
        line2.append((2, bad))
        # Everything the trainer lost: snapshots its publish queue dropped and records its recorder did.
        dropped = snap.counters.snapshots_dropped + snap.counters.records_dropped if snap is not None else 0
        line2.append(
            (3, [("missed ", "$text-muted"), (fmt_count(c.missed), "bold $warning" if c.missed else "")])
        )
        line2.append(
            (3, [("dropped ", "$text-muted"), (fmt_count(dropped), "bold $warning" if dropped else "")])
        )
        if c.columns_dropped:
            line2.append(
                (4, [("columns dropped ", "$text-muted"), (fmt_count(c.columns_dropped), "bold $warning")])
            )
        if model.lease:
            line2.append((1, [(model.lease, "bold $warning")]))
        if model.profile:
            line2.append((2, [(model.profile, "$focus")]))
        if model.commands_note and not model.replay:
            line2.append((7, [(model.commands_note, "$text-muted")]))
        if model.paused:
            at = f" at step {model.paused_step}" if model.paused_step is not None else ""
            text = f"‖ paused{at} · {model.paused_behind} new · p resumes"
            line2.insert(1, (0, [(text, "bold reverse $focus")]))
        content = Content("\n").join([fit_segments(line1, width), fit_segments(line2, width)])
        if self._shown is None or not content.is_same(self._shown):  # only when text or style changed
            self._shown = content
            self.update(content, layout=False)


class Banner(Static):
    """Problems the operator must see: incompatible schema, authentication, a damaged recording."""

    DEFAULT_CSS = "Banner { height: auto; display: none; }"

    _text = ""

    def show(self, messages: Sequence[str]) -> None:
        text = "\n".join(f"✖ {m}" for m in messages if m)
        if text == self._text:
            return
        self._text = text
        self.display = bool(text)
        if text:
            self.update(Content(text))
