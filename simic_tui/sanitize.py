"""Trainer text made safe for a terminal: every string of a decoded frame, cleaned in place.

Everything on the stream is hostile until proven otherwise (a fake trainer can publish on the
port, a plaintext remote stream can be rewritten on the way). Integers and string lengths are
bounded at decode by the schema's msgspec constraints; this pass then makes every string
displayable: control and format characters removed (escape sequences would rewrite the
terminal's title or clear the screen; bidirectional overrides would reorder what is shown),
tabs and newlines turned into spaces, and anything over ``MAX_CHARS`` cut with ``…``. Dict keys
are cleaned too (they become column names and labels). Widgets render the result as plain text,
never as markup.

The walk is planned once per Struct type (only fields that can hold a string are visited). Almost
every frame is clean, so :func:`sanitize` first gathers every string the cleaning walk would visit
(one generated, flat function per Struct type: no per-field plan lookups, dict keys and string lists
taken whole) and checks them all at once in C; only a frame with something to clean pays for the
cleaning walk, which then visits exactly the same strings.
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
Collector = Callable[[Any, list[str]], None]
_PLANS: dict[type, tuple[tuple[str, Cleaner], ...]] = {}
_ENTRIES: dict[type, tuple[Collector | None, Cleaner | None]] = {}


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
    tp = type(obj)
    entry = _ENTRIES.get(tp)
    if entry is None:
        entry = _ENTRIES[tp] = (_collector(tp), _cleaner(tp))
    collect, cleaner = entry
    if cleaner is None:
        return obj
    if collect is not None:
        texts: list[str] = []
        collect(obj, texts)
        if _all_clean(texts):  # the cleaning walk would change nothing
            return obj
    return cleaner(obj)


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


# ---------------------------------------------------------------------------------------------
# The fast check: every string the cleaning walk visits, gathered by generated code
# ---------------------------------------------------------------------------------------------
# Same type-directed traversal as _cleaner (unions of several string-holding types go through the
# dynamic walk, as they do there); a frame whose gathered strings are all clean is one the cleaning
# walk would leave unchanged, so sanitize returns it as it is.

_NAMESPACE: dict[str, Any] = {}
_COLLECTORS: dict[type, str | None] = {}  # Struct type -> its function's name in _NAMESPACE


def _collector(tp: Any) -> Collector | None:
    """A function appending every string of a ``tp`` value to a list; None when it holds none."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        name = _struct_collector(tp)
        return None if name is None else _NAMESPACE[name]
    lines = _emit("obj", tp, "    ", [0])
    if not lines:
        return None
    src = "def collect(obj, out):\n    app = out.append\n    ext = out.extend\n" + "\n".join(lines)
    scope: dict[str, Any] = {}
    exec(compile(src, "<sanitize collector>", "exec"), _NAMESPACE, scope)
    return scope["collect"]  # type: ignore[no-any-return]


def _struct_collector(tp: type) -> str | None:
    if tp in _COLLECTORS:
        return _COLLECTORS[tp]
    name = f"_collect_{len(_COLLECTORS)}_{tp.__name__}"
    _COLLECTORS[tp] = name  # a recursive type calls itself by name
    body: list[str] = []
    counter = [0]
    for f in msgspec.structs.fields(tp):
        inner = _emit("v", f.type, "    ", counter)
        if inner:
            body.append(f"    v = obj.{f.name}")
            body.extend(inner)
    if not body:
        _COLLECTORS[tp] = None
        return None
    src = f"def {name}(obj, out):\n    app = out.append\n    ext = out.extend\n" + "\n".join(body)
    exec(compile(src, f"<sanitize collector {tp.__name__}>", "exec"), _NAMESPACE)
    return name


def _holds_text(tp: Any) -> bool:
    return _cleaner(tp) is not None


def _emit(var: str, tp: Any, pad: str, counter: list[int]) -> list[str]:
    """Source lines appending the strings of ``var`` (declared type ``tp``, possibly None)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _emit(var, args[0], pad, counter)
    if not _holds_text(tp):
        return []
    if tp is str:
        return [f"{pad}if {var} is not None:", f"{pad}    app({var})"]
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        inner = [a for a in args if a is not type(None) and _holds_text(a)]
        if len(inner) == 1:
            return _emit(var, inner[0], pad, counter)
        return [f"{pad}if {var} is not None:", f"{pad}    _collect_any({var}, out)"]
    counter[0] += 1
    item = f"x{counter[0]}"
    if origin is list:
        if _bare_str(args[0]):
            return [f"{pad}if {var}:", f"{pad}    ext({var})"]
        inner = _emit(item, args[0], pad + "    ", counter)
        return [f"{pad}for {item} in {var} or ():", *inner] if inner else []
    if origin is dict:
        out: list[str] = []
        if _bare_str(args[0]):
            out.append(f"{pad}    ext({var})")
        elif inner := _emit(item, args[0], pad + "        ", counter):
            out += [f"{pad}    for {item} in {var}:", *inner]
        counter[0] += 1
        val = f"x{counter[0]}"
        if len(args) < 2:
            pass
        elif _bare_str(args[1]):
            out.append(f"{pad}    ext({var}.values())")
        elif inner := _emit(val, args[1], pad + "        ", counter):
            out += [f"{pad}    for {val} in {var}.values():", *inner]
        return [f"{pad}if {var}:", *out] if out else []
    name = _struct_collector(tp)
    if name is None:
        return []
    return [f"{pad}if {var} is not None:", f"{pad}    {name}({var}, out)"]


def _bare_str(tp: Any) -> bool:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp is str


def _collect_any(value: Any, out: list[str]) -> None:
    """The dynamic walk's strings (as :func:`_clean_any` visits them)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, msgspec.Struct):
        collect = _collector(type(value))
        if collect is not None:
            collect(value, out)
    elif isinstance(value, list):
        for v in value:
            _collect_any(v, out)
    elif isinstance(value, dict):
        for k, v in value.items():
            _collect_any(k, out)
            _collect_any(v, out)


_NAMESPACE["_collect_any"] = _collect_any
