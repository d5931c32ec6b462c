"""Trainer text made safe for a terminal: every string of a decoded frame, cleaned in place.

Everything on the stream is hostile until proven otherwise (a fake trainer can publish on the
port, a plaintext remote stream can be rewritten on the way). Integers and string lengths are
bounded at decode by the schema's msgspec constraints; this pass then makes every string
displayable: control and format characters removed (escape sequences would rewrite the
terminal's title or clear the screen; bidirectional overrides would reorder what is shown),
tabs and newlines turned into spaces, and anything over ``MAX_CHARS`` cut with ``…``. Dict keys
are cleaned too (they become column names and labels). Widgets render the result as plain text,
never as markup.

The walk is planned once per Struct type (only fields that can hold a string are visited), so a
snapshot costs a few microseconds per string.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["MAX_CHARS", "clean_text", "sanitize"]

MAX_CHARS = 512
_SPACES = str.maketrans({"\t": " ", "\n": " ", "\r": " ", "\v": " ", "\f": " "})

Cleaner = Callable[[Any], Any]
_PLANS: dict[type, tuple[tuple[str, Cleaner], ...]] = {}


def clean_text(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` without control or format characters, at most ``limit`` characters (``…`` ends a cut)."""
    if len(text) <= limit and text.isprintable():
        return text
    if len(text) > 4 * limit:  # never scan megabytes to show 512 characters
        text = text[: 4 * limit + 1]
    text = text.translate(_SPACES)
    if not text.isprintable():
        text = "".join(ch for ch in text if ch.isprintable())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def sanitize(obj: Any) -> Any:
    """Clean every string reachable from ``obj`` (a msgspec Struct, list or dict); returns it."""
    cleaner = _cleaner(type(obj))
    return obj if cleaner is None else cleaner(obj)


def _clean_struct(obj: Any) -> Any:
    for name, fn in _struct_plan(type(obj)):
        value = getattr(obj, name)
        if value is not None:
            setattr(obj, name, fn(value))
    return obj


def _struct_plan(tp: type) -> tuple[tuple[str, Cleaner], ...]:
    plan = _PLANS.get(tp)
    if plan is None:
        _PLANS[tp] = ()  # a recursive type sees an empty plan while its own is being built
        out = []
        for f in msgspec.structs.fields(tp):
            fn = _cleaner(f.type)
            if fn is not None:
                out.append((f.name, fn))
        plan = _PLANS[tp] = tuple(out)
    return plan


def _cleaner(tp: Any) -> Cleaner | None:
    """A function cleaning a value of declared type ``tp``; None when it can hold no string."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _cleaner(args[0])
    if tp is str:
        return clean_text
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        inner = [fn for a in args if a is not type(None) and (fn := _cleaner(a)) is not None]
        if not inner:
            return None
        if len(inner) == 1:
            only = inner[0]
            return lambda v: None if v is None else only(v)
        return lambda v: _clean_any(v)
    if origin is list:
        item = _cleaner(args[0]) if args else None
        if item is clean_text:
            return lambda v: v if _all_clean(v) else [clean_text(x) for x in v]
        return None if item is None else (lambda v: [item(x) for x in v])
    if origin is dict:
        key = _cleaner(args[0]) if args else None
        val = _cleaner(args[1]) if len(args) > 1 else None
        if key is None and val is None:
            return None
        if val is None:  # the common case: str -> number; rebuilt only when a key needs cleaning
            return lambda d: d if _all_clean(d) else {clean_text(k): v for k, v in d.items()}
        kf = key or (lambda k: k)
        return lambda d: {kf(k): val(v) for k, v in d.items()}
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        _struct_plan(tp)
        return _clean_struct
    return None


def _all_clean(texts: Any) -> bool:
    """Every string of ``texts`` (a list, or a dict's keys) needs no cleaning (checked in C)."""
    return not texts or ("".join(texts).isprintable() and max(map(len, texts)) <= MAX_CHARS)


def _clean_any(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, msgspec.Struct):
        return _clean_struct(value)
    if isinstance(value, list):
        return [_clean_any(v) for v in value]
    if isinstance(value, dict):
        return {_clean_any(k): _clean_any(v) for k, v in value.items()}
    return value
