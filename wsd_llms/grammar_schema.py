"""A JSON schema in the form xgrammar holds as JSON Schema means it.

xgrammar's strict mode reads some valid schemas otherwise than JSON Schema does, or refuses them;
`for_grammar` rewrites those forms before a grammar is built (for decoding and for the check's
replay of it). jsonschema's check after decoding always reads the schema as the caller wrote it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections.abc import Iterator
from typing import Any, TypeGuard

from .number_digits import NUMBER_DIGITS

# Keywords whose values are data, or lists of names, not schemas: a "$ref" key inside them is not a reference.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "required", "dependentRequired"})
# Keywords whose values map names to schemas: a name there ("default", say) is no keyword.
SCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas", "dependencies"})  # draft 7's: schemas or lists of names
# Keywords that hold definitions: schemas that count only where a $ref names them.
DEFINITIONS = frozenset({"$defs", "definitions"})

# What an array or an object gives of its members: one that gives none of them takes any.
_ITEMS = ("items", "prefixItems", "unevaluatedItems")
_MEMBERS = ("properties", "patternProperties", "additionalProperties", "unevaluatedProperties", "propertyNames")
# xgrammar's integers are 64-bit: a bound beyond them is left to the check after decoding.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# The open side of a number bounded on one side: the digits before the point that number_digits
# holds an unbounded number to (xgrammar writes a bounded one without an exponent).
_NUMBER_REACH = 10**NUMBER_DIGITS


def for_grammar(schema: Any) -> Any:
    """`schema` (or any part of it) rewritten where xgrammar would read it otherwise than JSON
    Schema does; a copy, the caller's schema untouched."""
    if isinstance(schema, list):
        return [for_grammar(value) for value in schema]
    if not isinstance(schema, dict):
        return schema
    held: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DATA_KEYWORDS:
            held[key] = value
        elif key in SCHEMA_MAPS | DEFINITIONS and isinstance(value, dict):
            held[key] = {_free_end(name) if key == "patternProperties" else name: for_grammar(sub) for name, sub in value.items()}
        else:
            held[key] = for_grammar(value)
    named = schema.get("type")
    types: list[Any] = named if isinstance(named, list) else [named]
    _no_false(schema, held)
    _older_forms(schema, held)
    _open_members(schema, held, types)
    _no_integer_beside_number(held, types)
    _whole_bounds(held, types)
    _number_bounds(held, types)
    _whole_counts(held)
    if isinstance(held.get("pattern"), str):
        _held_pattern(held)
    elif {"minLength", "maxLength"} & held.keys() and isinstance(held.get("format"), str) and _xgrammar_holds_format(held["format"]):
        _lengths_left_to_check(held)
    if held.get("format") == "uri-reference" and not _uri_reference_takes_a_uri():
        held = {"anyOf": [{**held, "format": "uri"}, held]}
    return held


def _no_false(schema: dict[str, Any], held: dict[str, Any]) -> None:
    """A `false` schema left out where leaving it out changes no value: a property that is not
    required, where nothing else admits other names (one the grammar does not list is not
    written), and an anyOf or oneOf branch beside others. xgrammar refused any `false` but a whole
    `items` or `additionalProperties` ("Schema 'false' cannot accept any value", naming no place)."""
    listed = schema.get("required")
    required: list[Any] = listed if isinstance(listed, list) else []
    admits_others = schema.get("additionalProperties", False) is not False or any(k in schema for k in ("patternProperties", "unevaluatedProperties"))
    if isinstance(held.get("properties"), dict) and not admits_others:
        held["properties"] = {name: sub for name, sub in held["properties"].items() if sub is not False or name in required}
    for key in ("anyOf", "oneOf"):
        branches = held.get(key)
        if isinstance(branches, list) and any(branch is not False for branch in branches):
            held[key] = [branch for branch in branches if branch is not False]


# The keywords that count: a whole number written as a float (3.0) is one, which xgrammar refuses.
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains")


def _is_number(value: Any) -> TypeGuard[int | float]:
    """Whether a JSON value is a number (not a bool, which Python counts as one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole_counts(held: dict[str, Any]) -> None:
    """A count written as a whole float (`"maxLength": 3.0`, valid JSON Schema) as an integer:
    xgrammar took the schema at the call, then refused it at the check ("maxLength must be an integer")."""
    for key in _COUNTS:
        value = held.get(key)
        if isinstance(value, float) and value.is_integer():
            held[key] = int(value)


def _older_forms(schema: dict[str, Any], held: dict[str, Any]) -> None:
    """The older drafts' forms xgrammar refuses, in 2020-12's: a tuple's `items` list (drafts 4 to
    7) as prefixItems, with its additionalItems as items; draft 4's boolean exclusiveMinimum and
    exclusiveMaximum as the exclusive bound itself."""
    if isinstance(schema.get("items"), list):
        held["prefixItems"] = held.pop("items")
        if "additionalItems" in held:
            held["items"] = held.pop("additionalItems")
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(schema.get(exclusive), bool) and held.pop(exclusive) and bound in held:
            held[exclusive] = held.pop(bound)


def _open_members(schema: dict[str, Any], held: dict[str, Any], types: list[Any]) -> None:
    """An array that gives no items takes items of any kind, and an object that names no properties
    takes any, as JSON Schema says and as xgrammar does for a bare {"type": "array"}: its strict
    mode otherwise allows no member once the array or object has another keyword (`"maxItems": 3`
    wrote only [], `"minItems": 1` did not compile, `"required": ["a"]` wrote only {})."""
    if "array" in types and not any(key in schema for key in _ITEMS):
        held["items"] = {}
    if "object" in types and not any(key in schema for key in _MEMBERS):
        held["additionalProperties"] = {}


def _finite(value: Any) -> TypeGuard[int | float]:
    """Whether a JSON value is a finite number (an int of any size: math.isfinite overflows on 10**400)."""
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))


def _no_integer_beside_number(held: dict[str, Any], types: list[Any]) -> None:
    """`"type": ["integer", "number"]` as the number it means (every integer is one): xgrammar wrote
    the integer branch with any count of digits, which neither cap reached."""
    if "integer" in types and "number" in types and isinstance(held.get("type"), list):
        held["type"] = [name for name in held["type"] if name != "integer"]


def _whole_bounds(held: dict[str, Any], types: list[Any]) -> None:
    """An integer's bounds as xgrammar takes them: inclusive whole numbers within 64 bits (it refused
    `"minimum": 1.5` "Integer constraint must be a whole number", a float bound near 2**63 "due to
    precision loss", an exclusive one at the edge "would cause integer underflow"). A side the
    schema leaves open, or bounds beyond 64 bits (an OpenAPI uint64's maximum), is held at 64 bits,
    as llama.cpp caps a number's digits: a small model asked for an `int` wrote "10000000..." until
    max_tokens ran out. Beside an enum, a const or a multipleOf (which xgrammar drops beside a range)
    no side is held and a bound beyond 64 bits is left to the check; so are the bounds where no 64-bit
    value fits (`"minimum": 2**64`)."""
    if "integer" not in types or "number" in types:
        return
    lows: list[int] = []
    highs: list[int] = []
    for key, whole in (("minimum", math.ceil), ("exclusiveMinimum", lambda v: math.floor(v) + 1), ("maximum", math.floor), ("exclusiveMaximum", lambda v: math.ceil(v) - 1)):
        value = held.get(key)
        if _finite(value):
            del held[key]
            (lows if "inimum" in key else highs).append(int(whole(value)))
    low, high = max(lows, default=_INT64_MIN), min(highs, default=_INT64_MAX)
    if low > _INT64_MAX or high < _INT64_MIN:
        return
    if not {"enum", "const", "multipleOf"} & held.keys():
        held["minimum"], held["maximum"] = max(low, _INT64_MIN), min(high, _INT64_MAX)
        return
    if lows and low >= _INT64_MIN:
        held["minimum"] = low
    if highs and high <= _INT64_MAX:
        held["maximum"] = high


def _number_bounds(held: dict[str, Any], types: list[Any]) -> None:
    """A number bounded on one side held within ±10^16 on the other: xgrammar writes its whole part
    as any count of digits (with 6 decimals at most), which a small model may run on with as it did
    with an open integer. Not beside an enum, a const or a multipleOf, nor where the bound lies past
    half that reach (xgrammar reads bounds as floats: 9999999999999999 is 1e16, and an exclusive
    bound there would leave no value). A bound beyond a float's range is left to the check."""
    if "number" not in types:
        return
    for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        if isinstance(held.get(key), int) and abs(held[key]) > sys.float_info.max:  # xgrammar reads a float: refused without a word
            del held[key]  # left to the check; a value past it is written with an exponent
    if {"enum", "const", "multipleOf"} & held.keys():
        return
    lows = [held[key] for key in ("minimum", "exclusiveMinimum") if _finite(held.get(key))]
    highs = [held[key] for key in ("maximum", "exclusiveMaximum") if _finite(held.get(key))]
    if lows and not highs and max(lows) <= _NUMBER_REACH / 2:
        held["maximum"] = _NUMBER_REACH
    elif highs and not lows and min(highs) >= -_NUMBER_REACH / 2:
        held["minimum"] = -_NUMBER_REACH


def _held_pattern(held: dict[str, Any]) -> None:
    """A string's pattern as xgrammar should hold it (`_lengths_in_pattern`, `_free_end`), and its
    lengths left to the check (`_lengths_left_to_check`)."""
    held["pattern"] = _free_end(_lengths_in_pattern(held["pattern"], held.get("minLength"), held.get("maxLength")))
    _lengths_left_to_check(held)


def _lengths_left_to_check(held: dict[str, Any]) -> None:
    """A string's lengths left out of xgrammar's schema where it holds none (beside a pattern or a
    format it knows), and said so on stderr at each build: they are checked after decoding. A range
    no string has stays, for xgrammar to refuse by name."""
    low, high = held.get("minLength"), held.get("maxLength")
    if not (_is_number(low) and _is_number(high) and low > high):
        held.pop("minLength", None)
        held.pop("maxLength", None)


# The largest count folded into a pattern: xgrammar builds {1,1000} in 0.04-0.08 s, {1,4000} in 0.7 s,
# {1,20000} in 25 s (at the call, and again for each reply's check).
FOLDED_LENGTH_MAX = 1000
# A pattern that is one repeated character: a class, a class escape or any character, starred or plussed,
# anchored at both ends or at neither (xgrammar matches it whole).
_ONE_REPEATED = re.compile(r"(?P<start>\^?)(?P<atom>\[(?:\\.|[^\]\\])+\]|\\[dDwWsS]|\.)(?P<times>[*+])(?P<end>\$?)")


def _lengths_in_pattern(pattern: str, min_length: Any, max_length: Any) -> str:
    """A pattern of one repeated character (`^[a-z0-9-]+$`) with the string's minLength and maxLength
    as its count (`^[a-z0-9-]{1,63}$`): beside a pattern, xgrammar holds no length, so a slug with
    `max_length=63` could run on until max_tokens. Other patterns are left as they are, and so are
    counts beyond FOLDED_LENGTH_MAX, or a range no string has (xgrammar says so of the lengths)."""
    lengths = [n if isinstance(n, int) and not isinstance(n, bool) else None for n in (min_length, max_length)]
    match = _ONE_REPEATED.fullmatch(pattern)
    if match is None or lengths == [None, None] or bool(match["start"]) != bool(match["end"]):
        return pattern
    low, high = max(lengths[0] or 0, 1 if match["times"] == "+" else 0), lengths[1]
    if max(low, high or 0) > FOLDED_LENGTH_MAX or (high is not None and low > high):
        return pattern
    return f"{match['start']}{match['atom']}{{{low},{'' if high is None else high}}}{match['end']}"


def _free_end(pattern: str) -> str:
    """A pattern anchored at one end only, free at the other, as JSON Schema's search reads it:
    xgrammar matches a pattern against the whole string, so "^https?://" allowed only "http://"
    and "https://". A pattern anchored at neither end (or at both, or with a top-level `|`, or an
    anchor inside, which xgrammar ignores) is left whole, as the README says."""
    marks = list(_marks(pattern))
    last = len(pattern) - 1
    if any((ch == "|" and depth == 0) or (ch in "^$" and i not in (0, last)) for i, ch, depth in marks):
        return pattern
    found = {(i, ch) for i, ch, _ in marks}
    starts, ends = (0, "^") in found, (last, "$") in found
    if starts and not ends:
        return pattern + ".*"
    if ends and not starts:
        return ".*" + pattern
    return pattern


def _marks(pattern: str) -> Iterator[tuple[int, str, int]]:
    """(index, character, group depth) of each `^`, `$` and `|` that is neither escaped nor in a class."""
    depth, in_class, escaped = 0, False, False
    for i, ch in enumerate(pattern):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch in "^$|":
            yield i, ch, depth


@functools.cache
def _uri_reference_takes_a_uri() -> bool:
    """Whether xgrammar's `uri-reference` takes an absolute URI: 0.2.9's takes only relative ones
    (any URI is a URI reference), so a `uri-reference` is held as either a `uri` or one of those."""
    return xgrammar_takes({"type": "string", "format": "uri-reference"}, '"https://example.com/a"')


@functools.lru_cache(maxsize=256)
def _xgrammar_holds_format(name: str) -> bool:
    """Whether xgrammar holds the string format `name` (`email`, `date`, ...): its grammar differs
    from that of a format no one knows, which xgrammar writes as any string, and holds lengths for.
    A name xgrammar cannot read (a lone surrogate) is left for the schema's compile to refuse by name."""
    try:
        return _string_grammar(name) != _string_grammar("x-wsd-llms-unknown")
    except RuntimeError:
        return False


def _string_grammar(format_name: str) -> str:
    """xgrammar's grammar, as text, for a string of the format `format_name`."""
    import xgrammar as xgr

    return str(xgr.Grammar.from_json_schema(json.dumps({"type": "string", "format": format_name})))


def xgrammar_takes(schema: dict[str, Any], text: str) -> bool:
    """Whether xgrammar's own grammar for `schema`, as written, takes `text`: a probe of what the
    installed version holds."""
    import xgrammar as xgr

    return bool(xgr.testing._is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema)), text))


def pointed(schema: Any, ref: str) -> Any:
    """What a local reference ("#/$defs/Item", or "#" for the whole) names in `schema`, or None
    where it names nothing there."""
    if not ref.startswith("#"):
        return None
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(schema, dict) and part in schema:
            schema = schema[part]
        elif isinstance(schema, list) and part.isdigit() and int(part) < len(schema):
            schema = schema[int(part)]
        else:
            return None
    return schema
