"""The two prompts of DESIGN 3: the draft model's chat template and the base model's plain template.

With tools, both prompts describe them and render tool calls and results (see `tools`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidMessagesError, InvalidParameterError, ModelLoadError
from .messages import Message, split_forced_prefix
from .tools import message_text, template_messages, tools_text

# The plain template's role markers; the base model stops before writing any of them.
ROLE_HEADERS = {"system": "[System]", "user": "[User]", "assistant": "[Assistant]", "tool": "[Tool]"}
ROLE_STOPS = ("[System]", "[User]", "[Assistant]")
TOOLS_HEADER = "[Tools]"


@dataclass(frozen=True)
class Prompts:
    """Both models' prompts for one request, plus the forced start of the reply."""

    draft_ids: list[int]
    base_text: str
    base_ids: list[int]
    forced_prefix: str
    role_stops: tuple[str, ...]


def require_chat_template(tokenizer: Any, name: str) -> None:
    """The draft model must be an aligned chat model: refuse one whose tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"the draft model {name!r} has no chat template in its tokenizer; the draft must be an aligned "
            "chat model (for example SmolLM2-135M-Instruct), or set tokenizer.chat_template yourself"
        )


def _chat_template(tokenizer: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]]) -> str:
    from jinja2 import TemplateError

    rendered, extra = template_messages(tokenizer, messages, tools)
    try:
        return tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False, **extra)
    except TemplateError as exc:  # the template's own rule, e.g. no system role, or roles must alternate
        raise InvalidMessagesError(f"the chat template of {tokenizer.name_or_path!r} refused these messages: {exc}") from None


def draft_prompt_ids(tokenizer: Any, messages: list[Message], forced_prefix: str, tools: Sequence[Mapping[str, Any]] = ()) -> list[int]:
    """Chat template with a generation prompt, the forced prefix appended, BOS ensured (DESIGN 3.1)."""
    text = _chat_template(tokenizer, messages, tools)
    ids = tokenizer.encode(text + forced_prefix, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def plain_base_prompt(tokenizer: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]] = ()) -> str:
    """BOS + "\\n\\n[Role]\\ncontent" per message + "\\n\\n[Assistant]\\n" (DESIGN 3.3); tools in a [Tools] block first."""
    parts = [tokenizer.bos_token or ""]
    if tools:
        parts.append(f"\n\n{TOOLS_HEADER}\n{tools_text(tools)}")
    for m in messages:
        parts.append(f"\n\n{ROLE_HEADERS[m.role]}\n{message_text(m)}")
    parts.append(f"\n\n{ROLE_HEADERS['assistant']}\n")
    return "".join(parts)


def chat_base_prompt(tokenizer: Any, messages: list[Message], tools: Sequence[Mapping[str, Any]] = ()) -> str:
    """The base model's own chat template, for base models that have one (an explicit option)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameterError(
            f"base_template='chat', but the base model {tokenizer.name_or_path!r} has no chat template; use 'plain'"
        )
    text = _chat_template(tokenizer, messages, tools)
    bos = tokenizer.bos_token
    if bos and not text.startswith(bos):
        text = bos + text
    return text


def build_prompts(
    draft_tok: Any, base_tok: Any, messages: list[Message], base_template: str = "plain", tools: Sequence[Mapping[str, Any]] = ()
) -> Prompts:
    """Both prompts for a conversation; a trailing assistant turn becomes the forced prefix."""
    context, prefix = split_forced_prefix(messages)
    draft_ids = draft_prompt_ids(draft_tok, context, prefix, tools)
    base_text, role_stops = base_prompt(base_tok, context, base_template, tools)
    base_ids = base_tok.encode(base_text, add_special_tokens=False)
    return Prompts(draft_ids, base_text, base_ids, prefix, role_stops)


def base_prompt(
    base_tok: Any, context: list[Message], base_template: str = "plain", tools: Sequence[Mapping[str, Any]] = ()
) -> tuple[str, tuple[str, ...]]:
    """The base model's prompt for the messages before the reply, and the role markers that end its reply."""
    if base_template == "chat":
        return chat_base_prompt(base_tok, context, tools), ()
    uses_tools = bool(tools) or any(m.role == "tool" or m.tool_calls for m in context)
    return plain_base_prompt(base_tok, context, tools), ROLE_STOPS + ((ROLE_HEADERS["tool"],) if uses_tools else ())


def base_prompt_tokens(base_tok: Any, messages: list[Message], base_template: str = "plain", tools: Sequence[Mapping[str, Any]] = ()) -> int:
    """How many of the base model's positions the messages take: its prompt (a request's
    usage.base_prompt_tokens) and a forced start of the reply, if the last message is one."""
    context, prefix = split_forced_prefix(messages)
    text, _ = base_prompt(base_tok, context, base_template, tools)
    return len(base_tok.encode(text, add_special_tokens=False)) + len(base_tok.encode(prefix, add_special_tokens=False))
