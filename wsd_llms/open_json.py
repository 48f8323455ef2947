"""Where a JSON text cut short was still open: the array and the string its end lies inside.

A reply cut at its budget inside an array that counts on ([1, 2, 3, ... 37) or a string that
never ends would only run longer with more tokens; a maxItems or maxLength in the schema makes
the grammar close it. The error of such a cut names the array or string (`holding_hint`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .reply import string_end

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# An array of fewer items or a string of fewer characters at the cut is named in no hint: the
# budget was short for it, and raising max_tokens is the remedy.
MANY_ITEMS, LONG_STRING = 8, 256


@dataclass
class _Frame:
    """An open object or array: its JSON path, its current key (object) or values begun (array)."""

    kind: str  # "object" or "array"
    path: str
    key: str | None = None
    expect_key: bool = True  # an object awaiting a key (after "{" or ",")
    items: int = 0
    begun: bool = False  # an array whose current value has begun


@dataclass(frozen=True)
class OpenEnd:
    """The innermost array and the string (a value, not a key) a cut JSON text ends inside, each
    as (JSON path, items begun or characters so far); None where there is none."""

    array: tuple[str, int] | None
    string: tuple[str, int] | None


def _child(frame: _Frame | None) -> str:
    """The path of the value that begins next in `frame` ($ at the top)."""
    if frame is None:
        return "$"
    if frame.kind == "array":
        return f"{frame.path}[{frame.items - 1}]"
    key = frame.key or ""
    return f"{frame.path}.{key}" if _NAME.fullmatch(key) else f"{frame.path}[{json.dumps(key)}]"


def _key(raw: str) -> str:
    try:
        return str(json.loads(raw))
    except json.JSONDecodeError:  # an escape the model wrote wrong: the key as written
        return raw[1:-1]


def open_at_end(text: str) -> OpenEnd:
    """Scan `text` as JSON (the reply's own, so well-formed up to its end) and report what its end
    lies inside."""
    frames: list[_Frame] = []
    i = 0
    while i < len(text):
        c = text[i]
        top = frames[-1] if frames else None
        if c.isspace():
            i += 1
            continue
        if top is not None and top.kind == "array" and not top.begun and c not in ",]":
            top.items, top.begun = top.items + 1, True
        if c == '"':
            is_key = top is not None and top.kind == "object" and top.expect_key
            end = string_end(text, i)
            if end == -1:
                string = None if is_key else (_child(top), len(text) - i - 1)
                return OpenEnd(_innermost_array(frames), string)
            if is_key and top is not None:
                top.key = _key(text[i:end])
            i = end
            continue
        if c in "[{":
            frames.append(_Frame("array" if c == "[" else "object", _child(top)))
        elif c in "]}":
            if frames:
                frames.pop()
        elif c == "," and top is not None:
            top.expect_key, top.key, top.begun = top.kind == "object", None, False
        elif c == ":" and top is not None:
            top.expect_key = False
        i += 1
    return OpenEnd(_innermost_array(frames), None)


def _innermost_array(frames: list[_Frame]) -> tuple[str, int] | None:
    return next(((f.path, f.items) for f in reversed(frames) if f.kind == "array"), None)


def holding_hint(text: str, root: str = "$", owner: str = "the schema") -> str:
    """", or hold the array at $.xs (37 items so far) to a maxItems in the schema ...": what closes
    the long array or string a JSON text cut at its budget ends inside, or "" where it ends in neither.
    Only paths under `root` count (a tool call's "$.arguments"), named from it in `owner` (the
    tool's parameters)."""
    end = open_at_end(text)

    def under_root(path: str) -> str | None:
        return "$" + path[len(root) :] if path == root or path.startswith((root + ".", root + "[")) else None

    parts = []
    if end.string is not None and end.string[1] >= LONG_STRING and (path := under_root(end.string[0])) is not None:
        parts.append(f"the string at {path} ({end.string[1]} characters so far) to a maxLength")
    if end.array is not None and end.array[1] >= MANY_ITEMS and (path := under_root(end.array[0])) is not None:
        parts.append(f"the array at {path} ({end.array[1]} items so far) to a maxItems")
    if not parts:
        return ""
    return f", or hold {' and '.join(parts)} in {owner} (pydantic: Field(max_length=...)), which makes the model close it"
