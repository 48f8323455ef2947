"""Bad parameters and messages raise clear errors before any decoding starts."""

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import numpy as np
import pytest
from pydantic import BaseModel

from wsd_llms import InvalidMessagesError, InvalidParameterError, ToolResultWarning
from wsd_llms.messages import normalize_messages
from wsd_llms.params import GenerationParams, parse_params


class _Point(BaseModel):
    x: int


_TOOL = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}


def test_a_typeddict_response_format_is_its_json_schema():
    """As ChatOpenAI takes one; it was refused as "Input should be a valid dictionary". Python's own
    TypedDict, which pydantic reads only from Python 3.12, is refused saying so."""
    import typing

    import typing_extensions

    class Point(typing_extensions.TypedDict):
        """A point."""

        x: int

    schema = parse_params(response_format=Point).response_format
    assert schema == {"title": "Point", "description": "A point.", "type": "object", "properties": {"x": {"title": "X", "type": "integer"}}, "required": ["x"]}

    class StdPoint(typing.TypedDict):
        x: int

    if sys.version_info < (3, 12):
        with pytest.raises(InvalidParameterError, match="StdPoint cannot be read as a schema: Please use `typing_extensions.TypedDict`"):
            parse_params(response_format=StdPoint)
    else:
        assert parse_params(response_format=StdPoint).response_format["required"] == ["x"]


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"max_tokens": 0}, "invalid max_tokens=0: Input should be greater than or equal to 1"),
        ({"max_draft_tokens": -5}, "invalid max_draft_tokens=-5"),
        ({"switch_threshold": 0}, "invalid switch_threshold=0: Input should be greater than 0"),
        ({"switch_threshold": 1.2}, "invalid switch_threshold=1.2: Input should be less than or equal to 1"),
        ({"switch_window": 0}, "invalid switch_window=0"),
        ({"temperature": -1}, "invalid temperature=-1"),
        ({"temperature": float("inf")}, "invalid temperature=inf: Input should be a finite number"),
        ({"temperature": float("nan")}, "invalid temperature=nan: Input should be a finite number"),  # said "<= 10000"
        ({"timeout": float("inf")}, "invalid timeout=inf: Input should be a finite number"),
        ({"max_tokens": True}, "invalid max_tokens=True: a number is needed, not a bool"),  # pydantic took True as 1
        ({"seed": False}, "invalid seed=False: a number is needed, not a bool"),
        ({"max_tokens": np.True_}, "invalid max_tokens=np.True_: a number is needed, not a bool"),  # numpy's too
        ({"max_tokens": np.int64(0)}, "invalid max_tokens=0: Input should be greater than or equal to 1"),
        ({"top_p": 0}, "invalid top_p=0"),
        ({"top_k": -1}, "invalid top_k=-1"),
        ({"repetition_penalty": 0}, "invalid repetition_penalty=0: Input should be greater than or equal to 0.0001"),
        # beyond float32's reach once applied: a sampled reply's probabilities had become NaN, a grammar's allowed id -inf
        ({"repetition_penalty": 1e-39}, "invalid repetition_penalty=1e-39: Input should be greater than or equal to 0.0001"),
        ({"repetition_penalty": 1e39}, "invalid repetition_penalty=1e+39: Input should be less than or equal to 10000"),
        ({"repetition_penalty": True}, "invalid repetition_penalty=True: a number is needed, not a bool"),
        ({"mode": "fast"}, "invalid mode='fast': Input should be 'online', 'staged', 'base' or 'draft'"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        # half of an emoji's UTF-16 pair (a bad decode): it was taken, and could never match
        ({"stop": ["END", "x\ud83d"]}, "stop[1] has an unpaired surrogate '\\ud83d' at index 1, which no reply can contain"),
        ({"stop": 5}, "invalid stop=5: must be a string or a list of strings"),  # said "a valid tuple"
        # pydantic read a number or a bool written as text ("10", "yes"): a caller's slip, passed unnoticed
        ({"max_tokens": "10"}, "invalid max_tokens='10': a number is needed, not a str"),
        ({"parallel_tool_calls": "yes"}, "invalid parallel_tool_calls='yes': Input should be a valid boolean"),
        ({"continue_final_message": 0}, "invalid continue_final_message=0: Input should be a valid boolean"),
        # each is looked for at every token on the worker: a thousand long ones slowed every stream twentyfold
        ({"stop": [f"s{i}" for i in range(65)]}, "stop strings are more than the 64 allowed"),
        ({"stop": ["a", 3]}, "invalid stop=['a', 3]: must be a string or a list of strings"),
        ({"max_tokenz": 5}, "unknown parameter 'max_tokenz'"),
        # other APIs' JSON switches name response_format; a loose match named a parameter meaning something else
        ({"json_mode": True}, "unknown parameter 'json_mode' (value True); did you mean response_format={'type': 'json_object'}?"),
        ({"format": "json"}, "unknown parameter 'format' (value 'json'); did you mean response_format={'type': 'json_object'}?"),
        ({"max_retries": 3}, "unknown parameter 'max_retries' (value 3) (not offered: a local model has no key and no network call to retry)"),
        # a call's bundle of parameters (LangChain's model_kwargs, LlamaIndex's additional_kwargs) as a constructor's is told
        ({"model_kwargs": {"top_k": 5}}, "unknown parameter 'model_kwargs' (value {'top_k': 5}); give each request parameter as an argument of its own"),
        ({"additional_kwargs": {}}, "unknown parameter 'additional_kwargs' (value {}); give each request parameter as an argument of its own"),
        # the runtime's settings read as typos; they say where they are set
        ({"device": "cuda"}, "unknown parameter 'device' (value 'cuda') (not a request's: the models and where they run are chosen once, when they load"),
        ({"max_running": 4}, "unknown parameter 'max_running' (value 4) (not a request's: a limit of the runtime every request shares: runtime.configure(...)"),
        ({"stop": ["x" * 300, ""]}, "...: stop strings must be non-empty"),  # a long value is shortened before the rule
        ({"seed": 2**64}, "invalid seed=18446744073709551616: Input should be less than 18446744073709551616"),
        ({"response_format": {"type": "regex", "pattern": "("}}, "invalid response_format: it cannot be compiled into a grammar: Regex parsing error"),
        ({"response_format": {"type": "strin"}}, 'invalid response_format: it cannot be compiled into a grammar: Unsupported type "strin"'),
        (
            {"response_format": {"type": "object", "properties": {"n": {"minimum": "3"}}}},
            "invalid response_format: not a valid JSON schema: '3' is not of type 'number' (at $.properties.n.minimum)",
        ),
        (
            {"tools": [{"name": "f", "description": "", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}]},
            'invalid tools: it cannot be compiled into a grammar: tools[0] (f) parameters: Unsupported type "strin"',
        ),
        # xgrammar left a value under a $ref to another document unconstrained (warning on stderr), and nothing checked it
        (
            {"response_format": {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}},
            "invalid response_format: the $ref 'https://example.com/a.json' at $.properties.a points outside the schema",
        ),
        (
            {"tools": [{"name": "f", "description": "", "parameters": {"type": "object", "properties": {"a": {"items": {"$ref": "a.json#/x"}}}}}]},
            "invalid tools: tools[0] (f) parameters: the $ref 'a.json#/x' at $.properties.a.items points outside the schema",
        ),
        (  # a property named like a keyword whose value is data
            {"response_format": {"type": "object", "properties": {"default": {"$ref": "https://example.com/d.json"}}}},
            "the $ref 'https://example.com/d.json' at $.properties.default points outside the schema",
        ),
        # xgrammar ignored these without a word: an anchor's $ref and a lookahead left the value
        # unconstrained; a required name that is no property was never written, so every reply failed the check
        (
            {"response_format": {"type": "object", "properties": {"a": {"$ref": "#foo"}}, "$defs": {"f": {"$anchor": "foo", "type": "integer"}}}},
            "invalid response_format: the $ref '#foo' at $.properties.a points to an anchor; only references within it ('#', '#/$defs/...') are followed",
        ),
        (  # one a used definition holds, reached through $refs
            {"response_format": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "$defs": {"n": {"type": "object", "properties": {"b": {"$ref": "#/$defs/m"}}}, "m": {"type": "string", "pattern": "(?<=a)b"}}}},
            "invalid response_format: the pattern '(?<=a)b' at $.$defs.m cannot be held to: Regex parsing error",
        ),
        (
            {"tools": [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(?!x).*"}}}}]},
            "invalid tools: tools[0] (f) parameters: the pattern '^(?!x).*' at $.properties.a cannot be held to: Regex parsing error at position 4: Lookahead is not supported yet.",
        ),
        (  # xgrammar 0.2 warned on stderr and took any JSON value: 1.1 for an object with a and b
            {"response_format": {"type": "object", "properties": {"p": {"allOf": [{"type": "object", "required": ["a"]}, {"required": ["b"]}]}}}},
            "invalid response_format: the allOf at $.properties.p combines 2 schemas, which the grammar cannot hold together (it would leave the value unconstrained): merge them into one schema",
        ),
        (
            {"response_format": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "zz"]}},
            "invalid response_format: the required names 'zz' at $ are not among its properties, and no other property may be written, so no value could be valid",
        ),
        ({"response_format": _Point(x=1)}, "invalid response_format=_Point(x=1): an instance of _Point is no schema: pass the class _Point"),
        # a wrapper whose schema is under a key it does not know: it was read as a schema, which held nothing
        ({"response_format": {"name": "p", "description": "d"}}, 'a response_format named \'p\' holds no schema: give its JSON schema as "schema", "parameters" or "input_schema"'),
        # a schema with a "name" among its keywords is a schema, not a wrapper
        ({"response_format": {"name": "P", "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}}, "the required names 'b' at $ are not among its properties"),
        ({"response_format": {"type": "custom", "name": "g", "format": {"type": "grammar"}}}, "a response_format named 'g' holds no schema"),  # a free-form tool
        ({"response_format": int}, "invalid response_format=<class 'int'>: must be a JSON schema (a dict), a pydantic class or a TypedDict, not type"),
        # as OpenAI's API refuses it: a required call with nothing to call had run as a plain reply
        ({"tool_choice": "any"}, "tool_choice='any' asks for a tool call, but no tools are given"),
        ({"tools": [{"name": "f", "description": "d\ud800", "parameters": {"type": "object"}}]}, "tools[0] description is not valid Unicode: unpaired surrogate '\\ud800' at index 1"),
        # a value of another type, or a dict that names no tool, was "Input should be a valid string"
        ({"tools": [_TOOL], "tool_choice": 5}, "invalid tool_choice=5: must be 'auto', 'required' (or 'any'), 'none', a tool's name, or a dict naming a tool"),
        ({"tools": [_TOOL], "tool_choice": {"type": "function"}}, "invalid tool_choice={'type': 'function'}: must be 'auto'"),
        # a near miss of a keyword or of a tool's name is named (LlamaIndex's constructor cannot check a name before tools come)
        ({"tools": [_TOOL], "tool_choice": "requird"}, "tool_choice='requird' is neither 'auto', 'required', 'any', 'none' nor a tool name (tools given: f); did you mean 'required'?"),
        ({"tools": [{**_TOOL, "name": "multiply"}], "tool_choice": "mutliply"}, "(tools given: multiply); did you mean 'multiply'?"),
        ({"tools": [_TOOL], "tool_choice": "AUTO"}, "(tools given: f); did you mean 'auto'?"),
        # xgrammar's refusals name no place: the deepest subschema it refuses alone for the same reason is named
        (
            {"response_format": {"type": "object", "properties": {"a": {"type": "number", "minimum": "0"}}}},
            "invalid response_format: it cannot be compiled into a grammar: Value must be a number (at $.properties.a)",
        ),
        # a length of the wrong type beside a pattern reaches the meta-schema's check, not a TypeError of the grammar's rewrite
        ({"response_format": {"type": "string", "pattern": "^a+$", "minLength": "3"}}, "not a valid JSON schema: '3' is not of type 'integer' (at $.minLength)"),
        # draft 4's boolean exclusiveMinimum, in a schema that declares no draft: 2020-12's meta-schema names it
        (
            {"response_format": {"type": "object", "properties": {"a": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}}},
            "invalid response_format: not a valid JSON schema: True is not of type 'number' (at $.properties.a.exclusiveMinimum)",
        ),
        (
            {"response_format": {"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/r"}]}}, "$defs": {"r": {"type": "integer", "minimum": 5, "maximum": 1}}}},
            "minimum greater than maximum (at $.$defs.r)",  # the definition, not the $ref that leads to it
        ),
        (
            {"tools": [_TOOL, {"name": "g", "parameters": {"type": "object", "properties": {"b": {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 1}}}}}]},
            "tools[1] (g) parameters: minLength 3 is greater than maxLength 1 (at $.properties.b.items)",
        ),
        # a forced call starts the reply with its tag: a stop in it ended every reply before its call
        # (with "<", an empty reply with no call and no error)
        ({"tools": [_TOOL], "tool_choice": "required", "stop": ["<"]}, "stop='<' would end the reply inside the opening '<tool_call>' of the call it must start with (tool_choice asks for a call)"),
        ({"tools": [_TOOL], "tool_choice": "f", "stop": ["x", 'call>\n{"na']}, "stop='call>\\n{\"na' would end the reply inside the opening '<tool_call>' of the call it must start with (tool_choice asks for a call of 'f')"),
        # "any" had been quoted as tool_choice='required', a value the caller never wrote
        ({"tools": [_TOOL], "tool_choice": "any", "stop": ['>\n{"name": "f", "arguments": {"a": 1']}, "of the call it must start with (tool_choice asks for a call)"),
    ],
)
def test_bad_params_name_parameter_value_and_rule(params, needle):
    with pytest.raises(InvalidParameterError) as err:
        parse_params(**params)
    assert needle in str(err.value)


def test_an_unknown_parameter_s_value_is_shown_short_and_whatever_its_repr_does():
    """A long value had been shown whole (a 100,000-item list: a 689,166-character error), and a
    value whose repr raised had raised that instead of the error."""

    class Unshowable:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    with pytest.raises(InvalidParameterError) as err:
        parse_params(foo=list(range(100_000)))
    assert "unknown parameter 'foo' (value [0, 1, 2," in str(err.value) and len(str(err.value)) < 1000
    with pytest.raises(InvalidParameterError, match="unknown parameter 'foo' \\(value \\(a Unshowable whose repr raised RuntimeError\\)\\)"):
        parse_params(foo=Unshowable())


def test_a_near_miss_with_no_tools_is_offered_no_call():
    """'required' would fail too with no tools to call: the error offers no such mend."""
    with pytest.raises(InvalidParameterError) as err:
        parse_params(tool_choice="requird")
    assert str(err.value).endswith("nor a tool name (tools given: none)")


def test_stops_a_forced_call_s_opening_tag_does_not_reach_are_taken():
    """Only a stop that can match from inside the opening tag is refused: one later in the call
    counts for nothing there (ReplyText), one between calls ends the reply after a call, and under
    'auto' a stop that cuts a call's tag reports the call as cut (parse_reply)."""
    call = {"tools": [_TOOL], "tool_choice": "required"}
    for stop in ["\n", "}", '"name"', "</tool_call>", '>\n{"name": "g"', "\n<tool_call>"]:
        assert parse_params(**call, stop=[stop]).stop == (stop,)
    assert parse_params(tools=[_TOOL], tool_choice="auto", stop=["<"]).stop == ("<",)


def test_numpy_integers_are_the_ints_they_hold():
    """An app that draws its seeds or budgets with numpy: a 64-bit seed as uint64 was refused
    ("Unable to parse input string as an integer"), though the same int is taken."""
    params = parse_params(seed=np.uint64(2**64 - 1), max_tokens=np.int32(7), top_k=np.int16(3))
    assert (params.seed, params.max_tokens, params.top_k) == (2**64 - 1, 7, 3) and type(params.seed) is int


def _grammar_builds(monkeypatch) -> list[bool]:
    """Records each grammar build of the checks at the call: whether it ran in the main thread."""
    import threading

    import xgrammar as xgr

    builds, build = [], xgr.Grammar.from_structural_tag
    monkeypatch.setattr(
        xgr.Grammar, "from_structural_tag", lambda spec, *a, **k: builds.append(threading.current_thread() is threading.main_thread()) or build(spec, *a, **k)
    )
    return builds


async def test_async_calls_build_a_schema_s_grammar_off_the_event_loop(monkeypatch, shared_runtime):
    """Building a new schema's grammar takes from a tenth of a second (strings with maxLength 2000)
    to seconds: the async calls (the runtime's agenerate, both adapters' async paths) build it in a
    thread, not on the event loop, whose other requests would wait for it. Known schemas and
    requests without one are checked as they were."""
    from langchain_wsd import WSDChatModel
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.wsd import WSDLLM
    from wsd_llms.params import aparse_params

    builds = _grammar_builds(monkeypatch)

    def schema(n: int) -> dict:  # a new schema each time: a known one is not built again
        return {"type": "object", "properties": {"text": {"type": "string", "maxLength": n}}, "required": ["text"]}

    await aparse_params(response_format=schema(1201))
    await aparse_params(max_tokens=5)
    await shared_runtime.agenerate([{"role": "user", "content": "Hi"}], max_tokens=3, response_format=schema(1202))
    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: shared_runtime)
    await WSDChatModel(max_tokens=3).with_structured_output(schema(1203) | {"title": "T"}, include_raw=True).ainvoke("Hi")
    monkeypatch.setattr(WSDLLM, "wsd_runtime", lambda self: shared_runtime)
    await WSDLLM(max_tokens=3).achat([ChatMessage(role="user", content="Hi")], response_format=schema(1204))
    assert len(builds) == 4 and not any(builds)


async def test_a_known_schema_is_checked_at_once_and_a_new_one_built_once_at_a_time(monkeypatch, shared_runtime):
    """An async call with a schema already built is checked on the loop at once, not behind other
    builds in the thread pool (where its timeout did not run); requests that bring the same new
    schema at once wait for one build (each pool thread had built it); and agenerate reports bad
    messages before bad parameters, as generate does."""
    import asyncio

    from wsd_llms import InvalidMessagesError
    from wsd_llms.params import aparse_params

    builds = _grammar_builds(monkeypatch)
    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 1301}}, "required": ["text"]}
    await asyncio.gather(*(aparse_params(response_format=schema) for _ in range(8)))
    assert builds == [False]  # once, in a thread
    hops = []
    real_to_thread = asyncio.to_thread
    monkeypatch.setattr(asyncio, "to_thread", lambda *a, **k: hops.append(a) or real_to_thread(*a, **k))
    await aparse_params(response_format=schema)
    assert hops == [] and builds == [False]
    bad = [{"role": "robot", "content": "hi"}]
    with pytest.raises(InvalidMessagesError):
        shared_runtime.generate(bad, temperature=-1)
    with pytest.raises(InvalidMessagesError):
        await shared_runtime.agenerate(bad, temperature=-1)


def test_a_grammar_build_that_fails_otherwise_than_by_its_spec_is_not_kept(monkeypatch):
    """A build that fails for another reason than xgrammar's word on the spec (out of memory, say)
    fails its request with that error, and the next request with the schema builds it again."""
    import xgrammar as xgr

    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 1501}}, "required": ["text"]}
    build = xgr.Grammar.from_structural_tag

    def out_of_memory(spec, *args, **kwargs):
        raise MemoryError("injected")

    monkeypatch.setattr(xgr.Grammar, "from_structural_tag", out_of_memory)
    with pytest.raises(MemoryError, match="injected"):
        parse_params(response_format=schema)
    monkeypatch.setattr(xgr.Grammar, "from_structural_tag", build)
    builds = _grammar_builds(monkeypatch)
    assert parse_params(response_format=schema).response_format == schema and len(builds) == 1


def test_a_schema_s_grammar_is_built_once_for_its_checks(monkeypatch):
    """The check at the call builds a schema's grammar once, however many requests send it: it runs
    in the caller's thread (an event loop's, for astream), where a schema with long bounded strings
    takes a tenth of a second and more to build. A schema that cannot be built fails each time alike."""
    builds = _grammar_builds(monkeypatch)
    schema = {"type": "object", "properties": {"review": {"type": "string", "maxLength": 1999}}, "required": ["review"]}
    for _ in range(3):
        parse_params(response_format=schema)
    bad = {"type": "object", "properties": {"n": {"type": "numbr"}}}
    counts = []
    for _ in range(2):
        with pytest.raises(InvalidParameterError, match=r'cannot be compiled into a grammar: Unsupported type "numbr" \(at \$.properties.n\)'):
            parse_params(response_format=bad)
        counts.append(len(builds))
    assert counts == [3, 3]  # the schema's, then its property's alone, for the place in the error


def test_references_within_the_schema_and_refs_in_data_are_taken():
    """Only a $ref that is a reference to another document is refused: the root, $defs, and a "$ref"
    key in a const's value (data, not a schema) pass."""
    schema = {
        "$defs": {"leaf": {"type": "integer"}},
        "type": "object",
        "properties": {"self": {"$ref": "#"}, "leaf": {"$ref": "#/$defs/leaf"}, "data": {"const": {"$ref": "https://example.com"}}},
    }
    assert parse_params(response_format=schema).response_format == schema


def test_the_frameworks_forms_of_unset_values_are_taken():
    """tool_choice=False is unset, as ChatOpenAI reads it (it was refused as 'not a valid string' in the
    runtime); stop as any iterable of strings."""
    assert parse_params(tool_choice=False).tool_choice == "auto"
    assert parse_params(stop=iter(["a", "b"])).stop == ("a", "b")


def test_none_is_a_parameter_s_default_as_in_the_adapters(shared_runtime):
    """None given for a parameter with a default means that default, as the adapters read it (the
    runtime refused temperature=None as "Input should be a valid number")."""
    unset = {name: None for name in ("max_tokens", "max_draft_tokens", "switch_threshold", "switch_window", "temperature", "top_p", "top_k", "repetition_penalty", "mode", "base_template", "tool_choice", "parallel_tool_calls", "continue_final_message")}
    assert parse_params(**unset) == GenerationParams()
    messages = [{"role": "user", "content": "Say hi."}]
    assert shared_runtime.generate(messages, max_tokens=8, temperature=None, top_k=None).text == shared_runtime.generate(messages, max_tokens=8).text
    with pytest.raises(InvalidParameterError, match="invalid temperature='hot'"):
        parse_params(temperature="hot")


def test_extreme_sampling_values_still_sample():
    """A temperature too small to divide by decodes greedily (as in vLLM); a top_p that rounds to 0
    keeps the most likely token rather than none."""
    import torch

    from wsd_llms.sampling import sample

    logits = torch.tensor([0.5, 3.0, 1.0, -2.0])
    assert parse_params(temperature=1e-40).greedy and not parse_params(temperature=1e-3).greedy
    assert sample(logits, parse_params(temperature=1.0, top_p=1e-300), torch.Generator().manual_seed(0)) == 1
    assert sample(logits, parse_params(temperature=1e-40), torch.Generator().manual_seed(0)) == 1


def test_defaults_are_the_papers():
    p = GenerationParams()
    assert (p.switch_threshold, p.switch_window, p.max_draft_tokens, p.temperature, p.mode) == (0.8, 6, 512, 0.0, "online")
    assert parse_params(stop="x").stop == ("x",)


def _called(calls: object) -> list[dict]:
    """A history whose assistant turn carries `calls` as its tool_calls."""
    return [{"role": "user", "content": "Pick."}, {"role": "assistant", "content": "", "tool_calls": calls}]


@pytest.mark.parametrize(
    "messages,needle",
    [
        ([], "messages is empty"),
        ("hello", "messages must be a list"),
        ([{"role": "robot", "content": "hi"}], "messages[0] has unknown role 'robot'; allowed: system, user, assistant, tool (or developer for system, human for user"),
        ([{"role": "user", "content": 42}], "messages[0] (user) content must be a str, got int"),
        ([{"role": "user"}], "messages[0] needs 'role' and 'content'"),
        ([{"role": "assistant", "content": "x"}], "only assistant turns"),
        (["hi"], "messages[0] must be a dict, got str"),
        ([{"role": "user", "content": "ok"}, {"role": "assistant", "content": "a\ud800b"}], "messages[1] (assistant) content is not valid Unicode: unpaired surrogate '\\ud800' at index 1"),
        # a misspelt key had been dropped: the tool result lost the id of the call it answers
        ([{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4", "toolcall_id": "c1"}], "messages[1] has key 'toolcall_id'; did you mean 'tool_call_id'?"),
        ([{"role": "user", "contents": "hi"}], "messages[0] has key 'contents'; did you mean 'content'?"),
        ([{"role": 3, "content": "hi"}], "messages[0] has unknown role 3; allowed: system, user"),
        # the calls of an assistant turn in a history
        (_called(["pick(2)"]), "messages[1].tool_calls[0] must be a dict, got str"),
        (_called({"name": "pick"}), "messages[1].tool_calls must be a list, got dict"),
        (_called([{"arguments": {}}]), "messages[1].tool_calls[0] needs a 'name' (or 'function': {'name': ...}), got {'arguments': {}}"),
        (_called([{"name": "pick", "arguments": "[1, 2]"}]), "messages[1].tool_calls[0] arguments must be a dict or a JSON object string, got [1, 2]"),
        (_called([{"name": "pick", "arguments": "{n: 1}"}]), "messages[1].tool_calls[0] arguments are not valid JSON: Expecting property name"),
        # at the call, not as the request starts (as a generic start failure)
        (_called([{"name": "pick", "arguments": {"when": date(2024, 1, 2)}}]), "messages[1].tool_calls[0] arguments hold a value JSON cannot write: Object of type date is not JSON serializable"),
        # a prompt writes them as UTF-8: a lone surrogate failed the request as it started, naming no message
        (_called([{"name": "pick", "arguments": {"a": "x\ud800"}}]), "messages[1].tool_calls[0] ('pick') arguments are not valid Unicode: unpaired surrogate '\\ud800' at index 8 of their JSON text"),
        (_called([{"name": "pick", "arguments": '{"a": "\\ud83d"}'}]), "messages[1].tool_calls[0] ('pick') arguments are not valid Unicode: unpaired surrogate '\\ud83d'"),
        ([{"role": "user", "content": "x", "tool_calls": [{"name": "pick"}]}], "messages[0] (user) has tool_calls; only assistant messages may carry them"),
    ],
)
def test_bad_messages(messages, needle):
    with pytest.raises(InvalidMessagesError) as err:
        normalize_messages(messages)
    assert needle in str(err.value)


def test_keys_an_openai_message_carries_are_left_unread():
    """name, refusal, annotations and the like (an OpenAI response's message dumped as a dict) are no misspelling."""
    messages = [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "content": "yo", "refusal": None, "annotations": [], "audio": None}]
    assert [m.content for m in normalize_messages(messages + [{"role": "user", "content": "and?"}])] == ["hi", "yo", "and?"]


def test_the_frameworks_names_for_roles_are_taken():
    """OpenAI's developer, LangChain's human and ai, LlamaIndex's chatbot, model and function: each is the role it names."""
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "human", "content": "Add 1 and 2."},
        {"role": "ai", "content": None, "tool_calls": [{"id": "c1", "name": "add", "arguments": {"a": 1, "b": 2}}]},
        {"role": "function", "content": "3", "tool_call_id": "c1"},
        {"role": "model", "content": "3."},
        {"role": "user", "content": "Thanks."},
        {"role": "chatbot", "content": "You"},
    ]
    normalized = normalize_messages(messages)
    assert [m.role for m in normalized] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert normalized[2].content == "" and normalized[2].tool_calls[0].name == "add" and normalized[3].tool_call_id == "c1"


def test_a_role_given_as_a_str_enum_is_its_plain_value():
    """A framework's role enum (a str subclass, as LlamaIndex's MessageRole is) reaches the chat
    template as its value: Jinja would render the enum itself as "Role.USER"."""
    import enum

    class Role(str, enum.Enum):
        USER = "user"

    role = normalize_messages([{"role": Role.USER, "content": "hi"}])[0].role
    assert role == "user" and type(role) is str


def test_chat_template_errors_name_the_model_and_the_option(draft_tokenizer):
    """A template's own refusal (here: roles must alternate) and a chat base template the base model
    lacks are errors about the messages and the option, not internal failures; they say which model,
    and a tokenizer built in memory (no name_or_path) is not named as ''."""
    from tiny import make_tokenizer

    from wsd_llms.prompts import build_prompts

    strict = make_tokenizer(300)
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    twice = normalize_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(InvalidMessagesError, match="the chat template of the draft model refused these messages: roles must alternate"):
        build_prompts(strict, draft_tokenizer, twice)
    strict.name_or_path = "my/strict-draft"
    with pytest.raises(InvalidMessagesError, match="the chat template of the draft model 'my/strict-draft' refused"):
        build_prompts(strict, draft_tokenizer, twice)
    plain = make_tokenizer(300, chat=False)
    with pytest.raises(InvalidParameterError, match="base_template='chat', but the base model has no chat template; use 'plain'"):
        build_prompts(draft_tokenizer, plain, twice, base_template="chat")


def test_tool_results_in_a_row_are_one_turn_for_a_template_whose_roles_alternate(draft_tokenizer):
    """A template without tools reads tool results as a user turn: parallel calls' results, and a
    question after them, are one turn, which a template whose roles must alternate (Gemma's,
    Mistral's) takes; it refused each as a turn of its own."""
    from tiny import make_tokenizer

    from wsd_llms.prompts import build_prompts

    strict = make_tokenizer(300)
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    calls = [{"id": "c1", "name": "add", "arguments": {"a": 3, "b": 4}}, {"id": "c2", "name": "mul", "arguments": {"a": 5, "b": 6}}]
    messages = normalize_messages(
        [
            {"role": "user", "content": "3+4 and 5*6?"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "7", "tool_call_id": "c1"},
            {"role": "tool", "content": "30", "tool_call_id": "c2"},
            {"role": "user", "content": "And 2+2?"},
        ]
    )
    for end in (4, 5):
        text = strict.decode(build_prompts(strict, draft_tokenizer, messages[:end]).draft_ids)
        turn = text[text.rindex("<user>") :]
        assert turn.startswith("<user><tool_response>\n7\n</tool_response>\n\n<tool_response>\n30\n</tool_response>"), text
        assert turn.endswith("And 2+2?") == (end == 5)


def test_tool_results_take_their_calls_order_by_id(draft_tokenizer):
    """The prompts pair results with calls by place, so results that came back in another order
    (appended as they finished) are put in the order of the calls they name; where one names no
    call of that turn, or two name one call, they stay as given."""
    from wsd_llms.prompts import build_prompts

    calls = [{"id": "c1", "name": "weather", "arguments": {"city": "Paris"}}, {"id": "c2", "name": "weather", "arguments": {"city": "Oslo"}}]

    def results(*pairs: tuple[str, str]) -> list[dict]:
        history = [{"role": "user", "content": "Paris and Oslo?"}, {"role": "assistant", "content": "", "tool_calls": calls}]
        return history + [{"role": "tool", "content": text, "tool_call_id": id_} for id_, text in pairs] + [{"role": "user", "content": "Warmer?"}]

    ordered = normalize_messages(results(("c2", "-3C"), ("c1", "12C")))
    assert [(m.tool_call_id, m.content) for m in ordered[2:4]] == [("c1", "12C"), ("c2", "-3C")]
    assert ordered[4].content == "Warmer?"
    base = build_prompts(draft_tokenizer, draft_tokenizer, ordered).base_text
    assert base.index("12C") < base.index("-3C")
    for pairs in ((("c2", "-3C"), ("c9", "12C")), (("c2", "-3C"), ("c2", "12C"))):
        assert [m.content for m in normalize_messages(results(*pairs))[2:4]] == ["-3C", "12C"]
    # a result with no id keeps its place (an adapter's of a call shown as text comes first); the rest take their calls' order
    mixed = results(("c2", "-3C"), ("c1", "12C"))
    mixed.insert(3, {"role": "tool", "content": "Error: cut short"})
    assert [(m.tool_call_id, m.content) for m in normalize_messages(mixed)[2:5]] == [("c1", "12C"), (None, "Error: cut short"), ("c2", "-3C")]
    by_place = results(("c1", "12C"))
    by_place.insert(3, {"role": "tool", "content": "-3C"})  # meant by place for c2
    assert [(m.tool_call_id, m.content) for m in normalize_messages(by_place)[2:4]] == [("c1", "12C"), (None, "-3C")]


def test_a_result_naming_no_call_of_the_turn_before_it_is_said(shared_runtime):
    """OpenAI's and Anthropic's APIs refuse a tool result whose id names no call of the turn before
    it; the prompts here show no ids, so the runtime decodes it but warns: the model reads it as the
    answer to the call in its place. A result with no id (a ReAct observation) names nothing."""
    from wsd_llms.messages import results_naming_no_call

    calls = [{"id": "c1", "name": "weather", "arguments": {"city": "Paris"}}, {"id": "c2", "name": "weather", "arguments": {"city": "Oslo"}}]
    turn = [{"role": "user", "content": "Paris and Oslo?"}, {"role": "assistant", "content": "", "tool_calls": calls}]

    def found(*results: dict) -> list[str]:
        return results_naming_no_call(normalize_messages([*turn, *results]))

    assert found({"role": "tool", "content": "12C", "tool_call_id": "c1"}, {"role": "tool", "content": "-3C", "tool_call_id": "c2"}) == []
    assert found({"role": "tool", "content": "12C"}) == []
    assert found({"role": "tool", "content": "12C", "tool_call_id": "c1"}, {"role": "tool", "content": "-3C", "tool_call_id": "c3"}) == [
        "messages[3] (tool) answers tool_call_id 'c3', which names no call of the turn before it (messages[1], whose calls are 'c1', 'c2')"
    ]
    trimmed = [{"role": "user", "content": "Paris?"}, {"role": "tool", "content": "12C", "tool_call_id": "c1"}]  # its call trimmed off
    assert results_naming_no_call(normalize_messages(trimmed)) == [
        "messages[1] (tool) answers tool_call_id 'c1', which names no call of the turn before it (messages[0] makes none)"
    ]
    assert results_naming_no_call(normalize_messages(trimmed[1:] + trimmed[:1])) == [
        "messages[0] (tool) answers tool_call_id 'c1', which names no call of the turn before it (none comes before it)"
    ]
    # the warning is the caller's: it names this file and line, whichever call made the request
    for call in (shared_runtime.generate, lambda m, **p: list(shared_runtime.stream(m, **p)), lambda m, **p: asyncio.run(shared_runtime.agenerate(m, **p))):
        with pytest.warns(ToolResultWarning, match="messages\\[1\\] \\(tool\\) answers tool_call_id 'c1', .*; the prompt pairs results with calls by place") as seen:
            call(trimmed, max_tokens=3)  # and decodes all the same
        assert [w.filename for w in seen] == [__file__]
    with pytest.warns(ToolResultWarning) as seen, ThreadPoolExecutor(1) as pool:  # no line of the caller's on a pool's stack
        pool.submit(shared_runtime.generate, trimmed, max_tokens=3).result()
    assert [w.filename for w in seen] == [sys.modules["wsd_llms.runtime"].__file__]  # the library's, as a plain warning's (not threading.py)


def test_runtime_raises_before_decoding(shared_runtime):
    with pytest.raises(InvalidParameterError, match="switch_window"):
        shared_runtime.generate([{"role": "user", "content": "hi"}], switch_window=0)
    with pytest.raises(InvalidMessagesError, match="empty"):
        list(shared_runtime.stream([]))


def test_a_misspelt_model_or_mode_is_named():
    """The runtime's helpers name a model or mode they do not know ("Draft" had counted tokens in
    the base model's tokenizer, "Online" had raised a bare KeyError), before reading any model."""
    from wsd_llms import WSDRuntime

    runtime = WSDRuntime("some/draft", "some/base")
    for call, needle in (
        (lambda: runtime.tokenizer("Draft"), "invalid model='Draft': must be 'base' or 'draft'"),
        (lambda: runtime.encoder("drafts"), "invalid model='drafts'"),
        (lambda: runtime.context_window("Online"), "invalid mode='Online': must be one of 'online', 'staged', 'base', 'draft'"),
        (lambda: runtime.known_context_window("chat"), "invalid mode='chat'"),
    ):
        with pytest.raises(InvalidParameterError, match=needle.replace("(", "\\(").replace("[", "\\[")):
            call()
    runtime.close()
