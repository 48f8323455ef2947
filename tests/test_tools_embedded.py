"""Tool calls and structured output on the embedded pair (SmolLM2-135M-Instruct drafts, Gemma-3-270M base)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from enum import Enum

import pytest
from pydantic import BaseModel, Field

from wsd_llms import TextDelta

WEATHER = {
    "name": "get_weather",
    "description": "Get the weather forecast for a city for a number of days.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}
PROMPTS = [
    "What's the weather in Paris tomorrow?",
    "Will it rain in London this week?",
    "Forecast for Tokyo for the next 3 days, please.",
    "Is it going to be sunny in Madrid over the weekend?",
    "How cold will it be in Oslo for the next five days?",
    "I am travelling to Berlin for 2 days. What weather should I expect?",
    "Give me the 7-day forecast for New York.",
    "Weather in Sydney today?",
    "Should I pack an umbrella for Amsterdam this week?",
    "What temperatures are expected in Cairo in the next 4 days?",
    "Check the weather in Rome for 10 days.",
    "Is it windy in Chicago right now?",
    "Tell me the forecast for Mumbai for the coming 6 days.",
    "Will it snow in Moscow in the next two days?",
    "How hot is it in Dubai this week?",
    "Forecast for São Paulo, 3 days.",
    "What's the weather like in Vancouver for 1 day?",
    "Can you look up the weather in Lisbon for the next week?",
    "Is it humid in Singapore for the next 2 days?",
    "Weather report for Zürich, 5 days please.",
]


def _ask(runtime, content, **params):
    return runtime.generate([{"role": "user", "content": content}], **params)


def test_forced_tool_call_rate(embedded):
    """With "required", the two-parameter tool gets schema-valid arguments on >= 19 of 20 prompts."""
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent requests share batched steps
        results = list(pool.map(lambda p: _ask(embedded, p, tools=[WEATHER], tool_choice="required", max_tokens=48), PROMPTS))
    valid = [r for r in results if len(r.tool_calls) == 1 and not r.invalid_tool_calls]
    print(f"forced tool call: {len(valid)}/{len(results)} valid")
    for r in results:
        print(repr(r.text), r.switch_point)
    assert len(valid) >= 19
    for r in valid:
        args = r.tool_calls[0].arguments
        assert r.tool_calls[0].name == "get_weather" and isinstance(args["city"], str) and isinstance(args["days"], int)


class Unit(str, Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str | None = None


class Report(BaseModel):
    # Bounded lists and strings: a bounded schema always completes within max_tokens.
    place: Place
    unit: Unit
    highs: list[int] = Field(max_length=3)
    summary: str | None = Field(None, max_length=60)


def test_structured_output_validates(embedded):
    prompts = ["Describe the weather in Paris as a report.", "Summer in Cairo: give a short weather report."]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: _ask(embedded, p, response_format=Report, max_tokens=96), prompts))
    for r in results:
        assert r.finish_reason == "stop", r.text
        assert r.parse_error is None, r.text
        Report.model_validate_json(r.text)


def test_an_array_without_items_gets_members(embedded):
    """An array schema that gives no items takes any (xgrammar's strict mode wrote only [] for it
    once it had maxItems): the list asked for comes with members."""
    r = _ask(embedded, "Name three primary colors as a JSON list.", response_format={"type": "array", "maxItems": 5}, max_tokens=60)
    assert r.finish_reason == "stop" and r.parse_error is None, r.text
    assert 1 <= len(r.parsed) <= 5, r.text


def test_auto_greeting_gets_text(embedded):
    r = _ask(embedded, "Hello! How are you today?", tools=[WEATHER], tool_choice="auto", max_tokens=16)
    assert not r.tool_calls and not r.invalid_tool_calls and "<tool_call>" not in r.text and r.text


def test_switch_inside_json_and_unicode(embedded):
    """At τ=0.7, w=6 the base takes over in the middle of the call's JSON (after `{"name": "`); it stays valid,
    Unicode arguments survive, and online equals staged."""
    params = dict(tools=[WEATHER], tool_choice="get_weather", max_tokens=48, switch_threshold=0.7, switch_window=6)
    content = "Wie wird das Wetter in Zürich (Schweiz) für 3 Tage? 天気"
    online = _ask(embedded, content, **params)
    staged = _ask(embedded, content, mode="staged", **params)
    assert online.text == staged.text and online.switch_point == staged.switch_point
    assert online.switch_point is not None and 0 < len(online.draft_text) < len(online.text)
    assert online.draft_text.startswith("<tool_call>") and not online.draft_text.endswith("</tool_call>")
    assert len(online.tool_calls) == 1, online.text
    city = online.tool_calls[0].arguments["city"]
    assert city in online.text and json.loads(json.dumps(city, ensure_ascii=False)) == city
    assert any(ord(ch) > 127 for ch in city), city


def test_two_step_tool_loop(embedded):
    messages = [{"role": "user", "content": "What's the weather in Paris for 2 days?"}]
    first = embedded.generate(messages, tools=[WEATHER], tool_choice="required", max_tokens=48)
    call = first.tool_calls[0]
    messages += [
        {"role": "assistant", "content": first.content, "tool_calls": [call.as_dict()]},
        {"role": "tool", "content": json.dumps({"forecast": ["sunny, 24°C", "rain, 18°C"]}), "tool_call_id": call.id},
    ]
    final = embedded.generate(messages, tools=[WEATHER], tool_choice="none", max_tokens=32)
    assert final.text and not final.tool_calls


MULTIPLY = {
    "name": "multiply",
    "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
}
CALLED = [
    {"role": "user", "content": "What is 6 times 7?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "multiply", "arguments": {"a": 6, "b": 7}}]},
    {"role": "tool", "content": "42", "tool_call_id": "c1"},
]


@pytest.mark.parametrize("offered", [{}, {"tools": [MULTIPLY], "tool_choice": "none"}], ids=["no tools", "tool_choice none"])
def test_a_reply_offered_no_tools_ends_where_it_would_begin_a_call(embedded, offered):
    """After a tool result the draft copies the history's call: '42\n<tool_call>\n{"name": "multiply",
    ...' had been the content of a request that offered no tools (a summary or answer turn that
    reuses an agent's history). The call tag now ends such a reply, as a role marker does."""
    for mode in ("online", "staged"):
        result = embedded.generate(CALLED, max_tokens=40, mode=mode, **offered)
        assert (result.text, result.content, result.finish_reason, result.tool_calls) == ("42", "42", "stop", ()), mode
    streamed = [event.text for event in embedded.stream(CALLED, max_tokens=40, **offered) if isinstance(event, TextDelta)]
    assert "".join(streamed) == "42"

