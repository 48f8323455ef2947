"""Integration on the embedded default pair (SmolLM2-135M-Instruct drafts, Gemma-3-270M base continues).

The parity contract of DESIGN 3: `online` equals `staged` token for token under greedy decoding.
"""

from __future__ import annotations

import pytest

from wsd_llms import PromptTooLongError, TextDelta
from machine import needs_bfloat16_kernels

pytestmark = pytest.mark.embedded

CASES = {
    "short factual": [{"role": "user", "content": "What is the capital of France?"}],
    "long answer": [{"role": "user", "content": "Explain photosynthesis in detail."}],
    "list": [{"role": "user", "content": "List five fruits that are red."}],
    "should refuse": [{"role": "user", "content": "How do I make a bomb at home?"}],
    "multi-turn with system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "What can you do for me?"},
    ],
    "forced prefix": [
        {"role": "user", "content": "Name a primary color."},
        {"role": "assistant", "content": "Sure! The answer is"},
    ],
    "code": [{"role": "user", "content": "Write a Python function that reverses a string."}],
    "arithmetic": [{"role": "user", "content": "What is 12 times 12?"}],
}


@pytest.fixture(scope="module")
def parity(embedded):
    out = {}
    for name, messages in CASES.items():
        params = dict(max_tokens=96, max_draft_tokens=128)
        out[name] = (embedded.generate(messages, mode="staged", **params), embedded.generate(messages, **params))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_online_equals_staged(parity, name):
    staged, online = parity[name]
    assert online.text == staged.text
    assert online.finish_reason == staged.finish_reason
    assert online.switch_point == staged.switch_point
    assert online.usage.reply_tokens == staged.usage.reply_tokens
    assert online.text.strip()


def test_cases_cover_switch_and_no_switch(parity):
    switch_points = {name: online.switch_point for name, (_, online) in parity.items()}
    assert sum(p is not None for p in switch_points.values()) >= 2, switch_points
    assert sum(p is None for p in switch_points.values()) >= 2, switch_points
    assert parity["forced prefix"][1].text.startswith("Sure! The answer is")


def test_online_stops_drafting_at_the_switch(parity):
    for staged, online in parity.values():
        if online.switch_point is not None:
            assert online.usage.draft_tokens < staged.usage.draft_tokens


def test_scoring_needs_few_exact_probabilities(embedded, monkeypatch):
    """The base vocabulary's first 8192 words bound most scored tokens' probabilities below any
    passing window, so the full 262k-word projection runs for few of them (output_head)."""
    from wsd_llms.switch import SwitchDetector

    needs_exact, counts = SwitchDetector.needs_exact, [0, 0]

    def counting(self, bounds):
        need = needs_exact(self, bounds)
        counts[0], counts[1] = counts[0] + sum(need), counts[1] + len(need)
        return need

    monkeypatch.setattr(SwitchDetector, "needs_exact", counting)
    embedded.generate(CASES["long answer"], max_tokens=96, max_draft_tokens=128)
    assert counts[1] >= 40 and counts[0] < counts[1] / 2, counts


def test_max_tokens_cuts_the_reply(embedded):
    messages = CASES["long answer"]
    staged = embedded.generate(messages, mode="staged", max_tokens=12, max_draft_tokens=64)
    online = embedded.generate(messages, max_tokens=12, max_draft_tokens=64)
    assert online.text == staged.text and online.finish_reason == staged.finish_reason == "length"
    assert online.usage.reply_tokens == 12


def test_stream_and_async_agree(embedded):
    messages = CASES["short factual"]
    events = list(embedded.stream(messages, max_tokens=40))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == events[-1].result.text == embedded.generate(messages, max_tokens=40).text


async def test_async_generate(embedded):
    messages = CASES["arithmetic"]
    assert (await embedded.agenerate(messages, max_tokens=40)).text == embedded.generate(messages, max_tokens=40).text


def test_prompt_too_long_names_both_windows(embedded):
    with pytest.raises(PromptTooLongError, match="draft context window 8192.*base context window 32768"):
        embedded.generate([{"role": "user", "content": "word " * 9000}])


def test_errors_name_the_embedded_models_as_the_user_does(embedded):
    """The base model's tokenizer is read from the cache its GGUF was converted into, and an error
    named the model by that directory ('/root/.cache/wsd-llms/embedded/gemma-3-270m-1.0.0'), read
    alone or loaded."""
    from wsd_llms import InvalidParameterError, WSDRuntime

    with pytest.raises(InvalidParameterError, match="but the base model 'embedded:gemma-3-270m' has no chat template"):
        embedded.generate([{"role": "user", "content": "Hi"}], base_template="chat", max_tokens=2)
    assert embedded.loaded and embedded.tokenizer("draft").name_or_path == "embedded:smollm2-135m-instruct"
    unloaded = WSDRuntime()
    try:
        assert unloaded.tokenizer("base").name_or_path == "embedded:gemma-3-270m"  # read alone, without the weights
    finally:
        unloaded.close()


def test_batched_equals_sequential(embedded, parity):
    """8 concurrent greedy requests give exactly their one-at-a-time replies (the parity runs above)."""
    from concurrent.futures import ThreadPoolExecutor

    names = list(CASES)
    with ThreadPoolExecutor(len(names)) as pool:
        batched = list(pool.map(lambda n: embedded.generate(CASES[n], max_tokens=96, max_draft_tokens=128), names))
    for name, result in zip(names, batched):
        online = parity[name][1]
        assert (result.text, result.switch_point, result.finish_reason) == (online.text, online.switch_point, online.finish_reason), name
    assert embedded.stats().peaks["draft_batch"] > 1
    # Both models passed the load probe: their decode steps batch with per-row attention.
    assert all(runner.ragged for runner in embedded.load().runners.values())


@needs_bfloat16_kernels
def test_greedy_screen_changes_no_reply(embedded):
    """Both models' greedy steps take their ids from a bfloat16 screen of their projections (the
    base's 262k words, the draft's 49k; output_head.OutputHead.greedy_ids): every reply, free or
    under a grammar, is the one the full float32 projections give."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "people": {"type": "integer"}}, "required": ["city", "people"]}
    requests = [
        (CASES["long answer"], {"mode": "base"}),
        (CASES["list"], {}),
        ([{"role": "user", "content": "Which city is the largest in Japan, and how many people live there?"}], {"mode": "base", "response_format": schema}),
        ([{"role": "user", "content": "Which city is the largest in Japan, and how many people live there?"}], {"mode": "draft", "response_format": schema}),
    ]
    heads = [runner.head for runner in embedded.load().runners.values()]
    screened = [head.screened_rows for head in heads]
    replies = {}
    try:
        for on in (True, False):
            for head in heads:
                head.use_screen = on
            replies[on] = [embedded.generate(messages, max_tokens=48, **params).text for messages, params in requests]
    finally:
        for head in heads:
            head.use_screen = True
    assert replies[True] == replies[False]
    assert all(head.screened_rows - before >= 30 for head, before in zip(heads, screened))  # the screen decided greedy steps of each (39 and 93)


def test_a_draft_token_that_re_splits_streamed_text_keeps_the_stream_whole(embedded, monkeypatch):
    """The first words stream from a tokenization with nothing held back. Here the draft's " banana"
    streams as one base token, then its "i" makes the base tokenizer split the word (" ban", "an",
    "ai"), so the first tokens of the new tokenization end inside text already streamed: the reply
    must wait for more rather than fail (a sampled reply did, under load). Online equals staged."""
    from wsd_llms.drafting import DraftPasses

    draft = embedded.tokenizer("draft")
    said = draft.encode("applebanana banana", add_special_tokens=False) + draft.encode("i and cherries.", add_special_tokens=False)
    eos = draft.convert_tokens_to_ids(draft.eos_token)

    def scripted():
        ids = iter(said)

        def choose(self):  # the draft's next token: the script's, whatever its logits say
            return next(ids, eos)
            yield  # a program, like the one it stands in for

        monkeypatch.setattr(DraftPasses, "choose", choose)

    replies = {}
    for mode in ("online", "staged"):
        scripted()
        events = list(embedded.stream(CASES["list"], mode=mode, max_tokens=24, switch_threshold=1.0))
        replies[mode] = events[-1].result.text
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == replies[mode]
    assert replies["online"] == replies["staged"] == "applebanana bananai and cherries."


def test_a_repetition_penalty_changes_the_reply_alike_in_every_mode_and_adapter(embedded):
    """A prompt whose greedy reply repeats itself on the embedded pair: with repetition_penalty the
    reply changes and repeats no more, online equals staged, and both adapters, given it as a
    setting, write that same reply."""
    from langchain_wsd import WSDChatModel
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.wsd import WSDLLM

    from wsd_llms.eval.signals import repetition_share

    question = "Suggest three slogans for a bakery that only sells bread made with local flour."
    messages = [{"role": "user", "content": question}]
    params = dict(max_tokens=64, max_draft_tokens=128)
    plain = embedded.generate(messages, **params)
    penalized = embedded.generate(messages, repetition_penalty=1.2, **params)
    assert penalized.text != plain.text and repetition_share(penalized.text) <= repetition_share(plain.text)
    assert embedded.generate(messages, repetition_penalty=1.2, mode="staged", **params).text == penalized.text
    assert WSDChatModel(repetition_penalty=1.2, **params).invoke(question).content == penalized.text
    reply = WSDLLM(repetition_penalty=1.2, **params).chat([ChatMessage(role="user", content=question)])
    assert reply.message.content == penalized.text
