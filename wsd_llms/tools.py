"""Tool calling: tool schemas, their rendering into both prompts, the call grammar, and call parsing.

One text format for a call, used by both models, the grammar, the history and the parser:

    <tool_call>
    {"name": "<tool name>", "arguments": {<arguments as a JSON object>}}
    </tool_call>

Several calls (parallel_tool_calls=True) are separated by one newline. `tool_choice`: "auto"
allows text, in which every "<tool_call>" must begin a valid call of a tool (without parallel
calls the reply ends with its first call); "required" (or "any") forces at least one call and
nothing else; a tool name forces one call of that tool; "none" leaves the reply unconstrained and
the tools out of the prompts.

The draft model sees the tools through its chat template's `tools=` when the template uses
them, otherwise as a system message (`TOOLS_SYSTEM` followed by one JSON schema per line,
appended to the conversation's own system message if it has one). The base model sees a
`[Tools]` block of the same text at the top of its plain prompt. Tool results (role "tool")
render as `<tool_response>` blocks: a user turn for the draft template without tool support,
a `[Tool]` turn in the plain template.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import InvalidParameterError
from .messages import Message, ToolCall, unicode_error
from .reply import close_outside_strings, held_back
from .params import KEYWORD_CHOICES, did_you_mean, json_error
from .structured import Cut, Written, as_written, json_format, load_json, load_reply_json, schema_error

CALL_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
CALL_OPEN, CALL_CLOSE, CALL_SEPARATOR = f"{CALL_TAG}\n", f"\n{CLOSE_TAG}", "\n"
TOOLS_SYSTEM = (
    "You can call tools. To call one, reply with exactly\n"
    '<tool_call>\n{"name": "<tool name>", "arguments": {<arguments as JSON>}}\n</tool_call>\n'
    "The tools, as JSON schemas:"
)
_CLOSE_RE = re.compile(r"\s*" + re.escape(CLOSE_TAG))
_NAME_RE = re.compile(r'^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')  # a JSON string: a name may hold an escape
_BEGIN_RE = re.compile(r'\s*\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')  # _call_begin's text, any name


def _json_string(text: str) -> str | None:
    """A JSON string literal's value, or None where it is not one (a bad escape)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class InvalidToolCall:
    """A call the reply wrote that does not parse or does not fit its tool's schema."""

    raw: str
    error: str
    name: str | None = None
    id: str = ""


# What a tool's schema may hold: OpenAI's function (`strict` changes nothing: calls always follow
# their schema), and Anthropic's tool, whose schema is `input_schema` (with `cache_control`).
TOOL_KEYS = ("name", "description", "parameters", "strict", "input_schema", "cache_control")


def is_function_tool(tool: Mapping[str, Any]) -> bool:
    """Whether a tool dict is one the model calls (a function, OpenAI's or Anthropic's form, whose
    "custom" needs an input_schema), not a provider's own tool (web search, bash) that it runs itself.
    OpenAI's Responses API's function tools are flat: their "type" sits beside the name."""
    kind = tool.get("type", "function")
    return kind == "function" or kind == "custom" and "input_schema" in tool


def tool_name(tool: Mapping[str, Any]) -> str | None:
    """A tool dict's name in any form normalize_tools takes (OpenAI's wrapped or flat, Anthropic's), or None."""
    body = tool.get("function", tool)
    name = body.get("name") if isinstance(body, Mapping) else None
    return name if isinstance(name, str) and name else None


def normalize_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """Tools as {name, description, parameters}; OpenAI's {"type": "function", "function": {...}}
    and Anthropic's {name, description, input_schema} accepted. An unknown key is an error, so a
    misspelt schema is not taken for a tool without arguments."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool schemas, got {type(tools).__name__}")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be a dict, got {type(tool).__name__}")
        if not is_function_tool(tool):
            why = "a 'custom' tool needs an 'input_schema'" if tool["type"] == "custom" else "a tool its provider runs itself; this model calls functions only"
            raise ValueError(f"tools[{i}] has type {tool['type']!r}, which is not a function tool ({why})")
        body = tool.get("function", tool)
        if tool_name(tool) is None:
            raise ValueError(f"tools[{i}] needs a 'name' (or 'function': {{'name': ...}}), got {dict(tool)!r}")
        flat = body is tool  # its "type" sits beside the function's keys
        wrapper = [] if flat else [key for key in tool if key not in ("type", "function")]
        allowed = (*TOOL_KEYS, "type") if flat else TOOL_KEYS
        unknown = wrapper or [key for key in body if key not in allowed]
        if unknown:
            raise ValueError(
                f"tools[{i}] ({body['name']}) has unknown key {unknown[0]!r}{did_you_mean(str(unknown[0]), TOOL_KEYS)} "
                f"(a tool is {{name, description, parameters}}, or OpenAI's or Anthropic's form of it)"
            )
        params = body.get("parameters", body.get("input_schema")) or {"type": "object", "properties": {}}
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise ValueError(f"tools[{i}] ({body['name']}) parameters must be a JSON schema of type 'object'")
        if body["name"] in KEYWORD_CHOICES:
            raise ValueError(f"tools[{i}] is named {body['name']!r}, which tool_choice reads as a keyword ({', '.join(KEYWORD_CHOICES)}); rename it")
        if (error := json_error(params)) is not None:
            raise ValueError(f"tools[{i}] ({body['name']}) parameters {error}")
        for part, text in (("name", body["name"]), ("description", str(body.get("description") or "")), ("parameters", json.dumps(params, ensure_ascii=False, default=str))):
            if (error := unicode_error(text)) is not None:
                raise ValueError(f"tools[{i}] {part} is not valid Unicode: {error}{' of its JSON text' if part == 'parameters' else ''}")
        out.append({"name": body["name"], "description": str(body.get("description") or ""), "parameters": dict(params)})
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return tuple(out)


def _call_begin(name: str) -> str:
    """How the grammar starts a call's JSON, up to its arguments: the name as the prompt shows it."""
    return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '


def stop_in_forced_call(stops: Sequence[str], names: Sequence[str]) -> str | None:
    """The first stop string that would cut a forced call in its opening tag, or None. A forced call
    starts the reply with its tag, the tool's name and its arguments (tool_call_format); a stop that
    starts inside the tag and matches what follows ended every reply before its call (an empty reply,
    with no call and no error, where the stop was "<"). A stop later in the call does not count
    (ReplyText: no stop counts inside a call's markup)."""
    begins = [CALL_OPEN + _call_begin(name) for name in names]
    for stop in stops:
        for begin in begins:
            if any(begin[i:].startswith(stop) or stop.startswith(begin[i:]) for i in range(len(CALL_TAG))):
                return stop
    return None


def tool_call_format(params: Any) -> dict[str, Any]:
    """The structural-tag format of the reply for these tools and this tool_choice."""
    chosen = [t for t in params.tools if params.tool_choice in ("auto", "required", t["name"])]
    tags = [
        {
            "type": "tag",
            "begin": CALL_OPEN + _call_begin(t["name"]),
            "content": json_format(t["parameters"]),
            "end": "}" + CALL_CLOSE,
        }
        for t in chosen
    ]
    if params.tool_choice == "auto" and params.response_format is None:  # free text, in which every "<tool_call>" begins a valid call
        return {
            "type": "triggered_tags",
            "triggers": [CALL_TAG],
            "tags": tags,
            "at_least_one": False,
            "stop_after_first": not params.parallel_tool_calls,
        }
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": CALL_SEPARATOR,
        "at_least_one": True,
        "stop_after_first": not params.parallel_tool_calls,
    }


def render_call(call: ToolCall) -> str:
    return f"{CALL_OPEN}{json.dumps({'name': call.name, 'arguments': call.arguments}, ensure_ascii=False)}{CALL_CLOSE}"


def render_invalid_call(name: str | None, raw: str | None) -> str:
    """An invalid call as it was written: this runtime's raw text (the whole call) as it stands,
    another model's raw arguments (text that may not parse) in render_call's form."""
    raw = (raw or "").strip()
    if raw.startswith(CALL_TAG):
        return raw
    return f'{CALL_OPEN}{{"name": {json.dumps(name or "", ensure_ascii=False)}, "arguments": {raw or "{}"}}}{CALL_CLOSE}'


def tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The documented description of the tools shown to a model without template support."""
    return "\n".join([TOOLS_SYSTEM, *(json.dumps(dict(t), ensure_ascii=False) for t in tools)])


def message_text(m: Message) -> str:
    """A message's content in plain text: tool calls as call blocks, a tool result as a response block."""
    if m.role == "tool":
        return f"<tool_response>\n{m.content.strip()}\n</tool_response>"
    return "\n".join([p for p in [m.content.strip(), *(render_call(c) for c in m.tool_calls)] if p])


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a `tools` argument."""
    return "tools" in str(getattr(tokenizer, "chat_template", "") or "")


def template_messages(tokenizer: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]]) -> tuple[list[dict], dict]:
    """Messages and extra keyword arguments for this tokenizer's chat template. A template without
    tools reads calls as the assistant's text and tool results as a user turn, one turn for the results
    in a row and a user message after them: a template whose roles must alternate (Gemma's,
    Mistral's) refused parallel calls' results, or a question after a result."""
    if supports_tools(tokenizer):
        extra = {"tools": [{"type": "function", "function": dict(t)} for t in tools]} if tools else {}
        return [m.as_dict() for m in messages], extra
    out: list[dict] = []
    for m, before in zip(messages, [None, *messages]):
        if m.role == "tool" or m.tool_calls:
            entry = {"role": "user" if m.role == "tool" else m.role, "content": message_text(m)}
        else:
            entry = m.as_dict()
        if before is not None and before.role == "tool" and m.role in ("tool", "user"):
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n\n{entry['content']}"}
        else:
            out.append(entry)
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tools_text(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tools_text(tools)})
    return out, {}


class _CallSpan(NamedTuple):
    """Where a call's markup is in a reply: text[start:end], its body (the JSON between the tags), and
    whether it is closed: its closing tag came, or its JSON is whole and the reply ends before or
    inside the tag (OpenAI gives such a call, cut by max_tokens after its arguments, as made)."""

    start: int
    end: int
    body: str
    closed: bool


def _call_spans(text: str) -> list[_CallSpan]:
    """The calls a reply writes, in order. A body that parses as JSON ends where its JSON ends, so a
    string argument may hold "</tool_call>"; one that does not runs to the next closing tag, or to
    the end (a call the reply did not finish)."""
    decoder, spans, pos = json.JSONDecoder(), [], 0
    while (start := text.find(CALL_TAG, pos)) != -1:
        body_start = start + len(CALL_TAG)
        first = len(text) - len(text[body_start:].lstrip())
        try:
            _, end = decoder.raw_decode(text, first)
            close = _CLOSE_RE.match(text, end)
            if close is None and CLOSE_TAG.startswith(text[end:].lstrip()):  # whole, cut before its tag ended
                spans.append(_CallSpan(start, len(text), text[body_start:end], True))
                break
        except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
            close = None
        if close is None:  # the first closing tag outside the body's strings, if any, else the end
            end = close_outside_strings(text, CLOSE_TAG, body_start) if text.find(CLOSE_TAG, body_start) != -1 else -1  # (a call being written has none: no scan)
            close = None if end == -1 else _CLOSE_RE.match(text, end)
            end = len(text) if end == -1 else end
        spans.append(_CallSpan(start, close.end() if close else end, text[body_start:end], close is not None))
        pos = spans[-1].end
    return spans


def _arguments_text(body: str, name: str) -> str | None:
    """The arguments' JSON text as the call wrote it, where the call has the form the grammar writes
    (tool_call_format's tag), or None."""
    begin = _call_begin(name)
    stripped = body.strip()
    if not stripped.startswith(begin):
        return None
    try:
        _, end = json.JSONDecoder(strict=False).raw_decode(stripped, len(begin))
    except (ValueError, RecursionError):
        return None
    return stripped[len(begin) : end] if stripped[end:].strip() == "}" else None  # nothing else in the call


def parse_reply(
    text: str, tools: Sequence[Mapping[str, Any]], cut: Cut | None = None
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split a reply into its text and its tool calls; calls that do not validate are reported, not
    dropped. A reply `cut` short (at its budget or a stop string) may end inside a call's tag: that is not text."""
    by_name = {t["name"]: t for t in tools}
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    spans = _call_spans(text)
    for span in spans:
        raw, call_id = text[span.start : span.end], f"call_{uuid.uuid4().hex[:24]}"
        named = _NAME_RE.search(span.body)  # what a call that does not parse still says it calls
        name: str | None = _json_string(named.group(1)) if named else None
        try:
            if not span.closed:
                owner = f"{name}'s parameters" if name else "the tool's parameters"
                parameters = by_name[name]["parameters"] if name in by_name else None
                ended = f"{cut.limit} first; {cut.remedy_for(span.body, parameters, ('arguments',), owner)}" if cut is not None else "the reply ended first"
                raise ValueError(f"the call is not closed with </tool_call> ({ended})")
            body, repeated = load_reply_json(span.body)
            if repeated is not None:
                raise ValueError(repeated)
            if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                raise ValueError('a call must be {"name": ..., "arguments": {...}}')
            name, arguments = body["name"], body.get("arguments", {})
            if name not in by_name:
                raise ValueError(f"unknown tool {name!r}; known: {', '.join(by_name) or 'none'}")
            if not isinstance(arguments, dict):
                raise ValueError(f"arguments must be a JSON object, got {arguments!r}")
            written = _arguments_text(span.body, name)  # checked as written: the grammar's own spelling of a const or enum
            if written is None:
                written = as_written(load_json(span.body, parse_float=Written, parse_int=Written)["arguments"])
            error = schema_error(written, arguments, by_name[name]["parameters"])
            if error:
                raise ValueError(error)
            calls.append(ToolCall(call_id, name, arguments))
        except ValueError as exc:
            invalid.append(InvalidToolCall(raw, str(exc), name, call_id))
    tail = held_back(text, (CALL_TAG,)) if cut is not None else 0
    after = spans[-1].end if spans else 0
    if tail and len(text) - tail >= after and not text[after : len(text) - tail].strip():  # nothing but a call begun, cut inside its tag
        invalid.append(InvalidToolCall(text[-tail:], f"the call's tag is cut short ({cut.limit} first; {cut.remedy})", None, f"call_{uuid.uuid4().hex[:24]}"))  # type: ignore[union-attr]
    if spans:  # the text round the calls: as a stream shows it (text_before_calls), less the space the calls leave
        bounds = [0, *(i for span in spans for i in (span.start, span.end)), len(text)]
        content = "".join(text[bounds[k] : bounds[k + 1]] for k in range(0, len(bounds), 2)).rstrip()
        content = content if text[: spans[0].start].strip() else content.lstrip()
    else:
        content = text
    return _without_cut_tag(content) if cut is not None else content, calls, invalid


def reads_as_calls(text: str, with_format: bool) -> bool:
    """Whether a reply under tools is read as calls: always, but beside a response_format only if it
    starts as calls do (the format's value may be a string that holds the call tag)."""
    return not with_format or text.lstrip().startswith(CALL_TAG)


def begun_calls(text: str) -> list[tuple[str, str] | None]:
    """The calls a reply still being written has begun, in order (OpenAI's streamed calls): each
    one's name and its arguments' JSON text as written so far, once the call's text has the
    grammar's form up to its arguments (tool_call_format), else None. The arguments' text only
    grows while the reply does, and ends where their JSON ends."""
    decoder = json.JSONDecoder(strict=False)
    found: list[tuple[str, str] | None] = []
    for span in _call_spans(text):
        begin = _BEGIN_RE.match(span.body)
        if begin is None:
            found.append(None)
            continue
        args = span.body[begin.end() :]
        try:
            end = decoder.raw_decode(args)[1]
        except (ValueError, RecursionError):  # not yet whole: all of it is arguments so far
            end = len(args)
        found.append((json.loads(begin.group(1)), args[:end]))
    return found


def calls_in_order(text: str, calls: Sequence[ToolCall], invalid: Sequence[InvalidToolCall]) -> list[ToolCall | InvalidToolCall]:
    """The valid and invalid calls parse_reply found in `text`, in the order the reply wrote them
    (an invalid call is known by its raw text, which decides its fate); any `text` does not hold
    come last."""
    valid, bad = list(calls), list(invalid)
    ordered: list[ToolCall | InvalidToolCall] = []
    for span in _call_spans(text):
        if bad and bad[0].raw == text[span.start : span.end]:
            ordered.append(bad.pop(0))
        elif valid:
            ordered.append(valid.pop(0))
    return [*ordered, *valid, *bad]


def _without_cut_tag(content: str) -> str:
    """The content without the start of a call's tag that the reply's end cut short ("...\n<tool_ca")."""
    cut = held_back(content, (CALL_TAG,))
    return content[: len(content) - cut].rstrip() if cut else content


def text_before_calls(text: str) -> str:
    """What of a reply still being written is surely content: the text before its first call, less
    a trailing start of the tag (the reply may go on to complete it) and the whitespace before it."""
    head, tag, _ = text.partition(CALL_TAG)
    return (head if tag else _without_cut_tag(head)).rstrip()


def react_format(tools: Any, answer: bool = True) -> dict[str, Any]:
    """A response_format holding a reply to one ReAct step (the format of LlamaIndex's and
    LangChain's ReAct agents): a one-line thought, then a call of one of `tools` with arguments
    that fit its schema, or, if `answer`, a one-line answer:

        Thought: ...                      Thought: ...
        Action: <tool name>               Answer: ...
        Action Input: {...}

    Small models seldom keep to the format unaided; held to it, every step parses.
    """
    try:
        normalized = normalize_tools(tools)
    except ValueError as exc:  # as a request's tools are refused
        raise InvalidParameterError(f"invalid react_format tools: {exc}") from None
    line = {"type": "regex", "pattern": r"[^\n]+"}
    steps = [
        {
            "type": "sequence",
            "elements": [{"type": "const_string", "value": f"\nAction: {t['name']}\nAction Input: "}, json_format(t["parameters"])],
        }
        for t in normalized
    ]
    if answer:
        steps.append({"type": "sequence", "elements": [{"type": "const_string", "value": "\nAnswer: "}, line]})
    if not steps:
        raise InvalidParameterError("react_format needs at least one tool, or answer=True")
    fmt = {"type": "sequence", "elements": [{"type": "const_string", "value": "Thought: "}, line, {"type": "or", "elements": steps}]}
    return {"type": "structural_tag", "format": fmt}
