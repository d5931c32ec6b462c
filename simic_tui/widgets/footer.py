"""The footer: the screen's keys, only as many as fit the width, whole.

Textual's Footer scrolls sideways when its keys are wider than the terminal, so at 80 columns the
last ones are cut mid-word (``space Pla``). This one leaves out whole entries instead, the least
important first (:data:`simic_tui.keys.FOOTER_ORDER`), and keeps the rest in their order; ``?``
stays at every width, and the help screen and the command palette list everything.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

from simic_tui.keys import FOOTER_ORDER

__all__ = ["FittedFooter", "footer_width"]


def footer_width(key: FooterKey) -> int:
    """Cells one compact entry takes: ``key description`` and a space."""
    if key.has_class("-command-palette"):
        return len(key.key_display) + len(key.description) + 4  # its left rule and padding
    return len(key.key_display) + 1 + len(key.description) + (1 if key.description else 0)


def _rank(key: FooterKey) -> int:
    """Lower is more important; keys not listed are left out first."""
    action = key.action.split("(")[0].removeprefix("app.")
    return FOOTER_ORDER.index(action) if action in FOOTER_ORDER else len(FOOTER_ORDER)


class FittedFooter(Footer):
    def compose(self) -> ComposeResult:
        keys: list[Widget] = list(super().compose())  # no binding groups here: a flat list
        width = self.size.width or self.app.size.width
        entries = [k for k in keys if isinstance(k, FooterKey)]
        used = sum(footer_width(k) for k in entries)
        dropped: set[int] = set()
        for key in sorted(entries, key=_rank, reverse=True):
            if used <= width:
                break
            if _rank(key) == 0:  # help: never left out
                continue
            dropped.add(id(key))
            used -= footer_width(key)
        yield from (k for k in keys if id(k) not in dropped)

    def on_resize(self) -> None:
        self.call_after_refresh(self.recompose)
