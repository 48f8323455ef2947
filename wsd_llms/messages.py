"""The runtime's own message type, and the checks a conversation must pass before decoding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidMessagesError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: a role and its text."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def normalize_messages(messages: Sequence[Mapping[str, Any] | Message]) -> list[Message]:
    """Check and convert `[{"role": ..., "content": ...}]` into Messages, or raise a clear error."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidMessagesError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidMessagesError("messages is empty: give at least one message")
    out: list[Message] = []
    for i, msg in enumerate(messages):
        if isinstance(msg, Message):
            role, content = msg.role, msg.content
        elif isinstance(msg, Mapping):
            if "role" not in msg or "content" not in msg:
                raise InvalidMessagesError(f"messages[{i}] needs 'role' and 'content' keys, got {sorted(msg)}")
            role, content = msg["role"], msg["content"]
        else:
            raise InvalidMessagesError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        if role not in ROLES:
            raise InvalidMessagesError(f"messages[{i}] has unknown role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidMessagesError(
                f"messages[{i}] ({role}) content must be a str, got {type(content).__name__}"
            )
        out.append(Message(role, content))
    if all(m.role == "assistant" for m in out):
        raise InvalidMessagesError("messages holds only assistant turns: give a user or system message")
    return out


def split_forced_prefix(messages: list[Message]) -> tuple[list[Message], str]:
    """A trailing assistant message is a forced start of the reply (DESIGN 3.1): split it off."""
    if messages[-1].role == "assistant":
        return messages[:-1], messages[-1].content.strip()
    return messages, ""
