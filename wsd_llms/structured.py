"""Grammar-constrained decoding with xgrammar (the optional extra `structured`).

A request's constraint is one xgrammar structural tag (a JSON string, built by `constraint_spec`),
compiled once per (tokenizer, spec). Each model gets its own `Guide`: a matcher over its own
tokenizer that masks the logits a program receives and follows the tokens it chooses.

The base model's guide is fed only the reply's kept draft ids (`Guide.sync`, which rolls back to
the common prefix first) and then its own continuation, so its state depends on the kept ids
alone: a rollback of the online scorer cannot leave it out of step. If the base matcher rejects
a kept id (the draft text re-tokenized into base ids the grammar does not accept), the kept draft
is cut before that id, in both engines alike.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import math
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import copy_of
from .grammar_schema import DATA_KEYWORDS, DEFINITIONS, SCHEMA_MAPS, for_grammar, pointed, xgrammar_takes
from .number_digits import NUMBER_DIGITS, digits_capped
from .open_json import holding_hint
from .params import GenerationParams

if TYPE_CHECKING:  # for annotations only: parsing replies and checking schemas need neither torch nor the models
    import torch

    from .loading import LoadedModel

EXTRA_HINT = "pip install 'wsd-llms[structured]'"
# The first xgrammar with what this module calls: from_json_schema's any_order, structural tags as one JSON spec.
XGRAMMAR_MIN = (0, 2, 5)
# Whitespace allowed between JSON elements: one, so a small model cannot loop on blank space.
MAX_JSON_WHITESPACE = 1


def require_xgrammar() -> Any:
    """The xgrammar module, or an ImportError that names the extra to install (which also brings
    jsonschema, that checks a reply's JSON after decoding: needed from the call on, not after it)."""
    try:
        import jsonschema  # type: ignore[import-untyped]  # noqa: F401
        import xgrammar
    except ImportError as exc:
        raise ImportError(
            f"tools and response_format need grammar-constrained decoding, which needs xgrammar and jsonschema "
            f"({exc.name} is missing): {EXTRA_HINT}"
        ) from exc
    try:
        version = importlib.metadata.version("xgrammar")
    except importlib.metadata.PackageNotFoundError:  # a build without package metadata: no version to check
        return xgrammar
    _check_version(version)
    return xgrammar


@functools.cache
def _check_version(version: str) -> None:
    """Refuse an xgrammar older than XGRAMMAR_MIN (one that satisfies another package's older pin):
    it would fail each request only once its reply is decoded, with a TypeError that names nothing."""
    release = tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])
    if release < XGRAMMAR_MIN:
        wanted = ".".join(map(str, XGRAMMAR_MIN))
        raise ImportError(
            f"tools and response_format need xgrammar>={wanted}, and this environment has xgrammar {version}: "
            f"pip install -U 'xgrammar>={wanted}' (or {EXTRA_HINT})"
        )


def json_format(schema: dict[str, Any]) -> dict[str, Any]:
    """A structural-tag format that matches one JSON value of `schema`."""
    return {"type": "json_schema", "json_schema": for_grammar(schema), "max_whitespace_cnt": MAX_JSON_WHITESPACE}


def schema_error(text: str, value: Any, schema: dict[str, Any]) -> str | None:
    """Why the JSON `text` (parsed: `value`) does not fit `schema`, or None.

    First xgrammar's grammar for the schema (what decoding enforced), on the text as the model
    wrote it: a number re-spelt by Python (0.00001 as 1e-05) may not fit a grammar with numeric
    bounds, which writes no exponents. Then jsonschema on the value, for the keywords the grammar
    does not enforce (uniqueItems, multipleOf, not, if/then, oneOf's exclusivity, ...).
    """
    xgr = require_xgrammar()
    if not xgr.testing._is_grammar_accept_string(_replay_grammar(json.dumps(schema)), text.strip()):
        return f"{text.strip()} does not match the JSON schema"
    return _validation_error(value, schema)


@functools.lru_cache(maxsize=256)
def _replay_grammar(schema: str) -> Any:
    """xgrammar's grammar for a schema (as JSON text), built once for the checks of every reply to
    it: a string pattern with a count of 1000 takes 0.08 s to build."""
    return require_xgrammar().Grammar.from_json_schema(json.dumps(for_grammar(json.loads(schema))), strict_mode=True, any_order=True)


def _validation_error(value: Any, schema: dict[str, Any]) -> str | None:
    """jsonschema's most relevant complaint about `value`, or None. References resolve only within
    the schema (nothing is fetched); a reference it cannot resolve, or a pattern in a syntax
    Python's re lacks, leaves the value unchecked there, as the grammar left it or enforced it.
    Formats are checked where the grammar writes their syntax but not their sense (_format_checker)."""
    import jsonschema
    import referencing.exceptions

    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, registry=referencing.Registry(), format_checker=_format_checker())
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except (referencing.exceptions.Unresolvable, re.error):  # a pattern Python's re cannot read: the grammar held it
        return None
    if error is None:
        return None
    return f"{error.message} (at {error.json_path}, keyword {error.validator!r})"


@functools.cache
def _format_checker() -> Any:
    """The formats checked after decoding, the same whatever optional packages are installed:
    jsonschema's date (its calendar: the grammar allows "2023-02-30"), email, IPv4, IPv6 and UUID,
    and a date-time's date likewise."""
    import jsonschema

    checker = jsonschema.FormatChecker(formats=("date", "email", "ipv4", "ipv6", "uuid"))

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str) or not re.match(r"\d{4}-\d{2}-\d{2}[Tt ]", value):
            return True  # the grammar holds the syntax
        datetime.date.fromisoformat(value[:10])
        return True

    return checker


class Written(str):
    """A JSON number kept as written (json.loads(..., parse_float=Written, parse_int=Written))."""


def as_written(value: Any) -> str:
    """JSON text for a value parsed with its numbers kept as written (`Written`)."""
    if isinstance(value, Written):
        return str.__str__(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {as_written(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(as_written(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def load_json(text: str, **kwargs: Any) -> Any:
    """json.loads, where JSON nested too deeply for Python's parser is a ValueError, as other JSON
    that does not parse is (json.loads raises RecursionError for it), and so are a number beyond a
    float's range (json.loads reads 1e999 as inf, which JSON cannot write again) and the NaN and
    Infinity that JSON does not have. Strings may hold raw control characters: xgrammar's rule for
    a string with minLength/maxLength lets them through (a tab, say), and the value they spell is
    plain; a value written out again (`as_written`) escapes them."""
    try:
        return json.loads(text, strict=False, **{"parse_float": _finite, "parse_constant": _no_constant, **kwargs})
    except RecursionError:
        raise ValueError("it is nested too deeply to parse") from None


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text} is beyond the range of a 64-bit float")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> str:
    """`text` as JSON a strict parser (pydantic's) takes: a raw control character in a string (see
    `load_json`) escaped, numbers as written; text that is not JSON comes back as it is, for that
    parser to say what is wrong with it."""
    try:
        return as_written(load_json(text, parse_float=Written, parse_int=Written))
    except (ValueError, RecursionError):  # as_written recurses: nesting Python's parser takes can be too deep for it
        return text


def parse_json(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """The reply as a JSON value and why it does not validate against `schema` (None if it does)."""
    try:
        value, repeated = load_reply_json(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return None, f"the reply is not valid JSON: {exc}"
    return value, repeated or schema_error(text, value, schema)


def load_reply_json(text: str) -> tuple[Any, str | None]:
    """A model's JSON `text` parsed (load_json), and why it does not say one value, or None: an
    object that writes a key twice, of which the value keeps only the last, dropping the others
    without a word. A grammar for a map (additionalProperties, patternProperties) lets a model
    write a key again."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(items)
        if len(value) < len(items):
            keys = [key for key, _ in items]
            repeated.extend(key for i, key in enumerate(keys) if key in keys[:i])
        return value

    value = load_json(text, object_pairs_hook=pairs)
    if not repeated:
        return value, None
    return value, f"the key {repeated[0]!r} is written more than once in one object, and JSON keeps only its last value"


@dataclass(frozen=True)
class Cut:
    """What cut a reply short, and what to do about it, for the errors of a JSON value or a call it
    cut short: max_tokens, the model's context window (which capped max_tokens), or a stop string."""

    limit: str  # "the reply used up max_tokens=80"
    remedy: str  # "raise max_tokens"
    by_budget: bool = True  # max_tokens or the context window; False: a stop string

    def remedy_for(self, json_text: str, schema: Any, root: tuple[str, ...] = (), owner: str = "the schema") -> str:
        """The remedy for a JSON text this cut ended, with what in its schema would have closed its
        long array or string where the budget cut it (more tokens may only have run them on)."""
        return self.remedy + (holding_hint(json_text, schema, root, owner) if self.by_budget else "")


def structured_fields(text: str, params: GenerationParams, cut: Cut | None = None) -> dict[str, Any]:
    """The WSDResult fields a constrained reply adds: content, tool calls, the parsed JSON value.
    With tools and a response_format, a reply that calls tools is calls, any other the value.
    `cut`: what cut the reply short (its budget or a stop string), if anything did."""
    from .tools import parse_reply, reads_as_calls

    if params.calls_tools and reads_as_calls(text, params.response_format is not None):  # "none": no calls, whatever the text says
        content, calls, invalid = parse_reply(text, params.tools, cut)
        return {"content": content, "tool_calls": tuple(calls), "invalid_tool_calls": tuple(invalid)}
    if params.text_format:
        return {"content": text}
    if params.response_format is not None:
        parsed, error = parse_json(text, params.response_format)
        if cut is not None and parsed is None and error is not None:
            error = f"{cut.limit} before its JSON was complete ({error}); {cut.remedy_for(text, params.response_format)}"
        elif cut is not None and _number_at_end(text, parsed):  # "12" of 1234: whole as JSON, not as written
            error = f"{cut.limit} right after the number {text.strip()}, which may not be whole; {cut.remedy}"
        return {"content": text, "parsed": parsed if error is None else None, "parse_error": error}  # never an invalid value as parsed
    return {"content": text}


def _number_at_end(text: str, value: Any) -> bool:
    """Whether the reply is a number it ends with, which a cut may have ended before its last digit
    (a cut value of any other kind does not parse, or is whole: it ends with a closing mark)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and text == text.rstrip()


def constraint_spec(params: GenerationParams) -> str | None:
    """The request's constraint as a structural-tag JSON string, or None when it has none."""
    from .tools import tool_call_format  # tools imports this module

    answer = params.response_format
    if answer is None:
        fmt = tool_call_format(params) if params.calls_tools else None
    elif answer.get("type") == "structural_tag":
        fmt = answer["format"]
    elif answer.get("type") == "regex":
        fmt = {"type": "regex", "pattern": answer["pattern"]}
    else:
        fmt = json_format(answer)
    if fmt is None:
        return None
    if answer is not None and params.calls_tools:  # tool calls, or the answer in its format
        fmt = {"type": "or", "elements": [tool_call_format(params), fmt]}
    return json.dumps({"type": "structural_tag", "format": fmt})  # key order is the schema's property order


def grammar_error(params: GenerationParams) -> str | None:
    """Why the request's constraint cannot be compiled (a bad regex, an unsupported schema) or a
    schema of it is not a valid JSON schema, naming the tool whose schema fails, or None; checked
    before the request is queued, without a tokenizer."""
    require_xgrammar()
    try:
        return _grammar_error(params)
    except RecursionError:  # jsonschema's check of a schema recurses (Python's limit: about 150 levels of `items`)
        return "it is nested too deeply to check; nest it less"


def _grammar_error(params: GenerationParams) -> str | None:
    if (outside := _unfollowed_error(params)) is not None:
        return outside
    if (spec := constraint_spec(params)) is None:
        return None
    if (reason := _build_error(spec)) is not None:
        for i, tool in enumerate(params.tools if params.response_format is None else ()):
            own = _build_error(_schema_spec(tool["parameters"]))
            if own is not None:
                return f"it cannot be compiled into a grammar: tools[{i}] ({tool['name']}) parameters: {own}{_where(json.dumps(tool['parameters']), own)}"
        schema = params.response_format if params.response_format is not None and not params.text_format else None
        return f"it cannot be compiled into a grammar: {reason}{_where(json.dumps(schema), reason) if schema is not None else ''}"
    return _schemas_error(params)


def _schema_spec(schema: dict[str, Any]) -> str:
    """A structural tag (as JSON text) of one JSON value of `schema`."""
    return json.dumps({"type": "structural_tag", "format": json_format(schema)})


# How long _where builds a schema's subschemas on their own, at most: most take a millisecond, one
# with long bounded strings a tenth of a second.
WHERE_SECONDS = 1.0


@functools.lru_cache(maxsize=256)
def _where(schema: str, reason: str) -> str:
    """" (at $.path)" for the deepest subschema of a schema (as JSON text: a service sends the same
    one with every request) that xgrammar refuses on its own for the same `reason` (its messages
    name no place: "Value must be a number"), or "" where none does. Each is built alone, so one
    whose $ref leads to the fault fails otherwise, and the definition is named."""
    found, until = "", time.monotonic() + WHERE_SECONDS
    for path, subschema in _used_subschemas(json.loads(schema)):
        if time.monotonic() > until:
            break
        if path.count(".") + path.count("[") <= found.count(".") + found.count("["):  # the root, or no deeper
            continue
        try:
            require_xgrammar().Grammar.from_structural_tag(_schema_spec(subschema))
        except RuntimeError as exc:
            if _xgrammar_reason(exc) == reason:
                found = path
    return f" (at {found})" if found else ""


# The checks' grammar builds, by structural-tag spec: xgrammar's reason a spec cannot be built, or
# None, for the last BUILT_SPECS specs; and the builds under way, which a request with the same new
# spec waits for rather than builds again.
BUILT_SPECS = 256
_built: OrderedDict[str, str | None] = OrderedDict()
_building: dict[str, Future[str | None]] = {}
_built_lock = threading.Lock()


def _build_error(spec: str) -> str | None:
    """xgrammar's reason a structural tag (as JSON text) cannot be built into a grammar, or None.
    Built once per spec: this check runs at the call (on an event loop for astream), where a schema
    with long bounded strings (`maxLength` 2000, say) takes 0.1 s and more to build, and a service
    sends the same schema with every request."""
    with _built_lock:
        if spec in _built:
            _built.move_to_end(spec)
            return _built[spec]
        pending = _building.get(spec)
        if pending is None:  # this request builds it
            _building[spec] = Future()
    if pending is not None:  # the builder's failure, as an error of this caller's own
        if (failure := pending.exception()) is not None:
            raise copy_of(failure)
        return pending.result()
    failure = None
    try:
        require_xgrammar().Grammar.from_structural_tag(spec)
        reason = None
    except RuntimeError as exc:
        reason = _xgrammar_reason(exc)
    except BaseException as exc:  # not xgrammar's word on the spec: each waiting request hears it (a copy), and nothing is kept
        failure = exc
    with _built_lock:
        if failure is None:
            _built[spec] = reason
            while len(_built) > BUILT_SPECS:
                _built.popitem(last=False)
        built = _building.pop(spec)
    if failure is not None:
        built.set_exception(failure)
        raise failure
    built.set_result(reason)
    return reason


def grammar_known(params: GenerationParams) -> bool:
    """Whether the check of this request's grammar needs no build (its spec was built already)."""
    with _built_lock:
        return constraint_spec(params) in _built


def _request_schemas(params: GenerationParams) -> list[tuple[str, dict[str, Any]]]:
    """The request's JSON schemas, each with where it is for an error: its response_format's and
    its tools' parameters."""
    schemas = [] if params.response_format is None or params.text_format else [("", params.response_format)]
    if params.calls_tools:
        schemas += [(f"tools[{i}] ({tool['name']}) parameters: ", tool["parameters"]) for i, tool in enumerate(params.tools)]
    return schemas


def _subschemas(schema: Any, path: str = "$") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, subschema) for the schema and every schema inside it, data (an enum's values) and
    definitions left out (see _used_subschemas)."""
    if isinstance(schema, dict):
        yield path, schema
        for key, value in schema.items():
            if key in DEFINITIONS:
                continue
            if key in SCHEMA_MAPS and isinstance(value, dict):
                for name, subschema in value.items():
                    yield from _subschemas(subschema, f"{path}.{key}.{name}")
            elif key not in DATA_KEYWORDS:
                yield from _subschemas(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _subschemas(value, f"{path}[{i}]")


def _used_subschemas(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, subschema) for every schema a value may be held to: the schema's own, and the
    definitions its $refs reach (each once); a definition nothing uses is never compiled."""
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("$", schema)]
    while todo:
        path, root = todo.pop()
        for sub_path, subschema in _subschemas(root, path):
            yield sub_path, subschema
            ref = subschema.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/") and (target := pointed(schema, ref)) is not None and id(target) not in seen:
                seen.add(id(target))
                todo.append(("$" + ref[1:].replace("/", "."), target))


def _unfollowed(schema: dict[str, Any], path: str) -> str | None:
    """Why xgrammar would not hold a value to this subschema, where it would say nothing and leave
    the value unconstrained (or allow none that validates), or None:
    - a `$ref` that is no JSON pointer within the schema: to another document (nothing is
      fetched) or to an anchor ("#name");
    - a `pattern` in a syntax its regex reader refuses (a lookahead: ignored inside a schema);
    - a `required` name that is no property, where no other property may be written (the grammar
      writes only the listed ones, so every reply fails the check);
    - an `allOf` of several schemas, where xgrammar cannot combine them (_all_of_held)."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        return (
            f"the $ref {ref!r} at {path} points {'to an anchor' if ref.startswith('#') else 'outside the schema'}; only "
            "references within it ('#', '#/$defs/...') are followed, and nothing is fetched: put the referenced schema under $defs"
        )
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and (reason := _regex_error(pattern)) is not None:
        return f"the pattern {pattern!r} at {path} cannot be held to: {reason}"
    required, properties = schema.get("required"), schema.get("properties")
    if isinstance(required, list) and isinstance(properties, dict) and schema.get("additionalProperties", False) is False and "patternProperties" not in schema:
        if missing := [name for name in required if isinstance(name, str) and name not in properties]:
            return (
                f"the required names {', '.join(map(repr, missing))} at {path} are not among its properties, and no other property may be "
                "written, so no value could be valid: add them to properties, or take them out of required"
            )
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1 and not _all_of_held():
        return (
            f"the allOf at {path} combines {len(all_of)} schemas, which the grammar cannot hold together (it would leave the value "
            "unconstrained): merge them into one schema"
        )
    return None


@functools.cache
def _all_of_held() -> bool:
    """Whether xgrammar holds a value to every schema of an allOf: 0.2.x warns on stderr that it
    does not yet, and its grammar then takes any JSON value."""
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"required": ["a"]}]}
    return not xgrammar_takes(both, "1")


@functools.lru_cache(maxsize=256)
def _regex_error(pattern: str) -> str | None:
    """xgrammar's reason it cannot read a regex (a lookahead, a backreference), or None."""
    try:
        require_xgrammar().Grammar.from_regex(pattern)
    except RuntimeError as exc:
        return _xgrammar_reason(exc)
    return None


def _unfollowed_error(params: GenerationParams) -> str | None:
    """Why a schema of the request cannot be held to as written (_unfollowed), or None."""
    for where, schema in _request_schemas(params):
        for path, subschema in _used_subschemas(schema):
            if (reason := _unfollowed(subschema, path)) is not None:
                return f"{where}{reason}"
    return None


def _schemas_error(params: GenerationParams) -> str | None:
    """Why a JSON schema of the request is not a valid JSON schema (its meta-schema says), or None:
    one the grammar compiled anyway (`{"minimum": "3"}`) would fail the check of the reply."""
    for where, schema in _request_schemas(params):
        error = _meta_schema_error(json.dumps(schema, sort_keys=True))
        if error is not None:
            return f"{where}not a valid JSON schema: {error}"
    return None


@functools.lru_cache(maxsize=256)
def _meta_schema_error(schema: str) -> str | None:
    """What the meta-schema says is wrong with a JSON schema (as JSON text: a request checks it
    several times, about 2 ms each), or None."""
    import jsonschema

    value = json.loads(schema)
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.exceptions.SchemaError as exc:
        return f"{exc.message} (at {exc.json_path})"
    return None


def _xgrammar_reason(exc: RuntimeError) -> str:
    """xgrammar's message without the time and source position it starts with (or that it gave none)."""
    return re.sub(r"^\[[^\]]*\] \S+: ", "", str(exc).strip()) or "xgrammar gave no reason (a number in the schema beyond a float's range is one)"


# Compiled grammars kept per tokenizer (as xgrammar counts their bytes: the process holds about twice
# that), least recently used dropped first. A small schema costs about
# 0.7 MB for the embedded pair (most of it the base's 262k-word masks), a set of 3 tools 2.5 MB; an
# agent that builds its tools per call would otherwise grow without bound.
GRAMMAR_CACHE_BYTES = 64 * 2**20


class _Compiled:
    """Per tokenizer: its xgrammar compiler, whose bounded cache keeps the grammars compiled for it."""

    def __init__(self, model: LoadedModel) -> None:
        xgr = require_xgrammar()
        vocab_size = int(getattr(model.model.config, "vocab_size", 0) or len(model.tokenizer))
        info = xgr.TokenizerInfo.from_huggingface(
            model.tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(model.eos_ids)
        )
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)


_cache: weakref.WeakKeyDictionary[Any, _Compiled] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child starts with free locks and fresh compilers (one may have been mid-compile in
    another thread of the parent, its own locks held), and with no check's build under way (one in
    another thread of the parent would never finish here: a request waiting for it would wait forever)."""
    global _lock, _built_lock
    _lock = threading.Lock()
    _cache.clear()
    _built_lock = threading.Lock()
    _building.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def compiled_grammar(model: LoadedModel, spec: str) -> tuple[Any, int]:
    """The grammar for `spec` compiled for this model's tokenizer (cached), and the logits width;
    its open numbers' digits capped (number_digits).

    The lock covers only making a tokenizer's compiler: xgrammar's compiler takes calls from many
    threads at once, so a thread compiling a new schema (runtime's "wsd-llms-compile") never holds
    up one whose grammar is cached (the worker's, as a request starts).
    """
    entry = _compiler(model)
    return entry.compiler.compile_structural_tag(digits_capped(spec)), entry.vocab_size


def _compiler(model: LoadedModel) -> _Compiled:
    """The model's tokenizer's compiler, made at its first use."""
    with _lock:
        entry = _cache.get(model.tokenizer)
        if entry is None:
            entry = _cache[model.tokenizer] = _Compiled(model)
    return entry


def _open_digits_take(model: LoadedModel, spec: str, text: str) -> bool:
    """Whether `spec`'s grammar as xgrammar builds it, its numbers' digits open, takes `text` as a start."""
    matcher = require_xgrammar().GrammarMatcher(_compiler(model).compiler.compile_structural_tag(spec))
    return bool(matcher.accept_string(text))


class Guide:
    """One model's grammar state for one request; with no spec it lets every token through."""

    def __init__(self, model: LoadedModel, spec: str | None) -> None:
        self.ids: list[int] = []  # tokens the matcher has accepted, in order
        self.matcher: Any = None
        self._model = model.name
        if spec is not None:
            xgr = require_xgrammar()
            grammar, vocab_size = compiled_grammar(model, spec)
            self._xgr = xgr
            self.matcher = xgr.GrammarMatcher(grammar)
            self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    @property
    def active(self) -> bool:
        return self.matcher is not None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of `logits` [V] with every token the grammar forbids next set to -inf. Where it
        forbids every token, the request asks for text the model's tokenizer cannot write (a
        character it has no token for, in a schema's enum or a tool's name): that is the
        request's error, not a choice among -inf logits."""
        if self.matcher is None:
            return logits
        self.matcher.fill_next_token_bitmask(self.bitmask)
        if not bool(self.bitmask.any()) and not self.matcher.is_terminated():  # (a finished grammar allows the stop tokens alone)
            from .errors import InvalidParameterError

            raise InvalidParameterError(
                f"the response_format or tools ask for text that the tokenizer of {self._model!r} cannot write "
                f"(a character it has no token for, after {len(self.ids)} tokens of the reply's structured part); "
                "use characters it has, or a model whose tokenizer falls back to bytes"
            )
        masked = logits.float().cpu().clone()[None]
        self._xgr.apply_token_bitmask_inplace(masked, self.bitmask)
        return masked[0].to(logits.device)

    def accept(self, token: int) -> None:
        """Follow a token chosen under `mask` (a rejection here is a bug, so it raises)."""
        if self.matcher is None:
            return
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its own mask allowed")
        self.ids.append(token)

    def accept_text(self, text: str) -> bool:
        """Feed text that is not in tokens (a forced prefix); False if the grammar rejects it."""
        return self.matcher is None or not text or bool(self.matcher.accept_string(text))

    def sync(self, ids: list[int]) -> int:
        """Make the matcher's tokens the longest accepted prefix of `ids`; returns its length.

        Rolls back to the common prefix with what it holds, then accepts the rest up to the first
        id the grammar rejects. The result depends on `ids` alone, never on earlier calls.
        """
        if self.matcher is None:
            return len(ids)
        common = 0
        while common < min(len(ids), len(self.ids)) and ids[common] == self.ids[common]:
            common += 1
        if common < len(self.ids):
            self.matcher.rollback(len(self.ids) - common)
            del self.ids[common:]
        for token in ids[common:]:
            if not self.matcher.accept_token(token):
                break
            self.ids.append(token)
        return len(self.ids)


def forced_prefix_error(seq: Any, model: LoadedModel | None = None) -> str:
    """Why a sequence's forced start is refused; where `model`'s grammar refuses its text only for the
    digits decoding holds a number to (number_digits), that too, since its schema takes it."""
    prefix = seq.prompts.forced_prefix
    reason = f"the reply's forced start (the trailing assistant message) {prefix!r} does not fit the request's grammar"
    if model is not None and _open_digits_take(model, seq.constraint, prefix):
        reason += f" (decoding holds each part of a number to {NUMBER_DIGITS} digits: write a longer one with an exponent)"
    return reason


def checked_base_guide(seq: Any, base: LoadedModel, forced: list[int]) -> Guide:
    """The base model's guide for a sequence, checked to take `forced`, its ids of the reply's
    forced start: a tokenizer may write text the grammar takes in pieces it reads otherwise."""
    from .errors import InvalidParameterError

    guide = Guide(base, seq.constraint)
    if (taken := guide.sync(forced)) < len(forced):
        if Guide(base, seq.constraint).accept_text(seq.prompts.forced_prefix):  # the text fits: the tokenizer's pieces of it do not
            raise InvalidParameterError(
                f"{forced_prefix_error(seq)} as the base model's tokenizer writes it: the grammar takes its text, but only "
                f"{taken} of the {len(forced)} tokens it is written in"
            )
        raise InvalidParameterError(forced_prefix_error(seq, base))
    return guide


def draft_guide(seq: Any, draft: LoadedModel) -> Guide:
    """The draft model's guide for a sequence, past the reply's forced start."""
    from .errors import InvalidParameterError

    guide = Guide(draft, seq.constraint)
    if not guide.accept_text(seq.prompts.forced_prefix):
        raise InvalidParameterError(forced_prefix_error(seq, draft))
    return guide
