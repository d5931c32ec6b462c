"""Table cells in theme colours.

DataTable measures its cells with Rich, so cells are Rich ``Text`` rather than Textual ``Content``;
their styles are resolved from the app's theme variables here, so tables and panels use the same
colours (and NO_COLOR strips both).
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.app import App

__all__ = ["rich_cell"]


def _resolve(app: App, style: str) -> Style:
    if not style:
        return Style()
    variables = app.theme_variables
    parts = []
    for token in style.split():
        if token.startswith("$"):
            value = variables.get(token[1:], "")
            if token == "$text-muted" or not value.startswith("#"):
                parts.append("dim")
            else:
                parts.append(value)
        else:
            parts.append(token)
    return Style.parse(" ".join(parts))


def rich_cell(app: App, text: str, style: str = "") -> Text:
    """``text`` in a theme style like "bold $error", always as Text.

    A plain str in a DataTable cell is parsed as markup, and cell text can come from the trainer
    (names, keys): ``[/x]`` in a layer name would crash the table.
    """
    if not style:
        return Text(text)
    return Text(text, style=_resolve(app, style))
