"""The Ranks screen: every rank's key statistics of the latest update, with their spread and flags.

One row per torch.distributed rank (the trainer's ``RankStats``, gathered on rank 0), then the median,
min and max over the ranks. A cell the trainer flagged (``RankStats.flags``) is drawn in its rank's
anomaly severity with its glyph; below the table, the update's ``rank_divergence`` messages and the
rules that produced them, with the trainer's limits.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.screen import Screen
from textual.widgets import DataTable, Static

from simic_tui.fmt import fmt_limit, fmt_num
from simic_tui.judge import GLYPH, STYLE, Verdict
from simic_tui.store import TelemetryStore
from simic_tui.widgets.cells import rich_cell
from simic_tui.widgets.footer import FittedFooter
from simic_tui.widgets.ranks import key_label, rank_flags, ranks_of
from telemetry_core.schema import Snapshot

__all__ = ["RanksScreen", "ranks_title"]


def ranks_title(snap: Snapshot | None, session: str | None) -> Content:
    rs = ranks_of(snap)
    if snap is None:
        return Content.styled(" Ranks: no snapshot yet", "bold")
    if rs is None:
        return Content.assemble(
            (" Ranks: ", "bold"),
            (
                "a single process: no per-rank statistics (a run under torchrun shows every rank here)",
                "$text-muted",
            ),
        )
    parts: list[tuple[str, str] | str] = [
        (f" Ranks: {rs.world_size}", "bold"),
        (f"  step {snap.step}, gathered on rank 0 (session {(session or '')[:8]})", "$text-muted"),
    ]
    if not rs.enabled:
        parts.append((f"  {GLYPH[Verdict.WARN]} aggregation off: {rs.disabled_reason}", STYLE[Verdict.WARN]))
        return Content.assemble(*parts)
    flags = rank_flags(snap)
    if not flags:
        parts.append(("  all ranks agree", "$success"))
    for f in flags:
        parts.append(("  ", ""))
        parts.append((f.text(), STYLE[f.verdict]))
    return Content.assemble(*parts)


class RanksScreen(Screen):
    BINDINGS: ClassVar = [
        Binding("escape,r", "app.pop_screen", "Back", id="ranks_back", tooltip="Back to the dashboard")
    ]

    def __init__(self, store: TelemetryStore) -> None:
        super().__init__()
        self.store = store
        self._shown: object = None

    def compose(self) -> ComposeResult:
        yield Static(id="ranks-title")
        yield DataTable(id="ranks-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="ranks-notes")
        yield FittedFooter(compact=True)

    def on_mount(self) -> None:
        self.refresh_view()
        self.query_one(DataTable).focus()

    def refresh_view(self) -> None:
        snap = self.store.latest
        key = (id(snap), self.store.session)
        if key == self._shown:
            return
        self._shown = key
        self.query_one("#ranks-title", Static).update(ranks_title(snap, self.store.session))
        table = self.query_one(DataTable)
        table.clear(columns=True)
        notes = self.query_one("#ranks-notes", Static)
        rs = ranks_of(snap)
        if rs is None or not rs.enabled or snap is None:
            notes.update("")
            return
        flags = {f.rank: f for f in rank_flags(snap)}
        table.add_column("rank", key="rank")
        table.add_column("status", key="status")  # before the statistics: visible at 80 columns
        for k in rs.keys:
            table.add_column(Text(key_label(k)), key=k)  # a trainer key: never markup
        for r in range(rs.world_size):
            f = flags.get(r)
            style = STYLE[f.verdict] if f else ""
            cells: list[object] = [
                rich_cell(self.app, f"r{r}", style),
                rich_cell(self.app, f.text() if f else "ok", style or "$text-muted"),
            ]
            for k in rs.keys:
                values = rs.per_rank.get(k, [])
                text = fmt_num(values[r]) if r < len(values) else "—"
                if f is not None and r in rs.flags.get(k, []):
                    cells.append(rich_cell(self.app, text + GLYPH[f.verdict], style))
                else:
                    cells.append(text)
            table.add_row(*cells, key=f"r{r}")
        for name in ("median", "min", "max"):
            summary = getattr(rs, name)
            row: list[object] = [rich_cell(self.app, name, "$text-muted"), ""]
            row += [rich_cell(self.app, fmt_num(summary.get(k)), "$text-muted") for k in rs.keys]
            table.add_row(*row, key=name)
        notes.update(self._notes(snap))

    def _notes(self, snap: Snapshot) -> Content:
        thr = snap.thresholds
        lines: list[Content] = []
        for inc in snap.incidents:  # the active rank incidents, whole (trainer text: plain)
            if inc.kind != "rank_divergence":
                continue
            v = Verdict.CRIT if inc.severity == "critical" else Verdict.WARN
            since = f"since step {inc.onset_step}: "
            lines.append(Content.assemble((f"{GLYPH[v]} {inc.severity} ", STYLE[v]), since, inc.message))
            lines.append(Content.styled(f"   → {inc.action}", "$text-muted"))
        lines.append(
            Content.styled(
                f"Diverges: NaN/inf where other ranks are finite (at once), or grad norm, KL, entropy or "
                f"value loss more than {fmt_limit(thr.rank_divergence)} robust sigmas and "
                f"{fmt_limit(thr.rank_divergence_min_rel * 100)}% from the rank median for "
                f"{thr.rank_divergence_patience} updates. Straggles: rollout time above "
                f"{fmt_limit(thr.rank_straggler)}x the other ranks' median and "
                f"{fmt_limit(thr.rank_straggler_min_seconds)} s slower for {thr.rank_straggler_patience} "
                "updates.",
                "$text-muted",
            )
        )
        return Content("\n").join(lines)
