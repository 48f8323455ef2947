"""The runtime's own message type, and the checks a conversation must pass before decoding."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidMessagesError
from .structured import load_json

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id")  # what a message dict's reader takes
# Other names the frameworks give these roles: OpenAI's developer, LangChain's human and ai,
# LlamaIndex's chatbot, model and function (a function's result).
ROLE_ALIASES = {"developer": "system", "human": "user", "ai": "assistant", "chatbot": "assistant", "model": "assistant", "function": "tool"}
# Where other formats keep a history call's arguments: OpenAI's and ours, Anthropic's tool_use blocks
# (and LlamaIndex's Anthropic and Bedrock histories), LangChain's tool calls, Cohere's.
ARGUMENT_KEYS = ("arguments", "input", "args", "parameters")
ID_KEYS = ("call_id", "id", "toolUseId")  # OpenAI Responses API items (whose id is the item's), ours, Bedrock's
ALLOWED_ROLES = ", ".join(ROLES) + " (or " + ", ".join(f"{alias} for {role}" for alias, role in ROLE_ALIASES.items()) + ")"


def canonical_role(role: Any) -> str | None:
    """One of ROLES for a role or one of its aliases (ROLE_ALIASES), else None."""
    if not isinstance(role, str):
        return None
    return ROLES[ROLES.index(role)] if role in ROLES else ROLE_ALIASES.get(role)  # a str enum's value as a plain str


@dataclass(frozen=True)
class ToolCall:
    """A call of one tool: its id, the tool's name and the arguments as a dict."""

    id: str
    name: str
    arguments: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: a role and its text; assistant turns may carry tool calls,
    and a "tool" turn is a tool's result: of the call named by `tool_call_id`, or of none (a
    ReAct observation, say)."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _tool_call(i: int, j: int, raw: Any) -> ToolCall:
    """A history tool call, flat ({id, name, arguments}) or OpenAI-style ({id, function: {name, arguments}}),
    as a dict or as a pydantic object of that shape; the arguments under any of ARGUMENT_KEYS and the
    id under any of ID_KEYS, as other providers' histories keep them (an Anthropic tool_use block's
    input had been dropped: the model saw the call made with no arguments)."""
    where = f"messages[{i}].tool_calls[{j}]"
    if isinstance(raw, ToolCall):
        return raw
    if not isinstance(raw, Mapping) and callable(getattr(raw, "model_dump", None)):
        raw = raw.model_dump()  # a provider SDK's pydantic call (OpenAI's, Ollama's), as LlamaIndex's histories keep them
    if not isinstance(raw, Mapping):
        raise InvalidMessagesError(f"{where} must be a dict, got {type(raw).__name__}")
    body = raw.get("function", raw)
    name = body.get("name") if isinstance(body, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InvalidMessagesError(f"{where} needs a 'name' (or 'function': {{'name': ...}}), got {dict(raw)!r}")
    given = [key for key in ARGUMENT_KEYS if key in body]
    if len(given) > 1:
        raise InvalidMessagesError(f"{where} ({name!r}) gives its arguments under {' and '.join(map(repr, given))}; give them once")
    for key in body if not given else ():  # a misspelt "arguments" would make a call with none
        if isinstance(key, str) and (close := difflib.get_close_matches(key, ARGUMENT_KEYS, n=1, cutoff=0.8)):
            raise InvalidMessagesError(f"{where} ({name!r}) has key {key!r}; did you mean {close[0]!r}? (a call's arguments: {', '.join(ARGUMENT_KEYS)})")
    arguments = body[given[0]] if given and body[given[0]] is not None else {}  # None: a call with no arguments (a model_dump of one)
    if isinstance(arguments, str):
        try:
            arguments = load_json(arguments) if arguments.strip() else {}
        except ValueError as exc:  # json.JSONDecodeError is one, and so is JSON nested too deeply
            raise InvalidMessagesError(f"{where} arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, Mapping):
        raise InvalidMessagesError(f"{where} arguments must be a dict or a JSON object string, got {arguments!r}")
    try:  # the prompt writes them as JSON: a value JSON cannot write fails here, not as the request starts
        written = json.dumps(arguments, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMessagesError(f"{where} arguments hold a value JSON cannot write: {exc}") from None
    if (error := unicode_error(name)) is not None:
        raise InvalidMessagesError(f"{where} name is not valid Unicode: {error}")
    if (error := unicode_error(written)) is not None:  # ("\\ud83d" in JSON text is one too)
        raise InvalidMessagesError(f"{where} ({name!r}) arguments are not valid Unicode: {error} of their JSON text")
    call_id = next((raw[key] for key in ID_KEYS if raw.get(key)), f"call_{i}_{j}")
    return ToolCall(str(call_id), name, dict(arguments))


def read_tool_call(raw: Any) -> ToolCall:
    """A call in any shape a history's may take (_tool_call), or InvalidMessagesError: for an
    adapter that finds calls outside a message's own list and shows one it cannot read as written."""
    return _tool_call(0, 0, raw)


def _message(i: int, msg: Mapping[str, Any] | Message) -> Message:
    content: str | None
    if isinstance(msg, Message):
        role, content, calls, call_id = msg.role, msg.content, msg.tool_calls, msg.tool_call_id
    elif isinstance(msg, Mapping):
        _check_misspelt_keys(i, msg)
        if "role" not in msg or ("content" not in msg and not msg.get("tool_calls")):
            raise InvalidMessagesError(f"messages[{i}] needs 'role' and 'content' keys, got {sorted(msg)}")
        role, content = msg["role"], msg.get("content")
        calls, call_id = msg.get("tool_calls") or (), msg.get("tool_call_id")
    else:
        raise InvalidMessagesError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
    if (canonical := canonical_role(role)) is None:
        raise InvalidMessagesError(f"messages[{i}] has unknown role {role!r}; allowed: {ALLOWED_ROLES}")
    role = canonical
    if role == "assistant" and content is None and not isinstance(msg, Message):  # a dict's call-only turn
        content = ""
    if not isinstance(content, str):
        raise InvalidMessagesError(f"messages[{i}] ({role}) content must be a str, got {type(content).__name__}")
    if (error := unicode_error(content)) is not None:
        raise InvalidMessagesError(f"messages[{i}] ({role}) content is not valid Unicode: {error}")
    if calls and role != "assistant":
        raise InvalidMessagesError(f"messages[{i}] ({role}) has tool_calls; only assistant messages may carry them")
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
        raise InvalidMessagesError(f"messages[{i}].tool_calls must be a list, got {type(calls).__name__}")
    if role == "tool" and call_id is not None and (not isinstance(call_id, str) or not call_id):
        raise InvalidMessagesError(f"messages[{i}] (tool) tool_call_id must name the call it answers (a non-empty str), got {call_id!r}")
    if role != "tool":
        call_id = None
    return Message(role, content, tuple(_tool_call(i, j, c) for j, c in enumerate(calls)), call_id)


def _check_misspelt_keys(i: int, msg: Mapping[str, Any]) -> None:
    """InvalidMessagesError for a key that is a misspelling of one the message lacks (`toolcall_id`
    would have dropped the id a tool result answers). Other keys an OpenAI-style message carries
    (name, refusal, annotations, ...) are left unread, as before."""
    missing = [key for key in MESSAGE_KEYS if key not in msg]
    for key in msg:
        if isinstance(key, str) and key not in MESSAGE_KEYS:
            if close := difflib.get_close_matches(key, missing, n=1, cutoff=0.8):
                raise InvalidMessagesError(f"messages[{i}] has key {key!r}; did you mean {close[0]!r}? (a message's keys: {', '.join(MESSAGE_KEYS)})")


def unicode_error(text: str) -> str | None:
    """Why UTF-8 cannot encode the text (an unpaired surrogate, e.g. from a bad decode), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"unpaired surrogate {text[exc.start]!r} at index {exc.start}"
    return None


def normalize_messages(messages: Sequence[Mapping[str, Any] | Message], request: bool = True) -> list[Message]:
    """Check and convert `[{"role": ..., "content": ...}]` into Messages, or raise a clear error.
    `request=False`: any part of a conversation (to count its tokens), not only one a reply can follow."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidMessagesError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages and request:
        raise InvalidMessagesError("messages is empty: give at least one message")
    out = _results_in_call_order([_message(i, msg) for i, msg in enumerate(messages)])
    if request and all(m.role == "assistant" for m in out):
        raise InvalidMessagesError("messages holds only assistant turns: give a user or system message")
    return out


def _results_in_call_order(messages: list[Message]) -> list[Message]:
    """The results after a turn of calls, those with a `tool_call_id` put in the order of their
    calls where each names a call of its own (in the places they hold; a result with no id keeps
    its place). The prompts pair a result with a call by place (no template shows ids), so results
    appended as they finished (asyncio.as_completed) read as the wrong calls'."""
    out = list(messages)
    for i, m in enumerate(messages):
        if not m.tool_calls:
            continue
        end = i + 1
        while end < len(out) and out[end].role == "tool":
            end += 1
        order: dict[str | None, int] = {c.id: k for k, c in enumerate(m.tool_calls)}
        places = [k for k in range(i + 1, end) if out[k].tool_call_id is not None]
        ids = [out[k].tool_call_id for k in places]
        if len(set(ids)) == len(ids) and all(id_ in order for id_ in ids):
            for k, result in zip(places, sorted((out[k] for k in places), key=lambda r: order[r.tool_call_id])):
                out[k] = result
    return out


def results_naming_no_call(messages: Sequence[Message]) -> list[str]:
    """Where a tool result names (by `tool_call_id`) no call of the turn it follows: a mismatch in
    the caller's history (a trimmed-off call, a result kept from another turn) that OpenAI's and
    Anthropic's APIs refuse. Not refused here, since the prompts pair results with calls by place
    and show no ids, but said: the model reads the result as the answer to the call in its place."""
    found: list[str] = []
    turn = -1  # the latest turn that is not a result
    for i, m in enumerate(messages):
        if m.role != "tool":
            turn = i
            continue
        calls = [c.id for c in messages[turn].tool_calls] if turn >= 0 else []
        if m.tool_call_id is not None and m.tool_call_id not in calls:
            after = f"messages[{turn}], whose calls are {', '.join(map(repr, calls))}" if calls else f"messages[{turn}] makes none" if turn >= 0 else "none comes before it"
            found.append(f"messages[{i}] (tool) answers tool_call_id {m.tool_call_id!r}, which names no call of the turn before it ({after})")
    return found


def split_forced_prefix(messages: list[Message], continue_final: bool = True) -> tuple[list[Message], str]:
    """A trailing assistant message is a forced start of the reply (DESIGN 3.1): split it off
    (unless `continue_final` is False: then it is a turn of the conversation, as one with calls is)."""
    if continue_final and messages[-1].role == "assistant" and not messages[-1].tool_calls:
        return messages[:-1], messages[-1].content.strip()
    return messages, ""
