"""The prompt set: the bundled default, or the user's JSONL in the paper's `{"context": [messages]}` format.

Loading never raises on bad lines: each bad line becomes a `Problem` with its line number, and every
good line is still returned, so one typo does not cost the whole run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidMessagesError
from ..messages import normalize_messages

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.jsonl")
DECLINE_CATEGORY = "decline"


@dataclass(frozen=True)
class EvalPrompt:
    """One conversation to answer; `category == "decline"` marks prompts an aligned model should refuse."""

    id: str
    category: str
    messages: list[dict[str, str]]
    line: int

    @property
    def should_decline(self) -> bool:
        return self.category == DECLINE_CATEGORY


@dataclass(frozen=True)
class Problem:
    """A line of the prompt file that could not be used, and why."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


def _parse_line(raw: str, number: int) -> EvalPrompt:
    """One JSONL line into a prompt; raises ValueError with a short reason."""
    try:
        obj: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "context" not in obj:
        raise ValueError(f"no 'context' key (keys: {sorted(obj)}); expected {{\"context\": [messages]}}")
    try:
        messages = [m.as_dict() for m in normalize_messages(obj["context"])]
    except InvalidMessagesError as exc:
        raise ValueError(f"bad 'context': {exc}") from None
    given_id, category = obj.get("id"), obj.get("category")  # null as absent (it became "None")
    return EvalPrompt(
        id=f"line-{number}" if given_id is None else str(given_id),
        category="uncategorized" if category is None else str(category),
        messages=messages,
        line=number,
    )


def load_prompts(path: Path | str | None = None) -> tuple[list[EvalPrompt], list[Problem]]:
    """Read a JSONL prompt file (the bundled set when `path` is None); blank lines are skipped."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [Problem(0, f"cannot read {path}: {exc.strerror or exc}")]
    prompts: list[EvalPrompt] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}  # each id's line: ids pair replies across settings and the judge
    # JSONL lines end at "\n" alone (str.splitlines also splits at U+2028, which JSON strings may
    # hold), and each is decoded on its own: one bad byte costs its line, not the file.
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            raw = line.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(number, f"not UTF-8 text (byte {exc.start + 1} of the line: {exc.reason})"))
            continue
        if not raw.strip():
            continue
        try:
            prompt = _parse_line(raw, number)
        except ValueError as exc:
            problems.append(Problem(number, str(exc)))
            continue
        if prompt.id in first_line:
            problems.append(Problem(number, f"duplicate id {prompt.id!r} (first on line {first_line[prompt.id]}); this line is skipped"))
            continue
        first_line[prompt.id] = number
        prompts.append(prompt)
    if not prompts and not problems:
        problems.append(Problem(0, "the file is empty: no prompts to run"))
    return prompts, problems
