"""Where a JSON text cut short was still open, and what in its schema would have closed it.

A small model may fill an array on and on ([1, 2, 3, ... 31 for "count from one to five") or a
string past any use; a reply cut there at its budget may only run longer with more tokens, while
a maxItems or maxLength in the schema makes the grammar close it. The error of such a cut names
the array or string and that keyword (`holding_hint`).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from .grammar_schema import pointed
from .reply import string_end

# An array of fewer items or a string of fewer characters at the cut is named in no hint: the
# budget was short for it, and raising max_tokens is the remedy.
MANY_ITEMS, LONG_STRING = 8, 256

# Keys beside a $ref that say nothing of the values it takes.
_ANNOTATIONS = frozenset({"$ref", "description", "title", "default", "examples", "deprecated"})

Path = tuple[str | int, ...]  # keys and indices from the top value down


@dataclass
class _Frame:
    """An open object or array: where it lies in its parent, its current key (object) or values begun (array)."""

    kind: str  # "object" or "array"
    parent: _Frame | None
    element: str | int | None  # its key or index in the parent; None at the top
    key: str | None = None
    expect_key: bool = True  # an object awaiting a key (after "{" or ",")
    items: int = 0
    begun: bool = False  # an array whose current value has begun

    def path(self) -> Path:
        """Its keys and indices from the top, gathered only when asked for (each frame keeps its own)."""
        elements, frame = deque[str | int](), self
        while frame.parent is not None:
            elements.appendleft(frame.element)  # type: ignore[arg-type]
            frame = frame.parent
        return tuple(elements)

    def child(self) -> str | int:
        """The key or index of the value that begins next in it."""
        return self.items - 1 if self.kind == "array" else self.key or ""


@dataclass(frozen=True)
class OpenEnd:
    """What a cut JSON text ends inside: its open objects and arrays (outermost first), and the
    string (a value, not a key) with its characters so far, if any."""

    frames: tuple[_Frame, ...]
    string: tuple[Path, int] | None


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
                where = () if top is None else (*top.path(), top.child())
                return OpenEnd(tuple(frames), None if is_key else (where, _chars(text[i:])))
            if is_key and top is not None:
                top.key = _decoded(text[i:end])
            i = end
            continue
        if c in "[{":
            frames.append(_Frame("array" if c == "[" else "object", top, None if top is None else top.child()))
        elif c in "]}":
            if frames:
                frames.pop()
        elif c == "," and top is not None:
            top.expect_key, top.key, top.begun = top.kind == "object", None, False
        elif c == ":" and top is not None:
            top.expect_key = False
        i += 1
    return OpenEnd(tuple(frames), None)


def _decoded(quoted: str) -> str:
    try:
        return str(json.loads(quoted, strict=False))
    except json.JSONDecodeError:  # an escape the model wrote wrong: the text as written
        return quoted[1:-1]


def _chars(opened: str) -> int:
    """How many characters a string cut short holds so far (its escapes decoded, as maxLength counts)."""
    for end in range(len(opened), max(len(opened) - 6, 0), -1):  # a cut escape ("\u00" of "\u00e9") left out
        try:
            return len(json.loads(opened[:end] + '"', strict=False))
        except json.JSONDecodeError:
            continue
    return len(opened) - 1


def json_path(path: Path) -> str:
    """A path as jsonschema writes it in its errors ($.a, $['b c'], $[0]), so hints and checks read alike."""
    import jsonschema  # type: ignore[import-untyped]

    return str(jsonschema.exceptions.ValidationError("", path=deque(path)).json_path)


def holding_hint(text: str, schema: Any, root: Path = (), owner: str = "the schema") -> str:
    """What would close the long array or string a JSON text cut at its budget ends inside ("; or
    hold the array at $.xs (31 items so far) to a maxItems in the schema ..."), or "" where there
    is none. Only places under `root` (a tool call's ("arguments",)) whose subschema in `schema` is
    plain enough to say count: a maxLength beside a pattern or a format may not be held (README),
    and an array that must reach more items than it has would not close sooner."""
    end = open_at_end(text)
    parts = []
    if end.string is not None and end.string[1] >= LONG_STRING and end.string[0][: len(root)] == root:
        path, chars = end.string[0][len(root) :], end.string[1]
        held = subschema(schema, path, "string")
        if held is not None and not {"pattern", "format"} & held.keys():
            parts.append(f"the string at {json_path(path)} ({chars} characters so far) to a {_keyword(held, 'maxLength')}")
    inside = end.frames[len(root) :] if tuple(f.element for f in end.frames[1 : len(root) + 1]) == root else ()
    array = next((f for f in reversed(inside) if f.kind == "array" and f.items >= MANY_ITEMS), None)  # the innermost long one
    if array is not None:
        path = array.path()[len(root) :]
        held = subschema(schema, path, "array")
        if held is not None and not (isinstance(held.get("minItems"), int) and held["minItems"] > array.items):
            parts.append(f"the array at {json_path(path)} ({array.items} items so far) to a {_keyword(held, 'maxItems')}")
    if not parts:
        return ""
    them = "them" if len(parts) > 1 else "it"
    return f"; or hold {' and '.join(parts)} in {owner} (pydantic: Field(max_length=...)), which makes the model close {them}"


def _keyword(held: dict[str, Any], name: str) -> str:
    """The keyword to give (maxItems), or to lower where the schema has it already (maxItems below its 100)."""
    return f"{name} below its {held[name]}" if isinstance(held.get(name), int) else name


def subschema(schema: Any, path: Path, kind: str) -> dict[str, Any] | None:
    """The subschema that a value of JSON type `kind` at `path` meets, following properties, items,
    local $refs, and anyOf/oneOf where one branch alone takes that type; None where the schema does
    not say plainly (an allOf, a remote $ref, a value it leaves open)."""
    node: Any = schema
    for element in path:
        node = _of_kind(schema, node, "array" if isinstance(element, int) else "object")
        if node is None:
            return None
        if isinstance(element, int):
            prefix = node.get("prefixItems")
            node = prefix[element] if isinstance(prefix, list) and element < len(prefix) else node.get("items")
        else:
            properties = node.get("properties")
            node = properties[element] if isinstance(properties, dict) and element in properties else node.get("additionalProperties")
    return _of_kind(schema, node, kind)


def _of_kind(root: Any, node: Any, kind: str, depth: int = 0) -> dict[str, Any] | None:
    """`node` (its $ref followed) where it takes values of JSON type `kind`, or its one anyOf/oneOf
    branch that does."""
    if not isinstance(node, dict) or depth > 32:  # a $ref cycle ends here
        return None
    ref = node.get("$ref")
    if isinstance(ref, str):
        return _of_kind(root, pointed(root, ref), kind, depth + 1) if set(node) <= _ANNOTATIONS else None  # else: an allOf in all but name
    branches = node.get("anyOf", node.get("oneOf"))
    if isinstance(branches, list):
        found = [b for b in (_of_kind(root, branch, kind, depth + 1) for branch in branches) if b is not None]
        return found[0] if len(found) == 1 else None
    types = node.get("type")
    return node if types == kind or (isinstance(types, list) and kind in types) else None
