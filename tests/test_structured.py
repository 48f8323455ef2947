"""Grammar-constrained decoding on tiny random model pairs: validity, parity, rollback, parameters."""

from __future__ import annotations

import builtins
import json
import math
import re

import pytest
from pydantic import BaseModel
from tiny import make_tokenizer, tiny_llama

from wsd_llms import InvalidMessagesError, InvalidParameterError
from wsd_llms.grammar_schema import for_grammar
from wsd_llms.messages import normalize_messages
from wsd_llms.number_digits import digits_capped
from wsd_llms.open_json import json_path, open_at_end
from wsd_llms.params import GenerationParams, parse_params
from wsd_llms.prompts import build_prompts
from wsd_llms.runtime import WSDRuntime
from wsd_llms.structured import Cut, Guide, _validation_error, constraint_spec, parse_json, structured_fields
from wsd_llms.tools import TOOLS_SYSTEM, parse_reply, react_format

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["color", "ok", "n"],
}
TOOL = {"name": "pick", "description": "Pick a color", "parameters": SCHEMA}
CUT = Cut("the reply used up max_tokens=12", "raise max_tokens")  # what the engine says of a reply max_tokens ended
OPENAI_TOOL = {"type": "function", "function": {"name": "flag", "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}}}
SMALL = {"name": "n", "parameters": {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}}
QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: one two three"}],
    [{"role": "user", "content": "Hello there! Write a list."}],
]
SETTINGS = [{"switch_threshold": 0.05, "switch_window": 1}, {"switch_threshold": 0.5, "switch_window": 2}]


def _both(runtime, messages, max_tokens=60, **params):
    return [runtime.generate(messages, mode=mode, max_tokens=max_tokens, **params) for mode in ("staged", "online")]


@pytest.mark.parametrize("fixture", ["shared_runtime", "differ_runtime"])
def test_response_format_valid_and_online_equals_staged(fixture, request):
    runtime = request.getfixturevalue(fixture)
    for messages in QUESTIONS:
        for settings in SETTINGS:
            staged, online = _both(runtime, messages, response_format=SCHEMA, **settings)
            assert online.text == staged.text and online.switch_point == staged.switch_point
            assert online.parse_error is None, online.text
            assert set(online.parsed) == {"color", "ok", "n"}


@pytest.mark.parametrize("fixture", ["shared_runtime", "differ_runtime"])
def test_tools_and_response_format_reply_with_calls_or_the_value(fixture, request):
    """Every reply is valid calls or a valid value (never text), and online equals staged."""
    runtime = request.getfixturevalue(fixture)
    for messages in QUESTIONS:
        for settings in SETTINGS:
            staged, online = _both(runtime, messages, tools=[SMALL], response_format=SCHEMA, **settings)
            assert online.text == staged.text and online.switch_point == staged.switch_point
            if online.tool_calls or online.invalid_tool_calls:
                assert not online.invalid_tool_calls and online.parsed is None and online.content == "", online.text
            else:  # the tiny models answer with the value (calls are checked without a model above)
                assert online.parse_error is None and set(online.parsed) == {"color", "ok", "n"}, online.text


@pytest.mark.parametrize("fixture", ["shared_runtime", "differ_runtime"])
def test_forced_tool_call_online_equals_staged(fixture, request):
    runtime = request.getfixturevalue(fixture)
    for messages in QUESTIONS:
        staged, online = _both(runtime, messages, tools=[SMALL, OPENAI_TOOL], tool_choice="required", max_tokens=120, **SETTINGS[1])
        assert online.text == staged.text
        assert len(online.tool_calls) == 1 and not online.invalid_tool_calls, online.text
        named = runtime.generate(messages, tools=[SMALL, OPENAI_TOOL], tool_choice="flag", max_tokens=120)
        assert [c.name for c in named.tool_calls] == ["flag"] and isinstance(named.tool_calls[0].arguments["on"], bool)


@pytest.mark.parametrize("mode", ["online", "staged", "base", "draft"])
def test_a_stop_string_does_not_cut_a_call_s_markup(shared_runtime, mode):
    """A call is written `<tool_call>\n{...}\n</tool_call>`, markup the caller never sees: a stop
    of "\n" (or one of the call's own characters) cut every call there, leaving it invalid. Inside
    a call no stop counts; the same call comes as without the stop."""
    asked = dict(tools=[OPENAI_TOOL], tool_choice="flag", max_tokens=120, mode=mode)
    alone = shared_runtime.generate(QUESTIONS[0], **asked)
    for stop in (["\n"], ["}"], ['"on"']):
        stopped = shared_runtime.generate(QUESTIONS[0], stop=stop, **asked)
        assert [(c.name, c.arguments) for c in stopped.tool_calls] == [(c.name, c.arguments) for c in alone.tool_calls] != []
        assert not stopped.invalid_tool_calls and stopped.text.startswith(alone.text)


def test_a_forced_start_the_base_grammar_cannot_take_is_refused_in_every_mode_the_base_writes(differ_runtime):
    """The tiny tokenizers write a space as "▁", which xgrammar reads as that character: the base's
    tokens of a forced start with a space do not fit a JSON grammar that its text fits. Base mode
    refused it, and WSD modes dropped it from the reply without a word; the draft alone reads it
    as text and keeps it."""
    messages = [{"role": "user", "content": "Pick."}, {"role": "assistant", "content": '{"color": "red", "ok":'}]
    for mode in ("base", "online", "staged"):
        with pytest.raises(InvalidParameterError, match="as the base model's tokenizer writes it: the grammar takes its text, but only"):
            differ_runtime.generate(messages, mode=mode, max_tokens=30, response_format=SCHEMA)
    assert differ_runtime.generate(messages, mode="draft", max_tokens=30, response_format=SCHEMA).text.startswith('{"color": "red", "ok":')
    spaceless = [messages[0], {"role": "assistant", "content": '{"color":"red","ok":'}]
    for mode in ("base", "online", "staged"):
        assert differ_runtime.generate(spaceless, mode=mode, max_tokens=30, response_format=SCHEMA).text.startswith('{"color":"red","ok":')


def test_a_finished_last_turn_is_history_with_continue_final_message_false(differ_runtime):
    """continue_final_message=False reads a trailing assistant message as a turn of the conversation
    (LangGraph's structured-response step sends the agent's last answer so): both prompts hold it
    whole, and the reply is a new turn under the grammar, where the answer as a forced start does
    not fit it and is refused. Greedy online equals staged."""
    from wsd_llms.messages import normalize_messages
    from wsd_llms.prompts import build_prompts

    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "The answer is 5."}]
    engine = differ_runtime.load()
    ended = build_prompts(engine.draft.tokenizer, engine.base.tokenizer, normalize_messages(messages), continue_final=False)
    assert ended.forced_prefix == "" and ended.base_text.endswith("[User]\nWhat is 2+3?\n\n[Assistant]\nThe answer is 5.\n\n[Assistant]\n")
    draft_prompt = engine.draft.tokenizer.decode(ended.draft_ids).replace(" ", "")
    assert draft_prompt.endswith("<|assistant|>Theansweris5.</s><|assistant|>"), draft_prompt
    with pytest.raises(InvalidParameterError, match="forced start .* does not fit the request's grammar"):
        differ_runtime.generate(messages, response_format=SCHEMA, max_tokens=60)
    staged, online = _both(differ_runtime, messages, response_format=SCHEMA, max_tokens=60, continue_final_message=False)
    assert online.text == staged.text and not online.text.startswith("The answer") and online.text.startswith("{"), online.text


@pytest.mark.parametrize("fixture", ["shared_runtime", "differ_runtime"])
def test_text_formats_hold_the_reply_and_online_equals_staged(fixture, request):
    runtime = request.getfixturevalue(fixture)
    regex = {"type": "regex", "pattern": r"(yes|no), [a-z]{1,12}\."}
    react = react_format([SMALL, OPENAI_TOOL], answer=False)
    for messages in QUESTIONS:
        staged, online = _both(runtime, messages, response_format=regex, **SETTINGS[1])
        assert online.text == staged.text and re.fullmatch(regex["pattern"], online.text), online.text
        assert online.parsed is None and online.content == online.text
        # A random model's thought line runs to max_tokens; the whole step is checked above.
        staged, online = _both(runtime, messages, response_format=react, max_tokens=30, **SETTINGS[0])
        assert online.text == staged.text and online.text.startswith("Thought: ") and "\n" not in online.text


def test_role_markers_end_a_text_format_reply(shared_runtime):
    """A text grammar (regex, structural tag) holds text, in which the plain template's role markers
    still end the reply as they do unconstrained: the base must not run on into a next turn. (The
    grammar here forces one, where an any_text tag lets a model write one.)"""
    messages = QUESTIONS[0]
    turn = {"type": "regex", "pattern": r"Yes\n\n\[User\]\nNo"}
    for mode in ("base", "staged", "online"):
        result = shared_runtime.generate(messages, mode=mode, max_tokens=30, response_format=turn, switch_threshold=1.0)
        assert result.text == "Yes" and result.finish_reason == "stop", (mode, result.text)
    caller = shared_runtime.generate(messages, mode="base", max_tokens=30, response_format=turn, stop=["No"])
    assert caller.text == "Yes" and caller.stop_reason is None, caller.text  # the role marker came first
    inline = {"type": "regex", "pattern": r"Yes \[User\] No"}  # inside a line: the format's own text
    assert shared_runtime.generate(messages, mode="base", max_tokens=30, response_format=inline).text == "Yes [User] No"


@pytest.mark.parametrize("answer", [False, True])
def test_react_format_accepts_exactly_one_step(answer):
    import xgrammar as xgr

    grammar = xgr.Grammar.from_structural_tag(constraint_spec(parse_params(response_format=react_format([SMALL, OPENAI_TOOL], answer=answer))))
    accepts = lambda text: xgr.testing._is_grammar_accept_string(grammar, text)  # noqa: E731
    assert accepts('Thought: I need a tool.\nAction: n\nAction Input: {"n": 1}')
    assert accepts('Thought: Flip it.\nAction: flag\nAction Input: {"on": true}')
    assert not accepts('Thought: x\nAction: n\nAction Input: {"n": 3}')  # not the tool's schema
    assert not accepts('Thought: x\nAction: pick\nAction Input: {}')  # not a given tool
    assert not accepts('Thought: x\nAction: n\nAction Input: {"n": 1}\nObservation: 1')
    assert accepts("Thought: I know it.\nAnswer: Paris.") is answer
    with pytest.raises(InvalidParameterError, match="^react_format needs at least one tool, or answer=True$"):
        react_format([], answer=False)
    with pytest.raises(InvalidParameterError, match="^invalid react_format tools: tools must be a list of tool schemas, got str$"):
        react_format("n", answer=answer)  # as a request's tools are refused (it had been a plain ValueError)


def test_no_holdback_constrained_parity(differ_runtime, monkeypatch):
    """With no hold-back and scoring after every token, constrained replies still equal staged ones.

    (These random pairs rarely re-tokenize inside JSON; the matcher-level rollback property is
    checked directly by the next test.)"""
    import wsd_llms.online

    monkeypatch.setattr(wsd_llms.online, "HOLD_BACK", False)
    monkeypatch.setattr(wsd_llms.online, "MAX_SCORE_INTERVAL", 1)
    monkeypatch.setattr(wsd_llms.online, "MIN_SCORE_INTERVAL", 1)
    text_schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    for messages in QUESTIONS:
        for threshold in (0.9, 0.99):
            staged, online = _both(differ_runtime, messages, response_format=text_schema, switch_threshold=threshold, switch_window=6)
            assert online.text == staged.text and online.switch_point == staged.switch_point



def test_matcher_state_after_rollback_equals_state_without(differ_runtime):
    """Guide.sync over ids A then B (a rollback) leaves the same matcher state as B alone."""
    engine = differ_runtime.load()
    spec = constraint_spec(parse_params(response_format={"type": "json_object"}))
    tok = engine.base.tokenizer
    a = tok.encode('{"key":"valueone","other":1', add_special_tokens=False)
    b = tok.encode('{"key":"val","x":[true', add_special_tokens=False)
    rolled, fresh = Guide(engine.base, spec), Guide(engine.base, spec)
    assert rolled.sync(a) == len(a)
    assert rolled.sync(b) == fresh.sync(b) == len(b)
    assert rolled.ids == fresh.ids
    for guide in (rolled, fresh):
        guide.matcher.fill_next_token_bitmask(guide.bitmask)
    assert bool((rolled.bitmask == fresh.bitmask).all())
    assert rolled.matcher.is_terminated() == fresh.matcher.is_terminated()
    # A rejected id cuts there, and a later call over an accepted list recovers fully.
    bad = tok.encode('{"key"}}', add_special_tokens=False)
    assert rolled.sync(bad) < len(bad)
    assert rolled.sync(b) == len(b)


@pytest.mark.parametrize("missing", ["xgrammar", "jsonschema"])
def test_missing_extra_names_it(monkeypatch, missing):
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == missing or name.startswith(missing + "."):
            raise ImportError(f"No module named {missing!r}", name=missing)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(ImportError, match=rf"\({missing} is missing\): pip install 'wsd-llms\[structured\]'"):
        parse_params(response_format={"type": "json_object"})
    with pytest.raises(ImportError, match="structured"):
        parse_params(tools=[TOOL])
    parse_params(tools=[TOOL], tool_choice="none")  # no grammar, no xgrammar needed


def test_an_xgrammar_too_old_is_named_at_the_call(monkeypatch):
    """Another package's older pin can leave an xgrammar without what decoding calls: the call says
    so, instead of each reply failing after it is decoded."""
    import importlib.metadata

    from wsd_llms import structured

    versions = {"xgrammar": "0.2.0"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    with pytest.raises(ImportError, match=r"need xgrammar>=0\.2\.5, and this environment has xgrammar 0\.2\.0: pip install -U"):
        parse_params(response_format={"type": "json_object"})
    versions["xgrammar"] = "0.2.5.post1"
    structured.require_xgrammar()


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"tools": [TOOL], "tool_choice": "nope"}, "tool_choice='nope'"),
        ({"tools": [TOOL], "tool_choice": "nope"}, "tools given: pick"),
        ({"tools": [{"description": "x"}]}, "tools[0] needs a 'name'"),
        ({"tools": [TOOL, TOOL]}, "tool names must be unique"),
        ({"tools": "pick"}, "tools must be a list"),
        ({"tools": [{"name": "a", "parameters": {"type": "string"}}]}, "of type 'object'"),
        ({"tools": [{"name": "a", "parameter": SCHEMA}]}, "tools[0] (a) has unknown key 'parameter'; did you mean 'parameters'?"),
        ({"tools": [{"type": "function", "function": TOOL, "extra": 1}]}, "tools[0] (pick) has unknown key 'extra'"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "has type 'web_search_20250305', which is not a function tool"),
        ({"tools": [{"type": "custom", "name": "f", "format": {}}]}, "a 'custom' tool needs an 'input_schema'"),
        ({"tools": [TOOL], "response_format": SCHEMA, "tool_choice": "required"}, "response_format with tools needs tool_choice 'auto'"),
        ({"parallel_tool_calls": "maybe"}, "parallel_tool_calls"),
        ({"response_format": {"type": "regex"}}, 'needs a "pattern" string'),
        ({"response_format": {"type": "structural_tag", "format": "x"}}, 'needs a "format" object'),
        ({"response_format": {"type": "json_schema"}}, 'a json_schema response_format needs a "json_schema" object'),  # OpenAI's, its body left out
        ({"response_format": {"type": "json_schema", "json_schema": "x"}}, 'needs a "json_schema" object'),
    ],
)
def test_bad_structured_params(params, needle):
    with pytest.raises(InvalidParameterError) as err:
        parse_params(**params)
    assert needle in str(err.value)


def test_a_rule_across_parameters_is_reported_without_echoing_every_parameter():
    with pytest.raises(InvalidParameterError) as err:
        parse_params(tools=[TOOL], tool_choice="nope")
    assert str(err.value).startswith("invalid parameters: tool_choice='nope' is neither")
    assert "'parameters'" not in str(err.value)  # the tool's schema is not dumped into the message


def test_tool_forms():
    """OpenAI's function, wrapped (Chat Completions) or flat (Responses; strict changes nothing), and
    Anthropic's tool, whose schema is input_schema, give the same tool."""
    openai = {"name": "pick", "description": "Pick a color", "parameters": SCHEMA, "strict": True}
    anthropic = {"name": "pick", "description": "Pick a color", "input_schema": SCHEMA, "cache_control": {"type": "ephemeral"}}
    responses_api = {"type": "function", **openai}  # OpenAI's Responses API: flat
    forms = [TOOL, openai, {"type": "function", "function": openai}, responses_api, anthropic, {"type": "custom", **anthropic}]
    assert all(parse_params(tools=[form]).tools == parse_params(tools=[TOOL]).tools for form in forms)


def test_param_forms():
    class Point(BaseModel):
        x: int

    assert parse_params(response_format=Point).response_format["properties"]["x"]["type"] == "integer"
    assert parse_params(response_format={"type": "json_object"}).response_format == {"type": "object"}
    assert parse_params(response_format={"type": "text"}).response_format is None  # OpenAI's plain text
    wrapped = {"type": "json_schema", "json_schema": {"name": "point", "schema": SCHEMA, "strict": True}}
    assert parse_params(response_format=wrapped).response_format == SCHEMA
    # OpenAI's wrapper without a schema is any JSON object (its own keys were taken as the schema)
    assert parse_params(response_format={"type": "json_schema", "json_schema": {"name": "x"}}).response_format == {"type": "object"}
    # The schema in its other wrappers: OpenAI's inner object, and a json_object's (llama.cpp's
    # server): the first was read as a schema of unknown keywords (any value), the second dropped.
    assert parse_params(response_format={"name": "point", "schema": SCHEMA, "strict": True}).response_format == SCHEMA
    assert parse_params(response_format={"type": "json_object", "schema": SCHEMA}).response_format == SCHEMA
    for bad, said in (({"type": "json_object", "properties": {}}, "not 'properties'"), ({"type": "json_object", "schema": "x"}, "must be a JSON schema")):
        with pytest.raises(InvalidParameterError, match=f"invalid response_format.*{said}"):
            parse_params(response_format=bad)
    p = parse_params(tools=[OPENAI_TOOL], tool_choice={"type": "function", "function": {"name": "flag"}})
    assert p.tools[0]["name"] == "flag" and p.tool_choice == "flag"
    assert parse_params(tools=[TOOL], tool_choice="any").tool_choice == "required"


def test_a_schema_nested_too_deeply_is_refused_with_a_clear_error():
    """A schema nested past what Python's recursion reaches (jsonschema's check at about 150 levels of
    `items`, JSON's writer and repr at about 1000) is an InvalidParameterError, not a RecursionError."""
    for depth, said in ((150, "it is nested too deeply to check"), (2000, "nested too deeply to write as JSON")):
        schema: dict = {"type": "boolean"}
        for _ in range(depth):
            schema = {"type": "array", "items": schema}
        with pytest.raises(InvalidParameterError, match=said):
            parse_params(response_format=schema)
        with pytest.raises(InvalidParameterError, match=said):
            parse_params(tools=[{"name": "deep", "parameters": {"type": "object", "properties": {"x": schema}}}])


def test_parse_reply_reports_invalid_calls():
    text = (
        'Sure.\n<tool_call>\n{"name": "pick", "arguments": {"color": "red", "ok": true, "n": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "pick", "arguments": {"color": "pink", "ok": true, "n": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "pick", "argu'
    )
    content, calls, invalid = parse_reply(text, [TOOL])
    assert content == "Sure."
    assert [c.arguments["color"] for c in calls] == ["red"]
    assert [i.name for i in invalid] == ["pick", "nope", "pick"]  # a cut-off call still names its tool
    assert "does not match" in invalid[0].error and "unknown tool 'nope'" in invalid[1].error
    assert invalid[2].raw.endswith('"argu')
    # a cut-off call to a tool whose name holds an escape names it too (its name was None), decoded
    escaped = {**TOOL, "name": 'say "hi"'}
    assert [i.name for i in parse_reply('<tool_call>\n{"name": "say \\"hi\\"", "arguments": {"co', [escaped])[2]] == ['say "hi"']


def test_json_nested_too_deeply_to_parse_is_reported_like_other_bad_json():
    """json.loads raises RecursionError for JSON nested some thousand levels deep: a reply, a tool
    call's arguments or a message's tool-call arguments that deep are reported as JSON that does
    not parse (a parse error, an invalid call, InvalidMessagesError), not raised as a crash."""
    deep = "[" * 100_000 + "]" * 100_000
    assert parse_json(deep, {"type": "array"}) == (None, "the reply is not valid JSON: it is nested too deeply to parse")
    content, calls, invalid = parse_reply(f'<tool_call>\n{{"name": "pick", "arguments": {{"n": {deep}}}}}\n</tool_call>', [TOOL])
    assert (content, calls, [i.name for i in invalid]) == ("", [], ["pick"])
    assert "nested too deeply" in invalid[0].error
    with pytest.raises(InvalidMessagesError, match="arguments are not valid JSON"):
        normalize_messages([{"role": "assistant", "content": "", "tool_calls": [{"name": "pick", "arguments": f'{{"n": {deep}}}'}]}])


@pytest.mark.parametrize("tail", ["<", "<tool", "<tool_call"])
def test_a_call_tag_cut_short_is_not_content(tail):
    """max_tokens can end a reply inside the opening tag of its next call: that is not text, but a
    call cut short, reported as invalid (it was dropped without a word: a forced call at a tiny
    max_tokens came back as neither a call nor an error)."""
    call = '<tool_call>\n{"name": "pick", "arguments": {"color": "red", "ok": true, "n": 2}}\n</tool_call>'
    content, calls, invalid = parse_reply(f"{call}\n{tail}", [TOOL], CUT)
    assert (content, len(calls)) == ("", 1)
    assert [(c.raw, c.error) for c in invalid] == [(tail, "the call's tag is cut short (the reply used up max_tokens=12 first; raise max_tokens)")]
    assert parse_reply(f"Let me pick.\n{tail}", [TOOL], CUT)[0] == "Let me pick."
    assert [c.raw for c in parse_reply(tail, [TOOL], CUT)[2]] == [tail]  # a forced call's reply
    # after text, a "<" may be text (the content drops it, but no call is made up); not cut: the model's text
    assert parse_reply(f"Let me pick.\n{tail}", [TOOL], CUT)[2] == parse_reply(f"Let me pick.\n{tail}", [TOOL])[2] == []
    assert parse_reply(f"Let me pick.\n{tail}", [TOOL])[0] == f"Let me pick.\n{tail}"  # not cut: the model wrote it
    assert parse_reply("a < b", [TOOL], CUT)[0] == "a < b"


def test_auto_tool_choice_holds_every_call_in_text_to_the_tools():
    """With tool_choice="auto" a reply may be text, a call, or text then a call; a call written after
    text is constrained like one at the start (an unknown tool or a wrong type is impossible)."""
    import xgrammar as xgr

    def accepts(text, **params):
        grammar = xgr.Grammar.from_structural_tag(constraint_spec(parse_params(tools=[TOOL], **params)))
        return xgr.testing._is_grammar_accept_string(grammar, text)

    call = '<tool_call>\n{"name": "pick", "arguments": {"color": "red", "ok": true, "n": 2}}\n</tool_call>'
    assert accepts("Just text, a < b.") and accepts(call) and accepts("Let me pick.\n" + call)
    assert not accepts("Let me pick.\n" + call.replace('"pick"', '"pik"'))
    assert not accepts("Let me pick.\n" + call.replace("true", '"yes"'))
    assert not accepts(call + "\n" + call) and accepts(call + "\n" + call, parallel_tool_calls=True)
    assert not accepts("Let me pick.\n" + call, tool_choice="required")


def test_a_tool_named_in_any_script_is_called_as_the_prompt_shows_it():
    """The grammar writes a tool's name as the prompt's tool list and call history show it (it forced
    the escaped form \\u5929\\u6c14, which the model never saw, and a forced start with the name refused)."""
    import xgrammar as xgr

    tool = {"name": "天气", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    params = parse_params(tools=[tool], tool_choice="required")
    grammar = xgr.Grammar.from_structural_tag(constraint_spec(params))
    call = '<tool_call>\n{"name": "天气", "arguments": {"city": "北京"}}\n</tool_call>'
    assert xgr.testing._is_grammar_accept_string(grammar, call)
    assert [(c.name, c.arguments) for c in parse_reply(call, params.tools)[1]] == [("天气", {"city": "北京"})]


@pytest.mark.parametrize("mode", ["online", "base", "draft"])
def test_a_grammar_the_tokenizer_cannot_write_is_the_request_s_error(shared_runtime, draft_tokenizer, mode):
    """A schema's value or a tool's name in characters the tokenizer has no token for (and no byte
    fallback) leaves the grammar no token to take: an InvalidParameterError naming the model, not
    "RuntimeError: the grammar rejected token 0" as a request failure that a retry would meet again.
    Requests beside it are answered as alone."""
    from concurrent.futures import ThreadPoolExecutor

    from wsd_llms import WSDError

    assert draft_tokenizer.encode("é", add_special_tokens=False) == [0]  # no token of its own: the unknown one
    accented = {"type": "object", "properties": {"c": {"enum": ["é"]}}, "required": ["c"]}
    tool = {"name": "get_ü", "parameters": {"type": "object", "properties": {}}}
    question = [{"role": "user", "content": "Name a colour."}]
    alone = shared_runtime.generate(question, max_tokens=20, mode=mode).text
    with ThreadPoolExecutor(3) as pool:
        beside = pool.submit(shared_runtime.generate, question, max_tokens=20, mode=mode)
        bad = [pool.submit(shared_runtime.generate, question, max_tokens=40, mode=mode, **p) for p in ({"response_format": accented}, {"tools": [tool], "tool_choice": "get_ü"})]
        for future in bad:
            with pytest.raises(InvalidParameterError, match=r"ask for text that the tokenizer of 'tiny-(draft|base)' cannot write \(a character it has no token for") as err:
                future.result(timeout=60)
            assert isinstance(err.value, WSDError)
        assert beside.result(timeout=60).text == alone


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "zz"], "additionalProperties": True},  # zz may be written
        {"type": "object", "properties": {"required": {"type": "object", "properties": {"x": {}}, "required": ["x"]}}, "required": ["required"]},
        {"type": "object", "properties": {"a": {"enum": [{"required": ["nothing"], "pattern": "(?!x)"}]}}},  # data, not schemas
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+\\d?$"}}, "$defs": {"n": {"type": "integer"}}, "required": ["a"]},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#"}}, "$defs": {"n": {"type": "integer"}}},
        {"type": "object", "properties": {"a": {"allOf": [{"$ref": "#/$defs/n"}]}}, "$defs": {"n": {"type": "integer"}}},  # one schema: held
        # a definition nothing uses is never compiled: its pattern was refused
        {"type": "object", "properties": {"a": {"type": "integer"}}, "$defs": {"unused": {"type": "string", "pattern": "^(?!x).*"}}},
    ],
)
def test_schemas_the_grammar_holds_are_taken(schema):
    """The refusals of anchors, lookaheads and required names that are no property leave alone what
    xgrammar holds: names a later property may take, data that looks like a schema, plain patterns."""
    assert parse_params(response_format=schema).response_format == schema


UNWRITABLE = {"type": "object", "properties": {"a": {"enum": {1, 2}}}}


class Unbounded(BaseModel):
    limit: float = math.inf


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"tools": [{"name": "none", "parameters": {}}]}, "tools[0] is named 'none', which tool_choice reads as a keyword"),
        ({"tools": [{"name": "t", "parameters": {"type": "object", "properties": {"a": {"enum": {1, 2}}}}}]}, "tools[0] (t) parameters hold a value JSON cannot write"),
        ({"response_format": {"type": "object", "properties": {"a": {"default": builtins.object()}}}}, "the schema's values hold a value JSON cannot write"),
        # in OpenAI's and llama.cpp's wrappers too (they raised a bare TypeError)
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": UNWRITABLE}}}, "the schema's values hold a value JSON cannot write"),
        ({"response_format": {"name": "x", "schema": UNWRITABLE}}, "the schema's values hold a value JSON cannot write"),
        ({"response_format": {"type": "json_object", "schema": UNWRITABLE}}, "the schema's values hold a value JSON cannot write"),
        # Infinity is no JSON: it failed in xgrammar, as a "syntax error near: Infinity"
        ({"response_format": Unbounded}, "the schema's values hold a value JSON cannot write: Out of range float"),
        ({"tools": [{"name": "t", "parameters": {"type": "object", "properties": {"a": {"default": math.nan}}}}]}, "tools[0] (t) parameters hold a value JSON cannot write: Out of range float"),
    ],
)
def test_tools_and_schemas_that_cannot_work_are_named(params, needle):
    """A tool named like a tool_choice keyword could not be chosen by name (choosing 'none' turned
    tools off); a schema with a value JSON cannot write raised a bare TypeError, or, for inf or nan,
    xgrammar's parse error of the grammar's JSON."""
    with pytest.raises(InvalidParameterError, match=re.escape(needle)):
        parse_params(**params)


def test_calls_parse_whatever_their_strings_hold():
    """A call's JSON ends where its JSON ends: an argument may hold the closing tag (the call was cut
    there and markup leaked into the content), and a const or enum holding an object or a list is
    checked as the grammar writes it (it was re-spaced and refused)."""
    import xgrammar as xgr


    echo = {"name": "echo", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}
    sized = {"type": "object", "properties": {"size": {"enum": [[1, 2], [3, 4]]}, "opts": {"const": {"mode": "fast"}}}, "required": ["size", "opts"]}
    resize = {"name": "resize", "parameters": sized}
    params = parse_params(tools=[echo, resize], parallel_tool_calls=True)
    grammar = xgr.Grammar.from_structural_tag(constraint_spec(params))
    first = '<tool_call>\n{"name": "echo", "arguments": {"text": "x</tool_call>y"}}\n</tool_call>'
    second = '<tool_call>\n{"name": "resize", "arguments": {"size": [1,2], "opts": {"mode":"fast"}}}\n</tool_call>'
    reply = f"Sure.\n{first}\n{second}"
    assert xgr.testing._is_grammar_accept_string(grammar, reply)
    content, calls, invalid = parse_reply(reply, params.tools)
    assert content == "Sure." and not invalid
    assert [(c.name, c.arguments) for c in calls] == [("echo", {"text": "x</tool_call>y"}), ("resize", {"size": [1, 2], "opts": {"mode": "fast"}})]
    # a call cut short whose string holds the closing tag is not closed there (markup leaked into the content)
    cut = 'A\n<tool_call>\n{"name": "echo", "arguments": {"text": "x</tool_call>y'
    content, calls, invalid = parse_reply(cut, params.tools, CUT)
    assert content == "A" and not calls and [i.error for i in invalid] == ["the call is not closed with </tool_call> (the reply used up max_tokens=12 first; raise max_tokens)"]
    assert [i.error for i in parse_reply(cut, params.tools)[2]] == ["the call is not closed with </tool_call> (the reply ended first)"]
    # one whose JSON is whole, cut before or inside its closing tag, is made, as OpenAI gives it (a
    # stream had shown it whole and invoke called it invalid)
    for tail in ("", "\n", "\n</tool", "\n</tool_call"):
        whole = 'A\n<tool_call>\n{"name": "echo", "arguments": {"text": "x</tool_call>y"}}' + tail
        content, calls, invalid = parse_reply(whole, params.tools, CUT)
        assert (content, [c.arguments for c in calls], invalid) == ("A", [{"text": "x</tool_call>y"}], []), tail
    assert parse_reply(whole + "\nmore", params.tools, CUT)[2]  # not a cut tag: the call is not closed
    # a call with a key the grammar does not write is still read (its arguments were sliced wrongly)
    extra = '<tool_call>\n{"name": "echo", "arguments": {"text": "hi"}, "id": 1}\n</tool_call>'
    assert [(c.name, c.arguments) for c in parse_reply(extra, params.tools)[1]] == [("echo", {"text": "hi"})]
    # with a response_format, a value is a value whatever its strings hold (it was read as a call)
    params = parse_params(tools=[echo], response_format={"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})
    value = '{"s": "write <tool_call> to call"}'
    assert xgr.testing._is_grammar_accept_string(xgr.Grammar.from_structural_tag(constraint_spec(params)), value)
    fields = structured_fields(value, params)
    assert fields["parsed"] == {"s": "write <tool_call> to call"} and fields["content"] == value and "tool_calls" not in fields


def test_tools_with_a_response_format_give_calls_or_the_value():
    """OpenAI's semantics, which LangChain's create_agent(..., response_format=ProviderStrategy(...))
    relies on: the reply calls tools, or it is the response_format's value; nothing else."""
    import xgrammar as xgr


    params = parse_params(tools=[TOOL], response_format=SCHEMA)
    grammar = xgr.Grammar.from_structural_tag(constraint_spec(params))
    call = '<tool_call>\n{"name": "pick", "arguments": {"color": "red", "ok": true, "n": 2}}\n</tool_call>'
    value = '{"color": "blue", "ok": false, "n": 3}'
    assert xgr.testing._is_grammar_accept_string(grammar, call)
    assert xgr.testing._is_grammar_accept_string(grammar, value)
    assert not xgr.testing._is_grammar_accept_string(grammar, "Some text.")
    assert not xgr.testing._is_grammar_accept_string(grammar, "Some text.\n" + call)
    fields = structured_fields(call, params)
    assert [c.name for c in fields["tool_calls"]] == ["pick"] and fields.get("parsed") is None
    fields = structured_fields(value, params)
    assert fields["parsed"] == {"color": "blue", "ok": False, "n": 3} and fields["parse_error"] is None and "tool_calls" not in fields


def test_calls_show_as_they_are_written_and_finish_in_order():
    """begun_calls: each call's name once written, and its arguments' text, which only grows with the
    reply and ends where their JSON does (a string may hold braces and the closing tag);
    calls_in_order: parse_reply's valid and invalid calls in the order they were written."""
    from wsd_llms.tools import begun_calls, calls_in_order

    args = '{"note": "a } and </tool_call>", "n": 1}'
    text = (
        f'Text.\n<tool_call>\n{{"name": "pick", "arguments": {args}}}\n</tool_call>\n'
        '<tool_call>\n{"name": "n", "arguments": {"n": 7}}\n</tool_call>\n'
        '<tool_call>\n{"name": "n", "arguments": {"n": 2}}\n</tool_call>'
    )
    seen: dict[int, str] = {}
    for end in range(len(text) + 1):
        for index, begun in enumerate(begun_calls(text[:end])):
            if begun is not None:
                assert begun[1].startswith(seen.get(index, "")), (end, begun)
                seen[index] = begun[1]
    assert [b for b in begun_calls(text)] == [("pick", args), ("n", '{"n": 7}'), ("n", '{"n": 2}')]
    assert begun_calls('<tool_call>\n{"name": "pi') == [None] and begun_calls('<tool_call>\n{"name":"n","arguments":{}}') == [None]
    tools = [{"name": "pick", "parameters": {"type": "object"}}, SMALL]
    content, calls, invalid = parse_reply(text, tools)
    assert [c.name for c in calls] == ["pick", "n"] and len(invalid) == 1  # 7 is not one of n's values
    assert [getattr(c, "arguments", None) for c in calls_in_order(text, calls, invalid)] == [{"note": "a } and </tool_call>", "n": 1}, None, {"n": 2}]


def test_a_value_off_its_schema_is_not_parsed():
    """A value that breaks a keyword the grammar does not enforce (uniqueItems) gets a parse_error and
    no `parsed` (it had held the invalid value beside the error, for a caller that reads only it)."""

    params = parse_params(response_format={"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}})
    fields = structured_fields('{"tags": ["a", "a"]}', params)
    assert "uniqueItems" in fields["parse_error"] and fields["parsed"] is None and fields["content"] == '{"tags": ["a", "a"]}'
    assert structured_fields('{"tags": ["a", "b"]}', params)["parsed"] == {"tags": ["a", "b"]}


def test_a_json_reply_cut_short_says_what_ended_it(draft_tokenizer):
    """parse_error says what ended a JSON value early and what to do (both adapters pass it on):
    max_tokens (raise it), or the base model's context window where that capped max_tokens
    (shorten the messages). A reply that ended on its own, or whose JSON is whole, says neither."""
    import dataclasses

    from tiny import tiny_llama

    from wsd_llms import WSDRuntime

    draft, base = (tiny_llama(draft_tokenizer, 0, name, sharpen=3.0) for name in ("tiny-draft", "tiny-base"))
    long_name = {"type": "object", "properties": {"name": {"type": "string", "minLength": 30}}, "required": ["name"]}
    schema, messages = {"type": "json_schema", "json_schema": {"schema": long_name}}, [{"role": "user", "content": "A city as JSON."}]

    def reply(base_model, **params):
        runtime = WSDRuntime.from_models(draft, base_model)
        try:
            return runtime.generate(messages, response_format=schema, **params)
        finally:
            runtime.close()

    cut = reply(base, max_tokens=6)
    assert cut.finish_reason == "length" and cut.parsed is None
    assert cut.parse_error.startswith("the reply used up max_tokens=6 before its JSON was complete (the reply is not valid JSON: ")
    assert cut.parse_error.endswith("; raise max_tokens")
    prompt = cut.usage.base_prompt_tokens
    capped = reply(dataclasses.replace(base, context_window=prompt + 6), max_tokens=500)
    assert capped.finish_reason == "length" and capped.parse_error.startswith(
        f"the reply reached the base model's context window ({prompt + 6} tokens with the prompt's {prompt}) before its JSON was complete ("
    )
    assert capped.parse_error.endswith("; shorten the messages")
    stopped = reply(base, max_tokens=40, stop=[":"])  # a stop string that the JSON holds
    assert (stopped.finish_reason, stopped.stop_reason, stopped.text.strip(), stopped.parsed) == ("stop", ":", '{"name"', None)
    assert stopped.parse_error.startswith("the stop string ':' ended the reply before its JSON was complete (the reply is not valid JSON: ")
    assert stopped.parse_error.endswith("; leave ':' out of stop")
    assert cut.stop_reason is None and reply(base, max_tokens=40, stop=["@@"]).stop_reason is None  # only a stop that ended it
    params = parse_params(response_format=SCHEMA)
    assert "max_tokens" not in structured_fields('{"color": "bl', params)["parse_error"]
    assert structured_fields('{"color": "blue", "ok": false, "n": 3}', params, CUT)["parse_error"] is None


SET_LR = {
    "name": "set_lr",
    "description": "",
    "parameters": {"type": "object", "properties": {"lr": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["lr"]},
}


def test_numbers_are_checked_as_written():
    """A bounded number's grammar writes no exponents; the check must see 0.00001 as the model wrote
    it, not as Python re-spells it (1e-05), or a valid call is reported invalid."""
    bounded, tool = SET_LR["parameters"], SET_LR
    for written, value in (("0.00001", 1e-05), ("0.5", 0.5), ("1", 1)):
        _, calls, invalid = parse_reply(f'<tool_call>\n{{"name": "set_lr", "arguments": {{"lr": {written}}}}}\n</tool_call>', [tool])
        assert not invalid and calls[0].arguments == {"lr": value}
        assert parse_json(f'{{"lr": {written}}}', bounded) == ({"lr": value}, None)
    _, calls, invalid = parse_reply('<tool_call>\n{"name": "set_lr", "arguments": {"lr": 1.5}}\n</tool_call>', [tool])
    assert not calls and "does not match" in invalid[0].error


def test_a_number_that_may_not_be_whole_or_that_no_float_holds_is_not_parsed(shared_runtime):
    """A reply of a number that max_tokens cut parsed as the digits written so far (9 of 94...), and
    1e999 as inf, which JSON cannot write again (a call's arguments went on as "Infinity"); JSON's
    missing NaN and Infinity are refused as well."""
    messages = [{"role": "user", "content": "How many?"}]
    shorter, longer = (shared_runtime.generate(messages, response_format={"type": "integer"}, max_tokens=n) for n in (1, 2))
    assert longer.text.startswith(shorter.text) and len(longer.text) > len(shorter.text)  # it went on
    assert shorter.parsed is None and shorter.parse_error == (
        f"the reply used up max_tokens=1 right after the number {shorter.text}, which may not be whole; raise max_tokens"
    )
    integer = parse_params(response_format={"type": "integer"})
    assert structured_fields("12", integer, CUT)["parse_error"].startswith("the reply used up max_tokens=12 right after the number 12")
    assert structured_fields("12 ", integer, CUT)["parsed"] == structured_fields("12", integer)["parsed"] == 12  # ended by its own mark
    assert structured_fields("true", parse_params(response_format={"type": "boolean"}), CUT)["parsed"] is True
    for text, error in (("1e999", "the number 1e999 is beyond the range of a 64-bit float"), ("[1, NaN]", "NaN is not JSON")):
        assert parse_json(text, {}) == (None, f"the reply is not valid JSON: {error}")
    _, calls, invalid = parse_reply('<tool_call>\n{"name": "set_lr", "arguments": {"lr": -1e400}}\n</tool_call>', [SET_LR])
    assert not calls and invalid[0].error == "the number -1e400 is beyond the range of a 64-bit float"


def test_a_raw_control_character_the_grammar_lets_through_is_read():
    """xgrammar's rule for a string with maxLength (or minLength) lets raw control characters
    through, a tab say, which strict JSON refuses: the value is still the reply's, not a parse
    error, and a call's arguments are written out again with the character escaped."""
    import json

    import xgrammar as xgr

    bounded = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 8}}, "required": ["note"]}
    text = '{"note": "a\tb"}'
    assert xgr.testing._is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(bounded)), text)
    assert parse_json(text, bounded) == ({"note": "a\tb"}, None)
    tool = {"name": "jot", "description": "", "parameters": bounded}
    _, calls, invalid = parse_reply(f'<tool_call>\n{{"name": "jot", "arguments": {text}}}\n</tool_call>', [tool])
    assert not invalid and calls[0].arguments == {"note": "a\tb"}


def test_strict_json_escapes_what_strict_parsers_refuse_and_leaves_the_rest():
    """strict_json (LlamaIndex's pydantic validation): a raw tab escaped, numbers as written, and JSON
    nested deeper than it can write again (Python's parser takes more) left for the parser as it is."""
    from wsd_llms.structured import strict_json

    assert strict_json('{"a": "x\ty", "n": 1.50, "big": 12345678901234567890}') == '{"a": "x\\ty", "n": 1.50, "big": 12345678901234567890}'
    deep = '{"v": ' + "[" * 400 + "]" * 400 + "}"
    assert strict_json(deep) == deep and strict_json("not json") == "not json"


def test_keywords_the_grammar_does_not_enforce_are_still_checked():
    """xgrammar's grammar leaves some keywords unenforced (uniqueItems, not, ...); jsonschema checks
    them, so parse_error and invalid_tool_calls never pass a value the schema rejects. References
    resolve within the schema only: nothing is fetched."""
    schema = {
        "$defs": {"size": {"type": "integer", "not": {"const": 13}}},
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "size": {"$ref": "#/$defs/size"}},
        "required": ["tags", "size"],
    }
    assert parse_json('{"tags": ["a", "b"], "size": 12}', schema) == ({"tags": ["a", "b"], "size": 12}, None)
    _, error = parse_json('{"tags": ["a", "a"], "size": 12}', schema)
    assert "non-unique" in error and "$.tags" in error and "uniqueItems" in error
    _, error = parse_json('{"tags": [], "size": 13}', schema)
    assert "$.size" in error and "'not'" in error
    tool = {"name": "label", "description": "", "parameters": schema}
    _, calls, invalid = parse_reply('<tool_call>\n{"name": "label", "arguments": {"tags": ["x", "x"], "size": 1}}\n</tool_call>', [tool])
    assert not calls and "non-unique" in invalid[0].error
    remote = {"type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}
    assert parse_json('{"x": 1}', remote) == ({"x": 1}, None)  # unresolvable: left unchecked (a request with it is refused)
    unicode_class = {"type": "object", "properties": {"x": {"type": "string", "pattern": "^\\p{L}+$"}}}
    assert _validation_error({"x": "abc"}, unicode_class) is None  # Python's re cannot read \p{L}: the grammar held it
    # formats, as far as jsonschema checks them: the grammar writes a date's digits, not its calendar
    import json

    import xgrammar as xgr

    day = {"type": "object", "properties": {"on": {"type": "string", "format": "date"}}, "required": ["on"]}
    assert xgr.testing._is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(day)), '{"on": "2023-02-29"}')
    assert "is not a 'date'" in parse_json('{"on": "2023-02-29"}', day)[1] and parse_json('{"on": "2024-02-29"}', day)[1] is None
    at = {"type": "string", "format": "date-time"}
    assert "is not a 'date-time'" in _validation_error("2023-02-30T10:00:00Z", at) and _validation_error("2024-02-29T10:00:00Z", at) is None


def test_a_key_written_twice_is_not_passed_as_one_value():
    """A map's grammar (additionalProperties) lets a model write a key again; a parser keeps only
    the last value, so the reply is not passed as valid: the value as written is not the one parsed."""
    counts = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert parse_json('{"a": 1, "b": 2}', counts) == ({"a": 1, "b": 2}, None)
    value, error = parse_json('{"a": 1, "b": 2, "a": 3}', counts)
    assert value == {"a": 3, "b": 2} and error == "the key 'a' is written more than once in one object, and JSON keeps only its last value"
    assert "'x'" in parse_json('[{"x": {"y": 1}}, {"x": 1, "x": 1}]', {})[1]  # at any depth
    tool = {"name": "tally", "description": "", "parameters": counts}
    _, calls, invalid = parse_reply('<tool_call>\n{"name": "tally", "arguments": {"n": 1, "n": 2}}\n</tool_call>', [tool])
    assert not calls and invalid[0].error.startswith("the key 'n' is written more than once") and invalid[0].name == "tally"


OPEN_MEMBERS = [
    ({"type": "array", "maxItems": 3}, '["a", 1]'),
    ({"type": "array", "minItems": 2, "uniqueItems": True}, "[1, 2]"),
    ({"type": "array", "contains": {"type": "integer"}, "minContains": 2}, '[1, "a", 2]'),
    ({"type": ["array", "null"], "maxItems": 2, "description": "or none"}, "[true]"),
    ({"type": "object", "maxProperties": 2}, '{"a": 1, "b": [2]}'),
    ({"type": "object", "properties": {"t": {"type": "array", "nullable": True}}, "required": ["t"]}, '{"t": [1]}'),
]


@pytest.mark.parametrize("schema, text", OPEN_MEMBERS)
def test_an_array_or_object_that_gives_no_members_takes_any(schema, text):
    """JSON Schema reads an array without items, or an object without properties, as taking any;
    xgrammar's strict mode held it to [] (or {}) once it had another keyword, and refused minItems.
    Such a schema is now taken, and a value with members passes the replay of its grammar."""
    assert parse_params(response_format=schema).response_format == schema
    assert parse_json(text, schema) == (json.loads(text), None)


DRAFT_7, DRAFT_4 = "http://json-schema.org/draft-07/schema#", "http://json-schema.org/draft-04/schema#"


@pytest.mark.parametrize(
    "schema, valid, invalid",
    [
        ({"$schema": DRAFT_7, "type": "array", "items": [{"type": "integer"}, {"type": "string"}]}, ['[1, "a"]', "[1]"], ['["a", 1]', '[1, "a", 2]']),
        ({"$schema": DRAFT_7, "type": "array", "items": [{"type": "integer"}], "additionalItems": {"type": "string"}}, ['[1, "a", "b"]'], ["[1, 2]"]),
        (
            {"$schema": DRAFT_4, "type": "object", "properties": {"n": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 10, "exclusiveMaximum": False}}, "required": ["n"]},
            ['{"n": 0.5}', '{"n": 10}'],
            ['{"n": 0}', '{"n": 11}'],
        ),
    ],
)
def test_an_older_draft_s_forms_are_held(schema, valid, invalid):
    """A tuple's items list (drafts 4 to 7) and draft 4's boolean exclusiveMinimum, which xgrammar
    refused ('items must be a boolean or an object', 'Value must be a number'), are held as the
    2020-12 forms they mean; a tuple writes no more items than it lists unless it gives them."""
    assert parse_params(response_format=schema).response_format == schema
    for text in valid:
        assert parse_json(text, schema) == (json.loads(text), None), text
    for text in invalid:
        assert parse_json(text, schema)[1] == f"{text} does not match the JSON schema"


@pytest.mark.parametrize(
    "schema, valid, invalid",
    [
        # a pattern anchored at one end is free at the other (xgrammar matched the whole string: only "https://")
        ({"type": "string", "pattern": "^https?://"}, ['"https://example.com/a"'], ['"ftp://x"']),
        ({"type": "string", "pattern": "\\.pdf$"}, ['"notes.pdf"'], ['"notes.pdfx"']),
        ({"type": "string", "pattern": "^a\\$"}, ['"a$"', '"a$b"'], ['"ba$"']),  # an escaped $ is no anchor
        ({"type": "object", "patternProperties": {"^S_": {"type": "string"}}}, ['{"S_name": "b"}'], ['{"x": "b"}']),
        ({"type": "object", "propertyNames": {"pattern": "^a"}, "additionalProperties": {"type": "integer"}}, ['{"abc": 1}'], ['{"b": 1}']),
        # anchored at neither end, at both, or split by a top-level |: matched whole, as documented
        ({"type": "string", "pattern": "[0-9]{3}"}, ['"123"'], ['"a123"']),
        ({"type": "string", "pattern": "^a|b$"}, ['"a"', '"b"'], ['"ab"']),
        ({"type": "string", "pattern": "^(abc$)"}, ['"abc"'], ['"abcd"']),  # an anchor inside, which xgrammar ignores
        ({"type": "string", "pattern": "(^abc)$"}, ['"abc"'], ['"xabc"']),
        # lengths beside a pattern of one repeated character become its count (xgrammar held no length there)
        ({"type": "string", "pattern": "^[a-z0-9-]+$", "maxLength": 5}, ['"ab-1"', '"a"'], ['"abcdef"', '""']),
        ({"type": "string", "pattern": "\\d*", "minLength": 2, "maxLength": 3}, ['"12"', '"123"'], ['"1"', '"1234"']),
        ({"type": "string", "pattern": "^[a-z]+[0-9]$", "maxLength": 3}, ['"ab1"'], ['"abcd1"']),  # checked after decoding
        # xgrammar 0.2.9's uri-reference took no absolute URI
        ({"type": "string", "format": "uri-reference"}, ['"https://example.com/x"', '"/x"', '"#top"'], ['"a b"']),
        ({"type": "string", "maxLength": 3.0}, ['"abc"'], ['"abcd"']),  # a count as a whole float: xgrammar refused it at the check
        # a false schema where leaving it out changes nothing (xgrammar refused it, naming no place)
        ({"type": "object", "properties": {"a": {"type": "string"}, "legacy": False}}, ['{"a": "x"}'], ['{"legacy": 1}']),
        ({"anyOf": [{"type": "string"}, False]}, ['"x"'], ["1"]),
        # an integer's bounds: fractional ones refused ("must be a whole number"), uint64's beyond xgrammar's 64 bits
        ({"type": "integer", "minimum": 1.5, "exclusiveMaximum": 4.5}, ["2", "4"], ["1", "5"]),
        ({"type": ["integer", "null"], "minimum": 0, "exclusiveMinimum": 0.5}, ["1", "null"], ["0"]),
        ({"type": "integer", "minimum": 0, "maximum": 18446744073709551615}, ["2", "9223372036854775807"], ["-1"]),
    ],
)
def test_forms_xgrammar_reads_otherwise_are_held_as_json_schema_means(schema, valid, invalid):
    """Valid schemas that xgrammar refused, or held to less than they allow, are taken and held as
    JSON Schema reads them; a value outside them still fails (in the grammar or the check)."""
    assert parse_params(response_format=schema).response_format == schema
    for text in valid:
        assert parse_json(text, schema) == (json.loads(text), None), text
    for text in invalid:
        assert parse_json(text, schema)[1] is not None, text


def test_a_json_reply_cut_inside_a_loop_says_more_tokens_would_not_end_it(shared_runtime):
    """A JSON reply cut at max_tokens had the same advice whatever its end: "raise max_tokens". One
    whose end repeats a unit over and over (a tiny random model's string) names the loop instead,
    and what may end it (a stronger penalty than the request's); one cut elsewhere still says raise
    max_tokens."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    looped = shared_runtime.generate([{"role": "user", "content": "Count: one two three"}], response_format=schema, max_tokens=60)
    assert looped.finish_reason == "length" and looped.parsed is None
    assert "its end repeats 'mes.' over and over, which more tokens would not end: a repetition_penalty" in looped.parse_error
    again = shared_runtime.generate([{"role": "user", "content": "Count: one two three"}], response_format=schema, max_tokens=60, repetition_penalty=1.02)
    assert "which more tokens would not end: a repetition_penalty above 1.02," in again.parse_error
    cut = shared_runtime.generate([{"role": "user", "content": "What is the capital of France?"}], response_format=schema, max_tokens=60)
    assert cut.parse_error.endswith("; raise max_tokens")


def test_where_a_cut_json_text_ends_inside():
    """open_at_end follows a cut JSON text's arrays, objects and strings: brackets, quotes and
    commas inside strings count for nothing, an array counts the values begun in it, a string its
    characters decoded (as maxLength counts them), and json_path writes a place as jsonschema's
    errors do."""
    def where(text):
        end = open_at_end(text)
        return [(f.path(), f.items) for f in reversed(end.frames) if f.kind == "array"], end.string

    assert where('{\n"primes": [2, 3, 5, 7, 11') == ([(("primes",), 5)], None)
    assert where('{"a b": ["x]", "y\\" [, {') == ([(("a b",), 2)], (("a b", 1), 7))
    assert where('[{"k": 1}, {"k": [[1], [2, 3], [') == ([((1, "k", 2), 0), ((1, "k"), 3), ((), 2)], None)
    assert where('{"k": "x, [y') == ([], (("k",), 5))
    assert where('{"k": "\\u00e9\\u00e9\\u00') == ([], (("k",), 2))  # a cut escape not counted
    assert where('{"k": [1, 2]') == where('{"ke') == where("") == ([], None)  # in no array, in a key
    assert where('{"k": [1, ') == ([(("k",), 1)], None)  # the comma begins no value
    assert open_at_end("[" * 100_000).frames[-1].path() == (0,) * 99_999  # deep nesting: a frame keeps only its own place
    assert [json_path(p) for p in [(), ("a",), ("a b", 0), ("_id",), ("é",), ("it's",)]] == ["$", "$.a", "$['a b'][0]", "$['_id']", "$['é']", "$['it\\'s']"]


def test_a_json_reply_cut_inside_a_long_array_or_string_names_what_would_close_it():
    """A reply cut at its budget inside an array that counts on ([1, 2, 3, ... 31, the embedded
    pair's "Count from one to five.") may only run longer with more tokens: its error names the
    array and a maxItems (a string, a maxLength), which the grammar holds. Not named: a short array
    or string (the budget was short), anything a stop string cut, a place the schema does not say
    plainly, a string beside a pattern or a format (whose maxLength may not be held), an array that
    must reach more items; a maxItems the schema has already is to be lowered. In a tool call the
    path is within the tool's parameters."""
    item = {"type": "array", "items": {"type": "integer"}}
    schema = {"type": "object", "properties": {"n": item}}
    counting = '{"n": [' + ", ".join(map(str, range(1, 10)))

    def error(text, schema=schema, cut=CUT):
        return structured_fields(text, parse_params(response_format=schema), cut)["parse_error"]

    assert error(counting).endswith(
        "; raise max_tokens; or hold the array at $.n (9 items so far) to a maxItems in the schema"
        " (pydantic: Field(max_length=...)), which makes the model close it"
    )
    assert error('{"n": [1, 2, 3').endswith("; raise max_tokens")
    stopped = Cut("the stop string ']' ended the reply", "leave ']' out of stop", by_budget=False)
    assert error(counting, cut=stopped).endswith("; leave ']' out of stop")
    assert error(counting, {"type": "object"}).endswith("; raise max_tokens")  # json_object: no schema says what $.n is
    assert error(counting, {"type": "object", "properties": {"n": {**item, "minItems": 20}}}).endswith("; raise max_tokens")
    assert "to a maxItems below its 100 in the schema" in error(counting, {"type": "object", "properties": {"n": {**item, "maxItems": 100}}})
    optional = {"$defs": {"N": item}, "type": "object", "properties": {"n": {"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]}}}
    assert "hold the array at $.n (9 items so far)" in error(counting, optional)  # pydantic's Optional[list[...]]
    long_text = '{"s": "' + "ab " * 90
    plain = {"type": "object", "properties": {"s": {"type": "string"}}}
    assert error(long_text, plain).endswith(
        "raise max_tokens; or hold the string at $.s (270 characters so far) to a maxLength in the schema"
        " (pydantic: Field(max_length=...)), which makes the model close it"
    )
    for beside in ({"pattern": "^[a-z ]+$"}, {"format": "uri"}):
        assert error(long_text, {"type": "object", "properties": {"s": {"type": "string", **beside}}}).endswith("; raise max_tokens")
    rows = {"type": "object", "properties": {"rows": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}}}
    both = '{"rows": [' + '["a"], ' * 8 + '["' + "x" * 300
    assert error(both, rows).endswith(
        "or hold the string at $.rows[8][0] (300 characters so far) to a maxLength and the array at $.rows (9 items so far)"
        " to a maxItems in the schema (pydantic: Field(max_length=...)), which makes the model close them"
    )  # the outer array: the inner one, open at the cut, has one item
    tool = {"name": "sum", "description": "", "parameters": {"type": "object", "properties": {"xs": item}}}
    call = '<tool_call>\n{"name": "sum", "arguments": {"xs": [' + ", ".join(map(str, range(12)))
    (invalid,) = parse_reply(call, [tool], CUT)[2]
    assert invalid.error == (
        "the call is not closed with </tool_call> (the reply used up max_tokens=12 first; raise max_tokens; or hold the array at $.xs"
        " (12 items so far) to a maxItems in sum's parameters (pydantic: Field(max_length=...)), which makes the model close it)"
    )


def test_an_open_integer_is_held_to_64_bits():
    """An integer with no bound on a side, or a bound beyond 64 bits, is held there at 64 bits, as
    llama.cpp caps a number's digits: a small model asked for an int wrote "10000000..." until
    max_tokens ran out. Bounds are given to xgrammar as inclusive whole numbers within 64 bits; where
    no 64-bit value fits, they are left to the check and no side is held, nor beside a multipleOf
    (which xgrammar drops beside a range), an enum or a const."""
    assert for_grammar({"type": "integer"}) == {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
    assert parse_json("-9223372036854775808", {"type": "integer"}) == (-(2**63), None)
    assert parse_json("10000000000000000000", {"type": "integer"})[1] == "10000000000000000000 does not match the JSON schema"
    assert for_grammar({"type": ["integer", "null"], "exclusiveMinimum": 0}) == {"type": ["integer", "null"], "minimum": 1, "maximum": 2**63 - 1}
    for schema in ({"type": "integer", "enum": [1, 2]}, {"type": "number"}):  # a number's bounds would hold it to 6 decimals
        assert for_grammar(schema) == schema
    assert parse_json("6", {"type": "integer", "multipleOf": 5})[1] == "6 does not match the JSON schema"  # still in the grammar
    assert parse_json(str(2**64), {"type": "integer", "minimum": 2**64}) == (2**64, None)  # not held to 64 bits: writable
    uint64 = {"type": "integer", "minimum": 0, "maximum": 2**64 - 1}  # OpenAPI's uint64: held within 64 bits, its digits end
    assert for_grammar(uint64) == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    assert parse_json(str(2**63 - 1), uint64) == (2**63 - 1, None) and parse_json("9" * 20, uint64)[1] == f"{'9' * 20} does not match the JSON schema"
    assert for_grammar({"type": "integer", "multipleOf": 2, "maximum": 2**64}) == {"type": "integer", "multipleOf": 2}  # left to the check
    assert parse_params(response_format={"type": "integer", "minimum": -9.223372036854775808e18})  # xgrammar: "precision loss"
    assert "is greater than or equal to the maximum" in parse_json("1", {"type": "integer", "exclusiveMaximum": -(2**63)})[1]  # "underflow"


def _decoding_takes(text: str, **params) -> bool:
    """Whether the grammar decoding compiles for these request parameters takes `text`."""
    import xgrammar as xgr

    spec = digits_capped(constraint_spec(parse_params(**params)))
    return bool(xgr.testing._is_grammar_accept_string(xgr.Grammar.from_structural_tag(spec), text))


def test_an_open_number_s_digits_are_capped_while_decoding():
    """xgrammar writes an unbounded number's digits without end, and a small model asked for a float
    wrote "10.000000..." until max_tokens ran out: decoding holds the digits before the point, after
    it and in the exponent to 16 each (llama.cpp's cap; the exponent keeps any magnitude writable),
    in a response_format's values and a tool's arguments alike. The check after decoding still takes
    more (it replays xgrammar's own grammar)."""
    number, sixteen = {"type": "number"}, "1" * 16
    assert _decoding_takes(sixteen, response_format=number) and not _decoding_takes(sixteen + "1", response_format=number)
    assert _decoding_takes(f"-0.{sixteen}", response_format=number) and not _decoding_takes(f"-0.{sixteen}1", response_format=number)
    assert _decoding_takes(f"2.5E-{sixteen}", response_format=number) and not _decoding_takes(f"2.5E-{sixteen}1", response_format=number)
    assert not _decoding_takes(f"[{sixteen}1]", response_format={"type": "array", "items": {}})  # any value's numbers
    assert parse_json(sixteen + "1", number) == (int(sixteen + "1"), None)
    # the copies xgrammar writes under a subschema's own name: beside a keyword it does not hold, or a definition
    for copied in ({"type": "number", "format": "double"}, {"type": "number", "x-unit": "C"}, {"$ref": "#/$defs/Temp"}):
        schema = {"type": "object", "properties": {"t": copied}, "required": ["t"], "$defs": {"Temp": {"type": "number"}}}
        assert _decoding_takes(f'{{"t": {sixteen}}}', response_format=schema) and not _decoding_takes(f'{{"t": {sixteen}1}}', response_format=schema)
    tool = {"name": "scale", "parameters": {"type": "object", "properties": {"k": {"type": "number"}}, "required": ["k"]}}
    call = '<tool_call>\n{{"name": "scale", "arguments": {{"k": {}}}}}\n</tool_call>'
    assert _decoding_takes(call.format(sixteen), tools=[tool]) and not _decoding_takes(call.format(sixteen + "1"), tools=[tool])


def test_only_xgrammar_s_own_number_rule_is_capped():
    """The cap matches xgrammar's number rule line by line: a rule of the schema's own whose name starts
    alike (a `$ref` to "#/basic_numbers" is named after it) keeps its digits; an element left as it is
    (arguments in another style, or with `excludes`) is not searched for values to rewrite; and
    `["integer", "number"]` is the number it means, whose digits are capped (the integer branch's were not)."""
    digits = {"type": "string", "pattern": "^[0-9]*$"}
    schema = {"type": "object", "properties": {"a": {"$ref": "#/basic_numbers"}}, "required": ["a"], "basic_numbers": digits}
    assert _decoding_takes('{"a": "' + "1" * 20 + '"}', response_format=schema)
    lookalike = {"type": "json_schema", "json_schema": {"type": "number"}}
    left = {"type": "json_schema", "excludes": ["zz"], "json_schema": {"type": "object", "properties": {"a": {"const": lookalike}}, "required": ["a"]}}
    spec = constraint_spec(parse_params(response_format={"type": "structural_tag", "format": left}))
    assert json.loads(digits_capped(spec)) == json.loads(spec)
    either = {"type": ["integer", "number", "null"]}
    assert for_grammar(either) == {"type": ["number", "null"]}
    assert _decoding_takes("1" * 16, response_format=either) and not _decoding_takes("1" * 17, response_format=either)


def test_a_forced_start_with_a_longer_number_than_decoding_writes_is_told_so(shared_runtime):
    """A forced start is held to the grammar decoding uses: a number part of more than 16 digits in it
    is refused, and the error says why, since its schema takes it; a refusal for another reason says
    nothing of digits (the first hint came for any 17 digits in a row, in a string too)."""
    messages = [{"role": "user", "content": "An id?"}, {"role": "assistant", "content": '{"id": 12345678901234567'}]
    schema = {"type": "object", "properties": {"id": {"type": "number"}}, "required": ["id"]}
    with pytest.raises(InvalidParameterError, match="decoding holds each part of a number to 16 digits: write a longer one with an exponent"):
        shared_runtime.generate(messages, response_format=schema, max_tokens=4)
    # refused for another reason than the digits: no word of them (a string too long; a bound's reach)
    for other, start in (({"type": "string", "maxLength": 10}, '{"id": "12345678901234567'), ({"type": "number", "minimum": 0}, '{"id": 20000000000000000')):
        messages[-1]["content"] = start
        with pytest.raises(InvalidParameterError, match="does not fit the request's grammar") as refused:
            shared_runtime.generate(messages, response_format={**schema, "properties": {"id": other}}, max_tokens=4)
        assert "digits" not in str(refused.value)


def test_a_json_value_s_grammar_is_xgrammar_s_own_but_for_its_numbers(monkeypatch):
    """Capping writes each JSON value of a structural tag out as the grammar xgrammar builds from its
    schema: with the caps left out, the spec compiles to the very grammar the schema would."""
    import xgrammar as xgr

    import wsd_llms.number_digits

    monkeypatch.setattr(wsd_llms.number_digits, "capped_rules", lambda text: text)
    digits_capped.cache_clear()
    schema = {"type": "object", "properties": {"n": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}}}, "required": ["n"]}
    params = parse_params(response_format=schema, tools=[SMALL, OPENAI_TOOL], tool_choice="auto")
    try:
        spec = constraint_spec(params)
        assert '"json_schema"' in spec and '"json_schema"' not in digits_capped(spec)
        assert str(xgr.Grammar.from_structural_tag(digits_capped(spec))) == str(xgr.Grammar.from_structural_tag(spec))
    finally:
        digits_capped.cache_clear()


def test_a_grammar_xgrammar_cannot_read_back_leaves_the_value_its_schema(monkeypatch):
    """Were xgrammar to print a grammar it cannot parse, the value keeps its schema (its numbers
    open, as before) rather than fail the request at compile."""
    import wsd_llms.number_digits

    monkeypatch.setattr(wsd_llms.number_digits, "capped_rules", lambda text: text.replace("root ::=", "root ::= ((", 1))
    digits_capped.cache_clear()
    try:
        spec = constraint_spec(parse_params(response_format={"type": "number"}))
        assert digits_capped(spec) == spec
    finally:
        digits_capped.cache_clear()


def test_a_number_bounded_on_one_side_is_held_within_10_to_the_16_on_the_other():
    """A bounded number's whole part is any count of digits in xgrammar's grammar (its decimals are
    held to 6), so its open side is held at 10^16, the reach of an unbounded number's 16 digits; not
    beside a multipleOf, an enum or a const, nor where the bound lies beyond that reach."""
    assert for_grammar({"type": "number", "minimum": 0}) == {"type": "number", "minimum": 0, "maximum": 10**16}
    assert for_grammar({"type": ["number", "null"], "exclusiveMaximum": -3}) == {"type": ["number", "null"], "exclusiveMaximum": -3, "minimum": -(10**16)}
    for schema in ({"type": "number", "minimum": 1e17}, {"type": "number", "minimum": 0, "multipleOf": 0.5}, {"type": "number", "maximum": 0, "enum": [-1]}, {"type": "number", "minimum": 0, "maximum": 1e20}):
        assert for_grammar(schema) == schema
    assert _decoding_takes(str(10**16), response_format={"type": "number", "minimum": 0})
    assert not _decoding_takes(str(10**16 + 1), response_format={"type": "number", "minimum": 0})
    # xgrammar reads a bound as a float: 9999999999999999 is 1e16, and a fill there left no value to write
    assert for_grammar({"type": "number", "exclusiveMinimum": 9999999999999999}) == {"type": "number", "exclusiveMinimum": 9999999999999999}
    assert parse_params(response_format={"type": "number", "exclusiveMaximum": -9999999999999999})
    # a bound beyond a float's range is left to the check (math.isfinite overflowed, and xgrammar refused it without a word)
    assert for_grammar({"type": "number", "minimum": 10**400}) == {"type": "number"}
    assert for_grammar({"type": "integer", "maximum": -(10**400)}) == {"type": "integer"}
    with pytest.raises(InvalidParameterError, match=r"xgrammar gave no reason \(a number in the schema beyond a float's range is one\)$"):
        parse_params(response_format={"type": "array", "maxItems": 10**400})


def test_a_float_ends_its_digits_on_the_embedded_pair(embedded):
    """Asked for the weather in Tokyo as a float, the embedded pair wrote "10.000..." until max_tokens
    ran out (the reply a parse error); its decimals now end at 16 and the reply is the value."""

    class Weather(BaseModel):
        city: str
        temperature_c: float

    result = embedded.generate([{"role": "user", "content": "Give the weather for Tokyo."}], response_format=Weather, max_tokens=120)
    assert result.text == '{\n"city": "Tokyo",\n"temperature_c": 10.0000000000000000\n}' and result.finish_reason == "stop"
    assert result.parsed == {"city": "Tokyo", "temperature_c": 10.0}


def test_a_counting_array_is_closed_by_the_max_items_its_error_names(embedded):
    """Asked to count from one to five into an array, the embedded pair counts on until max_tokens
    runs out; the error names the array and a maxItems, and with one the reply is the value."""
    schema = {"type": "object", "properties": {"numbers": {"type": "array", "items": {"type": "integer"}}}, "required": ["numbers"]}
    messages = [{"role": "user", "content": "Count from one to five."}]
    cut = embedded.generate(messages, response_format=schema, max_tokens=120)
    assert cut.finish_reason == "length" and cut.parsed is None
    assert "raise max_tokens; or hold the array at $.numbers (31 items so far) to a maxItems in the schema" in cut.parse_error
    stopped = embedded.generate(messages, response_format=schema, max_tokens=120, stop=[", 9,"])  # not the budget: nothing to hold
    assert stopped.stop_reason == ", 9," and stopped.parse_error.endswith("; leave ', 9,' out of stop")
    schema["properties"]["numbers"]["maxItems"] = 5
    held = embedded.generate(messages, response_format=schema, max_tokens=120)
    assert held.finish_reason == "stop" and held.parsed == {"numbers": [1, 2, 3, 4, 5]}


def test_a_length_beside_a_pattern_of_one_repeated_character_is_held_while_writing():
    """xgrammar holds no minLength/maxLength beside a pattern: a string of one repeated character
    takes them as its count, so decoding cannot write past them (the grammar refuses, not only the
    check after); another pattern's lengths are still checked after decoding."""
    slug = {"type": "string", "pattern": "^[a-z0-9-]+$", "maxLength": 5}
    assert parse_json('"abcdef"', slug)[1] == '"abcdef" does not match the JSON schema'
    other = {"type": "string", "pattern": "^[a-z]+[0-9]$", "maxLength": 3}
    assert parse_json('"abcd1"', other)[1] == "'abcd1' is too long (at $, keyword 'maxLength')"
    with pytest.raises(InvalidParameterError, match="minLength 4 is greater than maxLength 2"):  # as without a pattern
        parse_params(response_format={"type": "string", "pattern": "^[a-z]+$", "minLength": 4, "maxLength": 2})
    empty = {"type": "string", "pattern": "^[a]+$", "maxLength": 0}  # no string has both: left to the check
    assert parse_params(response_format=empty).response_format == empty and "expected to be empty" in parse_json('"a"', empty)[1]
    # a large count is not folded: xgrammar takes seconds to build {1,4000} and minutes for {1,40000}
    assert for_grammar({"type": "string", "pattern": "^[a-z]+$", "maxLength": 40000})["pattern"] == "^[a-z]+$"
    assert for_grammar({"type": "string", "pattern": "^[a-z]+$", "maxLength": 1000})["pattern"] == "^[a-z]{1,1000}$"


@pytest.mark.parametrize("pattern, text", [("^(abc$)", '"abcd"'), ("(^abc)$", '"xabc"'), ("^(a$|b)", '"az"')])
def test_a_pattern_with_an_anchor_inside_is_held_whole(pattern, text):
    """xgrammar ignores an anchor inside a pattern: freeing such a pattern at one end let decoding
    write what it forbids (the check after caught it); it is matched whole, so the grammar refuses."""
    assert parse_json(text, {"type": "string", "pattern": pattern})[1] == f"{text} does not match the JSON schema"


def test_lengths_beside_a_pattern_are_checked_without_xgrammar_s_warning(capfd):
    """xgrammar ignores lengths beside a pattern and printed a warning on stderr at each build (at
    the call, and at each reply's check): they are left out of its schema, and checked after."""
    schema = {"type": "string", "pattern": "^[A-Z]+[0-9]$", "minLength": 2, "maxLength": 4, "title": "warning-free"}
    parse_params(response_format=schema)
    assert parse_json('"AB1"', schema) == ("AB1", None)
    assert "is too long" in parse_json('"ABCDE1"', schema)[1]
    assert "not supported" not in capfd.readouterr().err


def test_lengths_beside_a_format_xgrammar_knows_are_checked_without_its_warning(capfd):
    """xgrammar ignores lengths beside a format it knows (email, date, ...) and printed a warning on
    stderr at each build: they are left out of its schema and checked after decoding. A format it
    does not know (pydantic's SecretStr writes "password") leaves it a plain string, whose lengths
    it holds: those stay in the grammar."""
    email = {"type": "string", "format": "email", "maxLength": 12, "title": "format-warning-free"}
    parse_params(response_format=email)
    assert parse_json('"a@b.co"', email) == ("a@b.co", None)
    assert "is too long" in parse_json('"someone@example.com"', email)[1]
    assert "not supported" not in capfd.readouterr().err
    assert for_grammar(email) == {"type": "string", "format": "email", "title": "format-warning-free"}
    password = {"type": "string", "format": "password", "minLength": 8, "writeOnly": True}
    assert for_grammar(password) == password
    assert parse_json('"short"', password)[1] == '"short" does not match the JSON schema'  # the grammar refuses
    with pytest.raises(InvalidParameterError, match="minLength 4 is greater than maxLength 2"):
        parse_params(response_format={"type": "string", "format": "email", "minLength": 4, "maxLength": 2})


def test_a_false_property_another_keyword_would_admit_is_kept():
    """A false property is left out of the grammar only where no other keyword admits its name: with
    additionalProperties the grammar would let it be written, so the schema is refused as before."""
    with pytest.raises(InvalidParameterError, match="Schema 'false' cannot accept any value"):
        parse_params(response_format={"type": "object", "properties": {"a": False, "b": {"type": "integer"}}, "additionalProperties": {}})


def test_a_name_in_draft_7_dependencies_is_no_keyword():
    """dependencies maps property names (to schemas or lists of names): a property named "items" there
    is not a tuple's items list to rewrite."""
    schema = {"$schema": DRAFT_7, "type": "object", "properties": {"items": {"type": "string"}}, "dependencies": {"items": ["a"]}}
    assert for_grammar(schema) == schema


def test_listed_members_stay_the_only_ones():
    """What a schema lists is still all that may be written (OpenAI's strict mode): properties
    without additionalProperties, prefixItems without items."""
    assert "does not match" in parse_json('{"a": 1}', {"type": "object", "properties": {}})[1]
    assert "does not match" in parse_json("[1, 2]", {"type": "array", "prefixItems": [{"type": "integer"}]})[1]
    assert "does not match" in parse_json('{"t": [1, 2, 3]}', {"type": "object", "properties": {"t": {"type": "array", "maxItems": 2}}})[1]


def test_tool_messages():
    msgs = normalize_messages(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "pick", "arguments": '{"n": 1}'}}]},
            {"role": "tool", "content": "done", "tool_call_id": "c1"},
        ]
    )
    assert msgs[1].tool_calls[0].arguments == {"n": 1} and msgs[2].tool_call_id == "c1"
    class Function(BaseModel):  # the shape of OpenAI's and Ollama's SDK calls, which LlamaIndex keeps in additional_kwargs
        name: str
        arguments: str | dict

    class SDKCall(BaseModel):
        id: str | None = None
        function: Function

    sdk = normalize_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [SDKCall(id="c2", function=Function(name="pick", arguments='{"n": 2}')), SDKCall(function=Function(name="pick", arguments={"n": 3}))]}])
    assert [(c.id, c.name, c.arguments) for c in sdk[1].tool_calls] == [("c2", "pick", {"n": 2}), ("call_1_1", "pick", {"n": 3})]
    observation = normalize_messages([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}])[1]
    assert observation.tool_call_id is None and observation.as_dict() == {"role": "tool", "content": "r"}  # a ReAct observation
    for bad, needle in [
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r", "tool_call_id": 7}], "tool_call_id must name the call"),
        ([{"role": "user", "content": "x", "tool_calls": [{"name": "a"}]}], "only assistant messages"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "a", "arguments": "{"}}]}], "not valid JSON"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], "needs a 'name'"),
    ]:
        with pytest.raises(InvalidMessagesError, match=needle):
            normalize_messages(bad)


@pytest.mark.parametrize(
    "call",
    [
        {"type": "tool_use", "id": "c1", "name": "pick", "input": {"n": 1}},  # Anthropic's (LlamaIndex's Anthropic histories keep these)
        {"type": "tool_call", "id": "c1", "name": "pick", "args": {"n": 1}},  # LangChain's
        {"toolUseId": "c1", "name": "pick", "input": {"n": 1}},  # Bedrock Converse's
        {"id": "c1", "name": "pick", "parameters": {"n": 1}},  # Cohere's
        {"type": "function_call", "id": "fc_9", "call_id": "c1", "name": "pick", "arguments": '{"n": 1}'},  # OpenAI Responses API's
        {"id": "c1", "name": "pick", "args": None},  # a model_dump of a call with no arguments (Gemini's shape)
    ],
)
def test_history_calls_in_other_providers_shapes_keep_their_arguments(call):
    """Their arguments had been read from "arguments" only: the model saw each call made with {}."""
    msgs = normalize_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}])
    assert msgs[1].tool_calls[0].as_dict() == {"id": "c1", "name": "pick", "arguments": {"n": 1} if call.get("args", 0) is not None else {}}


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        ({"name": "pick", "argumnets": {"n": 1}}, "tool_calls[0] ('pick') has key 'argumnets'; did you mean 'arguments'?"),
        ({"name": "pick", "input": {"n": 1}, "arguments": "{}"}, "tool_calls[0] ('pick') gives its arguments under 'arguments' and 'input'; give them once"),
    ],
)
def test_a_history_call_whose_arguments_are_unclear_is_refused(call, needle):
    with pytest.raises(InvalidMessagesError, match=re.escape(needle)):
        normalize_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}])


@pytest.mark.parametrize(
    ("offered", "with_calls", "ends"),
    [
        ({}, True, True),  # the history's calls, and none offered: the model can only copy them
        ({"tools": [TOOL], "tool_choice": "none"}, True, True),
        ({"tools": [TOOL]}, True, False),  # a call is the model's to make, and is parsed
        ({}, False, False),  # no call in the history: the tag is text like any other
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}}, True, False),  # JSON may hold it
    ],
)
def test_the_call_tag_ends_a_reply_that_offers_no_tools_after_calls(offered, with_calls, ends):
    from wsd_llms.engine import _uncallable
    from wsd_llms.reply import expand_role_stops

    history = [{"role": "user", "content": "hi"}]
    if with_calls:
        history += [
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "pick", "arguments": {"color": "red"}}]},
            {"role": "tool", "content": "done", "tool_call_id": "c1"},
        ]
    stops = _uncallable(normalize_messages(history), parse_params(**offered))
    assert stops == (expand_role_stops(("<tool_call>",)) if ends else ())


def test_tools_render_into_both_prompts(differ_runtime):
    from wsd_llms.prompts import build_prompts

    engine = differ_runtime.load()
    msgs = normalize_messages(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "pick", "arguments": {"n": 1}}]},
            {"role": "tool", "content": "done", "tool_call_id": "c1"},
        ]
    )
    prompts = build_prompts(engine.draft.tokenizer, engine.base.tokenizer, msgs, "plain", [TOOL])
    draft = engine.draft.tokenizer.decode(prompts.draft_ids)
    call = '<tool_call>\n{"name": "pick", "arguments": {"n": 1}}\n</tool_call>'
    for text in (draft, prompts.base_text):
        assert '"name": "pick"' in text and call in text and "<tool_response>\ndone\n</tool_response>" in text
    assert "[Tools]" in prompts.base_text and "[Tool]" in prompts.role_stops


def test_tool_choice_none_reports_no_calls():
    from wsd_llms.params import parse_params

    tool = {"name": "add", "description": "Add.", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert structured_fields(text, parse_params(tools=[tool], tool_choice="none")) == {"content": text}
    assert len(structured_fields(text, parse_params(tools=[tool], tool_choice="auto"))["tool_calls"]) == 1


def test_compiled_grammars_are_kept_within_a_bound(monkeypatch):
    """An agent may build new tools for every call: compiled grammars stay within the cache's bytes
    (these 40 take about 1.7 MB unbounded)."""
    from tiny import make_tokenizer, tiny_llama

    import wsd_llms.structured as structured

    monkeypatch.setattr(structured, "GRAMMAR_CACHE_BYTES", 2**20)
    model = tiny_llama(make_tokenizer(300), 0)
    for i in range(40):
        schema = {"type": "object", "properties": {f"field_{i}_{j}": {"type": "string", "maxLength": 20} for j in range(4)}}
        grammar, _ = structured.compiled_grammar(model, constraint_spec(parse_params(response_format=schema)))
        assert grammar is not None
    compiler = structured._cache[model.tokenizer].compiler
    assert 0 < compiler.get_cache_size_bytes() <= 2**20


def test_a_check_build_that_fails_gives_each_waiting_request_its_own_error(monkeypatch):
    """Requests with one new schema wait for a single check build; when it fails with other than
    xgrammar's word on the spec (out of memory), each hears the failure as an error of its own
    (one object raised in every caller's thread gathered all their frames), and nothing is kept."""
    import threading
    import time

    import xgrammar as xgr

    import wsd_llms.structured as structured

    release, calls = threading.Event(), []

    def failing(spec):
        calls.append(spec)
        release.wait(10)
        raise MemoryError("injected: no room for the grammar")

    schema = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 1409}}}
    spec = constraint_spec(GenerationParams(response_format=schema))  # as checked, not yet built
    monkeypatch.setattr(xgr.Grammar, "from_structural_tag", staticmethod(failing))
    errors: list[BaseException] = []

    def check():
        try:
            structured._build_error(spec)
        except MemoryError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=check) for _ in range(3)]
    threads[0].start()
    while not calls:
        time.sleep(0.005)
    for thread in threads[1:]:
        thread.start()
    while len(structured._building[spec]._condition._waiters) < 2:  # both wait on the build
        time.sleep(0.005)
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and len(errors) == 3
    assert len({id(exc) for exc in errors}) == 3
    assert all(str(exc) == "injected: no room for the grammar" for exc in errors)
    monkeypatch.undo()
    assert structured._build_error(spec) is None  # built again, now that it can be


# A chat template that takes `tools`, as Qwen's, Llama 3.1's and Hermes' do: it renders the tool
# list, an assistant turn's calls (OpenAI's shape) and a tool turn in its own way.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %} {{ t | tojson }}{% endfor %}</s>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<call>{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}</call>{% endfor %}"
    "{% if m['role'] == 'tool' %} (of {{ m['tool_call_id'] }}){% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CALLED = [
    {"role": "user", "content": "Pick a number."},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "n", "arguments": {"n": 2}}]},
    {"role": "tool", "content": "picked", "tool_call_id": "c1"},
    {"role": "user", "content": "Again."},
]


def test_a_template_that_takes_tools_renders_them_and_the_calls_in_history():
    """Such a draft is given the tools and the history's calls and results as its template expects
    them, in place of the system message and call blocks a template without tools gets; a forced
    call still parses, and online equals staged."""
    tok = make_tokenizer(300)
    tok.chat_template = TOOLS_TEMPLATE
    prompts = build_prompts(tok, tok, normalize_messages(CALLED), tools=parse_params(tools=[SMALL]).tools)
    draft = tok.decode(prompts.draft_ids, skip_special_tokens=False)
    schema = '{"type": "function", "function": {"name": "n", "description": "", "parameters": {"type": "object", "properties": {"n": {"enum": [1, 2]}}'
    assert draft.startswith("<s><|system|>Tools: " + schema) and TOOLS_SYSTEM.splitlines()[0] not in draft, draft
    turns = '<|user|>Pick a number.</s><|assistant|><call>n {"n": 2}</call></s><|tool|>picked (of c1)</s><|user|>Again.</s><|assistant|>'
    assert draft.endswith(turns), draft
    assert "<tool_response>" in prompts.base_text  # the plain base prompt writes tool results its own way

    runtime = WSDRuntime.from_models(tiny_llama(tok, 0, "tiny-draft", sharpen=3.0), tiny_llama(tok, 0, "tiny-base", sharpen=3.0))
    try:
        staged, online = _both(runtime, CALLED, tools=[SMALL], tool_choice="required", max_tokens=80, **SETTINGS[1])
    finally:
        runtime.close()
    assert online.text == staged.text and online.switch_point == staged.switch_point
    assert [c.name for c in online.tool_calls] == ["n"] and not online.invalid_tool_calls, online.text
