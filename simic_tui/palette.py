"""Colour roles, so a colour on screen always means the same thing.

- ``$series``: every data series (sparklines, charts, histogram bars): one cool hue family.
- ``$series-dim``: context drawn beside the data (early-stop marks, secondary marks).
- ``$focus``: what the operator is pointing at (the focused panel, the footer's keys, headings).
- ``$warning`` / ``$error``: reserved for alarms (a value past a limit, an incident); never data.
- ``$success``: the link is live, an incident cleared.

On a 256-colour or true-colour terminal the roles are set on top of the current theme (a theme
that defines them keeps its own). On a 16-colour terminal (``TERM=xterm``) every colour is
downgraded by nearest match, which turns the default theme's orange into bright red, so the roles
are set to exact entries of the 16-colour palette instead: alarms stay the only red and yellow.
NO_COLOR is untouched: Textual strips every colour after this.
"""

from __future__ import annotations

from rich._palettes import STANDARD_PALETTE

__all__ = ["ANSI16_ROLES", "ROLES_256", "ansi16", "role_variables"]


def ansi16(index: int) -> str:
    """The exact colour of entry ``index`` of the 16-colour palette, which downgrades onto itself."""
    r, g, b = STANDARD_PALETTE[index]
    return f"#{r:02X}{g:02X}{b:02X}"


# 256 / true colour: defaults any theme may override (cyan-blue data, violet focus)
ROLES_256: dict[str, str] = {
    "series": "#5FAFD7",  # 256-colour 74
    "series-dim": "#5F8787",  # 66
    "focus": "#AF87FF",  # 141
}

# 16 colours: exact palette entries, so no colour drifts into another role when downgraded
ANSI16_ROLES: dict[str, str] = {
    "series": ansi16(6),  # cyan
    "series-dim": ansi16(4),  # blue
    "focus": ansi16(13),  # bright magenta
    "accent": ansi16(13),
    "footer-key-foreground": ansi16(13),
    "primary": ansi16(12),  # panel borders (drawn at 60 %: plain blue)
    "border": ansi16(12),
    "warning": ansi16(11),  # bright yellow
    "error": ansi16(9),  # bright red
    "success": ansi16(2),  # green
}


def role_variables(color_system: str | None, theme_variables: dict[str, str]) -> dict[str, str]:
    """The CSS variables the roles add to (or, in 16 colours, replace in) the theme's.

    ``color_system`` is Rich's name for the terminal's depth (``Console.color_system``)."""
    if color_system == "standard":
        return dict(ANSI16_ROLES)
    # the theme's own accent is its focus colour; the default theme's accent is its warning orange
    out = {k: v for k, v in ROLES_256.items() if k not in theme_variables}
    accent = theme_variables.get("accent", "").upper()
    if accent and accent == theme_variables.get("warning", "").upper():
        out["accent"] = out.get("focus", theme_variables.get("focus", ROLES_256["focus"]))
        out["footer-key-foreground"] = out["accent"]
    return out
