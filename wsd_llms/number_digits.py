"""A JSON value's open numbers held to so many digits, as llama.cpp's grammars hold them.

xgrammar writes a number the schema leaves unbounded as any count of digits, and a small model
asked for a float wrote "10.000000…" until max_tokens ran out (the embedded pair, asked for a
`temperature_c: float`, in two prompts of five). `digits_capped` rewrites a structural tag
before it is compiled for decoding: each JSON value in it becomes xgrammar's own grammar for its
schema, as text, with the digits of its number rules capped (its built-in one and the copies it
writes under a subschema's name). The spec as sent stays the key of the checks and the caches,
and the check after decoding replays xgrammar's grammar as it builds it, which takes all the
capped one does and more.
"""

from __future__ import annotations

import functools
import json
from typing import Any

# Digits before a number's point, after it, and in its exponent (llama.cpp's 16: a float64 holds 15
# to 17 significant digits). With the exponent any magnitude stays writable. An integer's rule is
# left open: for_grammar holds an integer to 64 bits, and leaves it open only where no 64-bit value
# fits its bounds (a value needs more digits) or beside an enum, a const or a multipleOf.
NUMBER_DIGITS = 16
# xgrammar's number rule's digits, unbounded and capped, as it prints them (0.2.6 to 0.2.9).
_OPEN_DIGITS = (("[0-9]*", f"[0-9]{{0, {NUMBER_DIGITS - 1}}}"), ("basic_number_digits{1, -1}", f"basic_number_digits{{1, {NUMBER_DIGITS}}}"))


@functools.lru_cache(maxsize=256)
def digits_capped(spec: str) -> str:
    """`spec` (a structural tag, as JSON text) with each plain JSON value's schema written as its
    grammar, open numbers' digits capped (built once per spec: a schema's grammar takes a
    millisecond to a tenth of a second)."""
    return json.dumps(_capped(json.loads(spec)))


def _capped(fmt: Any) -> Any:
    if isinstance(fmt, list):
        return [_capped(part) for part in fmt]
    if not isinstance(fmt, dict):
        return fmt
    if fmt.get("type") == "json_schema":  # one JSON value (or other-styled arguments: left as they are, schema and all)
        return _json_grammar(fmt) if fmt.get("style", "json") == "json" and not fmt.get("excludes") else fmt
    return {key: _capped(value) for key, value in fmt.items()}


def _json_grammar(fmt: dict[str, Any]) -> dict[str, Any]:
    """A json_schema format as the grammar format xgrammar would build from it, digits capped;
    the format as it was where xgrammar cannot read that grammar back (it printed what it cannot
    parse), so that decoding goes on as before rather than fails."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(
        json.dumps(fmt["json_schema"]),
        strict_mode=True,
        max_whitespace_cnt=fmt.get("max_whitespace_cnt"),
        any_order=fmt.get("any_order", False),
    )
    text = capped_rules(str(grammar))
    try:
        xgr.Grammar.from_ebnf(text)
    except RuntimeError:
        return fmt
    return {"type": "grammar", "grammar": text}


def capped_rules(ebnf: str) -> str:
    """xgrammar's grammar text with the digits of each number rule capped: its built-in one, and the
    copies it writes under a subschema's own name (a `$defs` entry, a number with a `format` such as
    "double"). A rule is capped where its whole family of lines is the built-in one's, renamed: a
    rule of the schema's own whose name starts alike (`"$ref": "#/basic_numbers"`) is not touched."""
    lines = ebnf.splitlines()
    where = {_rule(line): i for i, line in enumerate(lines)}
    family = _number_family()
    head = next(line for line, _ in family if line.startswith(_BUILT_IN + " ::= "))
    for name, i in list(where.items()):
        if lines[i] != head.replace(_BUILT_IN, name):
            continue
        renamed = [(line.replace(_BUILT_IN, name), capped.replace(_BUILT_IN, name)) for line, capped in family]
        if all(_rule(line) in where and lines[where[_rule(line)]] == line for line, _ in renamed):
            for line, capped in renamed:
                lines[where[_rule(line)]] = capped
    return "\n".join(lines)


def _rule(line: str) -> str:
    """The name a grammar line defines."""
    return line.split(" ::= ", 1)[0]


# The name of xgrammar's number rule, which names its family of lines (`basic_number_2`, `basic_number_digits`).
_BUILT_IN = "basic_number"


@functools.cache
def _number_family() -> tuple[tuple[str, str], ...]:
    """xgrammar's lines for its number rule, as it prints them for any schema, each with its capped
    form (the same where it writes no digits unbounded)."""
    import xgrammar as xgr

    family = []
    for line in str(xgr.Grammar.from_json_schema('{"type": "number"}')).splitlines():
        if _rule(line) == _BUILT_IN or line.startswith(_BUILT_IN + "_"):
            capped = line
            for unbounded, held in _OPEN_DIGITS:
                capped = capped.replace(unbounded, held)
            family.append((line, capped))
    return tuple(family)
