"""The two prompts of DESIGN 3: the draft model's chat template and the base model's plain template.

With tools, both prompts describe them and render tool calls and results (see `tools`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .encoding import Span, encode, encode_text, special_spans
from .errors import InvalidMessagesError, InvalidParameterError, ModelLoadError
from .messages import Message, split_forced_prefix
from .tools import message_text, template_messages, tools_text

# The plain template's role markers; the base model stops before writing any of them.
ROLE_HEADERS = {"system": "[System]", "user": "[User]", "assistant": "[Assistant]", "tool": "[Tool]"}
ROLE_STOPS = ("[System]", "[User]", "[Assistant]")
TOOLS_HEADER = "[Tools]"
# Chat logs' other names for the two sides (LangChain's get_buffer_string, LlamaIndex's condense
# prompt: "a conversation between Human and Assistant") in the template's bracket form: after its
# answer the base model makes up the next turn as "\n\n[Human]\n" too (11 of 16 replies to
# LlamaIndex's condense prompt on the embedded pair, benchmarks/bench_rag_turns.py).
SPEAKER_STOPS = ("\n[Human]", "\n[AI]")


@dataclass(frozen=True)
class Prompts:
    """Both models' prompts for one request, plus the forced start of the reply."""

    draft_ids: list[int]
    base_text: str
    base_ids: list[int]
    forced_prefix: str
    role_stops: tuple[str, ...]
    marks: dict[str, tuple[int, ...]]
    """Per model ("draft", "base"): the positions where the prompt's messages start (their text,
    after the template's header) and where the prompt ends (where the reply's text starts),
    ascending, where its prefill may be cut so that a later prompt with the same messages first
    reuses the pieces (scheduler.piece_end). The next turn of a conversation or an agent loop
    starts with this whole prompt and has these marks there, and its own reply's start where
    this prompt ends, so it is cut alike up to this prompt's end where this prompt's last piece
    is MIN_PIECE ids or more (a shorter one, a short question, is passed over there, so the next
    turn feeds it again with the reply; cutting there would feed a long history of short turns
    in as many passes, one a step), and up to its last cut otherwise (marks where messages end
    would not do: this prompt's last message would end at a mark only in the next one, which
    would be cut differently from the start of that message on); so does another question under
    the same system prompt, up to its question's start."""
    base_spans: tuple[Span, ...] = ()
    """Where the messages' text in `base_text` spells special tokens (usually nowhere): it is
    encoded as text (encoding.encode), here and wherever the draft is handed to the base model."""


def require_chat_template(tokenizer: Any, name: str, role: str = "draft") -> None:
    """The draft model (and eval's judge) must be an aligned chat model: refuse one whose tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"the {role} model {name!r} has no chat template in its tokenizer; the {role} must be an aligned "
            "chat model (for example SmolLM2-135M-Instruct), or set tokenizer.chat_template yourself"
        )


def shown_name(tokenizer: Any, role: str) -> str:
    """The `role` model ("draft", "base") as an error names it: the source its tokenizer was loaded
    from as the user gave it (loading.named_by), where it has one (a tokenizer built in memory has none)."""
    name = getattr(tokenizer, "name_or_path", "")
    return f"the {role} model {name!r}" if name else f"the {role} model"


def _chat_template(tokenizer: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]], role: str) -> tuple[str, list[Span]]:
    """The `role` model's template's text, and where the messages' text lies in it, in order."""
    rendered, extra = template_messages(tokenizer, messages, tools)
    text = _render(tokenizer, rendered, extra, role)
    return text, _template_spans(tokenizer, rendered, extra, text, role)


def _render(tokenizer: Any, rendered: list[dict], extra: dict, role: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False, **extra)
    except TemplateError as exc:  # the template's own rule, e.g. no system role, or roles must alternate
        raise InvalidMessagesError(f"the chat template of {shown_name(tokenizer, role)} refused these messages: {exc}") from None


def _template_spans(tokenizer: Any, rendered: list[dict], extra: dict, text: str, role: str) -> list[Span]:
    """Where each message's text lies in `text`, its template's rendering, told apart from the
    template's own text by a second rendering with a marker in each message's place: a message
    that spells a marker the template writes before it ("<bos>", "<|im_end|>", the end of the turn
    before) was found at that marker, which was then encoded as text and the message as the
    control token. A message is taken as written or stripped, and one the template writes otherwise
    (Qwen3's splits off reasoning) as what it wrote up to its own text after it; where that text is
    not found, each message from there is looked for after the one before (message_spans). An
    empty message has no text, and is left as it is (a template may leave it out, as Qwen's do
    beside a call)."""
    contents = [m["content"] for m in rendered if isinstance(m.get("content"), str) and m["content"]]
    nonce, n, marked = uuid.uuid4().hex, 0, []
    for m in rendered:
        if isinstance(m.get("content"), str) and m["content"]:
            m, n = {**m, "content": f"\ue000{nonce}:{n}\ue001"}, n + 1
        marked.append(m)
    pieces = re.split(f"\ue000{nonce}:([0-9]+)\ue001", _render(tokenizer, marked, extra, role))
    if not text.startswith(pieces[0]):
        return message_spans(text, contents)
    spans: list[Span] = []
    at = len(pieces[0])
    for index, after in zip(pieces[1::2], pieces[2::2]):
        content = contents[int(index)]
        shown = next((c for c in (content, content.strip()) if text.startswith(c + after, at)), None)
        # one written otherwise runs up to the template's own text after it
        end = at + len(shown) if shown is not None else text.find(after, at) if after else -1
        if end < 0:
            return spans + message_spans(text, contents[int(index) :], at)
        spans.append((at, end))
        at = end + len(after)
    return spans


def message_spans(text: str, contents: Sequence[str], at: int = 0) -> list[Span]:
    """Where each message's text lies in a prompt rendered from them, found by looking for each
    after the one before, from `at` (a template may have stripped it; one not found is left out):
    for a template that writes messages otherwise than as given (_template_spans)."""
    spans = []
    for content in contents:
        content = content.strip()
        found = text.find(content, at) if content else -1
        if found >= 0:
            at = found + len(content)
            spans.append((found, at))
    return spans


def encode_with_marks(tokenizer: Any, text: str, starts: Sequence[int], spans: Sequence[Span] = ()) -> tuple[list[int], tuple[int, ...]]:
    """`text`'s ids, with `spans` (message text that spells special tokens) encoded as text
    (encoding.encode); and where the messages starting at `starts` start in them, then the end
    (Prompts.marks): the position of the token that starts where each starts (none if no token
    starts there; only the end for a tokenizer without character offsets)."""
    ids, offsets = encode(tokenizer, text, spans, offsets=True)
    first: dict[int, int] = {}
    for i, (start, _) in enumerate(offsets):
        first.setdefault(start, i)
    marks: list[int] = []
    for start in starts if offsets else ():
        if start in first and (not marks or first[start] > marks[-1]):
            marks.append(first[start])
    if ids and (not marks or marks[-1] < len(ids)):
        marks.append(len(ids))
    return ids, tuple(marks)


def draft_prompt_ids(
    tokenizer: Any, messages: list[Message], forced_prefix: str, tools: Sequence[Mapping[str, Any]] = ()
) -> tuple[list[int], tuple[int, ...]]:
    """Chat template with a generation prompt, the forced prefix appended, BOS ensured (DESIGN 3.1);
    and where its messages start and it ends (Prompts.marks)."""
    return _draft_ids(tokenizer, *_draft_text(tokenizer, messages, forced_prefix, tools))


def _draft_text(
    tokenizer: Any, messages: list[Message], forced_prefix: str, tools: Sequence[Mapping[str, Any]]
) -> tuple[str, list[Span], list[Span]]:
    """The draft prompt's text, where its messages' text lies, and where text the caller wrote does
    (the messages', then the forced prefix's)."""
    text, spans = _chat_template(tokenizer, messages, tools, "draft")
    full = text + forced_prefix
    return full, spans, spans + ([(len(text), len(full))] if forced_prefix else [])


def _draft_ids(tokenizer: Any, full: str, spans: list[Span], texts: list[Span]) -> tuple[list[int], tuple[int, ...]]:
    """The draft prompt's text encoded, BOS ensured, with its marks."""
    ids, marks = encode_with_marks(tokenizer, full, [lo for lo, _ in spans], special_spans(tokenizer, full, texts))
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, marks = [bos, *ids], tuple(m + 1 for m in marks)
    return ids, marks


def plain_base_prompt(tokenizer: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]] = ()) -> tuple[str, list[Span]]:
    """BOS + "\n\n[Role]\ncontent" per message + "\n\n[Assistant]\n" (DESIGN 3.3); tools in a [Tools] block first.
    Also where the contents it wrote lie, in order (the tools block, then each message's)."""
    contents = ([tools_text(tools)] if tools else []) + [message_text(m) for m in messages]
    headers = ([TOOLS_HEADER] if tools else []) + [ROLE_HEADERS[m.role] for m in messages]
    parts, spans = [tokenizer.bos_token or ""], []
    at = len(parts[0])
    for header, content in zip(headers, contents):
        parts.append(f"\n\n{header}\n{content}")
        at += len(parts[-1])
        spans.append((at - len(content), at))
    parts.append(f"\n\n{ROLE_HEADERS['assistant']}\n")
    return "".join(parts), spans


def chat_base_prompt(tokenizer: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]] = ()) -> tuple[str, list[Span]]:
    """The base model's own chat template, for base models that have one (an explicit option);
    also where the messages' text lies in it, in order."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameterError(
            f"base_template='chat', but {shown_name(tokenizer, 'base')} has no chat template; use 'plain'"
        )
    text, spans = _chat_template(tokenizer, messages, tools, "base")
    bos = tokenizer.bos_token
    if bos and not text.startswith(bos):
        text, spans = bos + text, [(lo + len(bos), hi + len(bos)) for lo, hi in spans]
    return text, spans


def build_prompts(
    draft_tok: Any,
    base_tok: Any,
    messages: list[Message],
    base_template: str = "plain",
    tools: Sequence[Mapping[str, Any]] = (),
    continue_final: bool = True,
    check: Callable[[dict[str, str]], None] | None = None,
) -> Prompts:
    """Both prompts for a conversation; a trailing assistant turn becomes the forced prefix (unless
    `continue_final` is False). `check` sees both prompts' text ({"draft": ..., "base": ...}) before
    either is encoded, which costs far more than rendering it, and may refuse them by raising."""
    context, prefix = split_forced_prefix(messages, continue_final)
    draft_text = _draft_text(draft_tok, context, prefix, tools)
    base_text, role_stops, spans = base_prompt(base_tok, context, base_template, tools)
    if check is not None:
        check({"draft": draft_text[0], "base": base_text})
    draft_ids, draft_marks = _draft_ids(draft_tok, *draft_text)
    base_spans = tuple(special_spans(base_tok, base_text, spans))
    base_ids, base_marks = encode_with_marks(base_tok, base_text, [lo for lo, _ in spans], base_spans)
    return Prompts(draft_ids, base_text, base_ids, prefix, role_stops, {"draft": draft_marks, "base": base_marks}, base_spans)


def base_prompt(
    base_tok: Any, context: list[Message], base_template: str = "plain", tools: Sequence[Mapping[str, Any]] = ()
) -> tuple[str, tuple[str, ...], list[Span]]:
    """The base model's prompt for the messages before the reply, the role markers that end its
    reply, and where the messages' text lies in it, in order (where Prompts.marks fall)."""
    if base_template == "chat":
        text, spans = chat_base_prompt(base_tok, context, tools)
        return text, (), spans
    uses_tools = bool(tools) or any(m.role == "tool" or m.tool_calls for m in context)
    text, spans = plain_base_prompt(base_tok, context, tools)
    markers = ROLE_STOPS + ((ROLE_HEADERS["tool"],) if uses_tools else ())
    return text, markers + variant_stops(markers, text), spans


def variant_stops(markers: tuple[str, ...], prompt: str) -> tuple[str, ...]:
    """The markers' numbered and colon variants at a line's start ("\n[User 1", "\n[User:"), which end
    the reply too: after its answer the base model often makes up a turn as "[User 0", "[User 1]:",
    "[User 1</strong>" (14 of 32 replies to LlamaIndex's RAG prompts on the embedded pair ran on so)
    or "[User: 10:00 AM]" (LlamaIndex's condense prompt), which no exact marker stops. A number or a
    colon, not any word, so that a line such as "[User Guide](...)" stays text; and not a variant
    that the prompt writes itself (a chat log's "[User 2]: hi"), which a reply may well quote at a
    line's start. Also the other names chat logs give the two sides (SPEAKER_STOPS), unless the
    prompt writes them so."""
    stops: list[str] = []
    for marker in markers:
        name = marker[:-1]  # "[User"
        if not re.search(re.escape(name) + r" \d", prompt):
            stops += [f"\n{name} {digit}" for digit in "0123456789"]
        if name + ":" not in prompt:
            stops.append(f"\n{name}:")
    return (*stops, *(stop for stop in SPEAKER_STOPS if stop[1:] not in prompt))


def base_prompt_tokens(base_tok: Any, messages: list[Message], base_template: str = "plain", tools: Sequence[Mapping[str, Any]] = ()) -> int:
    """How many of the base model's positions the messages take as a prompt, each message a turn:
    a trailing assistant message too, a few tokens more than as a forced start, since LangChain's
    trim_messages counts a conversation's tails reversed, where its first message comes last. A
    part that its chat template refuses counts as `template_tokens` says."""

    def count(order: list[Message]) -> int:
        text, _, spans = base_prompt(base_tok, order, base_template, tools)
        return len(encode(base_tok, text, special_spans(base_tok, text, spans))[0])

    return template_tokens(count, base_tok, messages, tools)


def draft_prompt_tokens(draft_tok: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]] = ()) -> int:
    """How many of the draft model's positions the messages take as a prompt, each message a turn
    (as base_prompt_tokens); a part that its template refuses counts as `template_tokens` says."""
    return template_tokens(lambda order: len(draft_prompt_ids(draft_tok, order, "", tools)[0]), draft_tok, messages, tools)


def template_tokens(count: Callable[[list[Message]], int], tokenizer: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]]) -> int:
    """`count(messages)`, for a part of a conversation a strict chat template refuses on its own
    (roles must alternate, say) too: the count of its reverse, which is the order it will be sent in
    when LangChain's trim_messages counts a conversation's tails reversed; if the template refuses
    both, the plain transcript's tokens plus what the template adds around one empty user turn.
    A whole conversation it refuses fails as a request, with the template's reason."""
    for order in (messages, messages[::-1]):
        try:
            return count(order)
        except InvalidMessagesError:
            continue

    def plain(order: list[Message]) -> int:
        return len(encode_text(tokenizer, plain_base_prompt(tokenizer, order, tools)[0]))

    one = [Message("user", "")]
    try:
        around = max(0, count(one) - plain(one))
    except InvalidMessagesError:
        around = 0
    return plain(messages) + around
