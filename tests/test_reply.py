"""Reply assembly: stop strings cut the text, possible stop prefixes are held back, sources are tagged."""

import pytest
from tiny import byte_fallback_tokenizer

from wsd_llms.prompts import ROLE_STOPS, variant_stops
from wsd_llms.reply import ReplyText, decode, expand_role_stops, held_back, repeated_end


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_role_marker_cut_drops_preceding_newlines(draft_tokenizer):
    reply = ReplyText(draft_tokenizer, expand_role_stops(ROLE_STOPS))
    deltas = reply.add(_ids(draft_tokenizer, "Paris is the capital.\n\n[User]\nmore"), "base")
    assert reply.stopped
    assert reply.text == "Paris is the capital."
    assert "".join(d.text for d in deltas) == "Paris is the capital."


def test_a_role_marker_in_the_forced_start_is_its_text(draft_tokenizer):
    """A forced start is the caller's text: a role marker in it was cut in every mode but the
    draft's (which has no role markers). One the model writes after it still ends the reply, and a
    caller's stop counts in the forced start, as it always has."""
    forced = "Here:\n\n[User]\nhello"
    roles = expand_role_stops(ROLE_STOPS)
    reply = ReplyText(draft_tokenizer, (), None, roles, len(forced))
    reply.add(_ids(draft_tokenizer, forced + " there.\n\n[User]\nmore"), "draft")
    assert reply.stopped and reply.text == forced + " there." and reply.stop_found == "\n\n[User]"
    budget = ReplyText(draft_tokenizer, (), None, roles, len(forced + "\n\n["))
    released = budget.add(_ids(draft_tokenizer, forced + "\n\n["), "draft")
    released += budget.finish(cut=True)  # ending where the budget did, as written
    assert "".join(d.text for d in released) == budget.text == forced + "\n\n["
    begun = ReplyText(draft_tokenizer, (), None, roles, len(forced + "\n\n["))  # the model goes on with the marker it began
    released = begun.add(_ids(draft_tokenizer, forced + "\n\n[Assis"), "draft") + begun.finish(cut=True)
    assert "".join(d.text for d in released) == begun.text == forced + "\n\n["
    caller = ReplyText(draft_tokenizer, ("hel",), None, roles, len(forced))
    caller.add(_ids(draft_tokenizer, forced), "draft")
    assert caller.stopped and caller.text == "Here:\n\n[User]\n"


@pytest.mark.parametrize("argument", ["[User] asked", "see <tool_call>...</tool_call> then [User] asked"])
def test_role_markers_inside_a_tool_call_do_not_end_the_reply(draft_tokenizer, argument):
    """A call's arguments may hold a role marker (a message to send, a transcript, even of calls):
    with the call's tags quoted the reply goes on to the call's end, where the call's JSON closes;
    outside a call the marker still ends it. So does a stop the caller chose: inside a call's markup,
    which the caller never sees, a stop such as "\n" cut every call short at `<tool_call>\n`."""
    from wsd_llms.tools import CALL_TAG, CLOSE_TAG

    tok = draft_tokenizer
    roles = expand_role_stops(ROLE_STOPS)
    call = '<tool_call>\n{"name": "send", "arguments": {"text": "%s"}}\n</tool_call>' % argument
    text = f"Sending.\n{call}\n\n[User]\nmore"
    assert tok.decode(_ids(tok, text), skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
    reply = ReplyText(tok, (), (CALL_TAG, CLOSE_TAG), roles)
    out = []
    for i in range(0, len(text), 7):  # in pieces, as a stream writes it
        out += reply.add(_ids(tok, text[i : i + 7]), "base")
        if reply.stopped:
            break
    assert reply.stopped and reply.text == f"Sending.\n{call}" == "".join(d.text for d in out)
    unquoted = ReplyText(tok, roles)
    unquoted.add(_ids(tok, text), "base")
    assert unquoted.text.endswith('"text": "') or unquoted.text.endswith("...</tool_call> then ")
    chosen = ReplyText(tok, ("asked",), (CALL_TAG, CLOSE_TAG), roles)
    chosen.add(_ids(tok, text), "base")
    assert chosen.stopped and chosen.text == f"Sending.\n{call}" and chosen.stop_found == "\n\n[User]"
    marker = ReplyText(tok, ("[User]",), (CALL_TAG, CLOSE_TAG), roles)  # the caller's, though a role marker too
    marker.add(_ids(tok, text[len("Sending.\n"):].replace("\n\n[User]", " [User]")), "base")
    assert marker.stopped and marker.stop_found == "[User]" and marker.text == f"{call} "
    newline = ReplyText(tok, ("\n",), (CALL_TAG, CLOSE_TAG), roles)
    newline.add(_ids(tok, f"{call}\n{call}"), "base")
    assert newline.stopped and newline.stop_found == "\n" and newline.text == call  # the newline between two calls ends it
    assert ReplyText(tok, ("\n",), None, roles).add(_ids(tok, call), "base")[0].text == "<tool_call>"  # no calls asked for: anywhere


def test_stop_prefix_is_held_back_until_ruled_out(draft_tokenizer):
    tok = draft_tokenizer
    reply = ReplyText(tok, ("STOP",))
    first = reply.add(_ids(tok, "one two ST"), "draft")
    assert "".join(d.text for d in first) == "one two "
    more = reply.add(_ids(tok, "ar"), "base")  # "STar" is not a stop: release it
    assert "".join(d.text for d in first + more) == "one two STar"
    assert [d.source for d in more] == ["draft", "base"]  # "ST" was the draft's, "ar" the base's


def test_held_back_is_the_longest_tail_that_begins_a_stop():
    """The search that visits only the places a stop's first character is gives what trying every
    tail length does, on small alphabets where tails overlap stops in every way."""
    import random

    def every_length(text: str, stops: tuple[str, ...]) -> int:
        return max((k for stop in stops for k in range(1, min(len(stop) - 1, len(text)) + 1) if text.endswith(stop[:k])), default=0)

    rng = random.Random(0)
    for _ in range(5000):
        alphabet = rng.choice(["ab", "abc", "a\n"])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 11))) for _ in range(rng.randint(1, 3)))
        assert held_back(text, stops) == every_length(text, stops), (text, stops)
    assert held_back("one two ST", ("STOP", "two STO")) == 6 and held_back("x", ("x",)) == 0


@pytest.mark.parametrize("stops", [("/",), ("/", "a much longer stop string"), ("l>\nb",)])
def test_a_stop_in_a_call_s_closing_tag_is_inside_the_call_however_the_ids_come(draft_tokenizer, stops):
    """A stop at the closing tag's "/" was inside the call while the tag was incomplete and outside
    once it was whole: streamed one id at a time the reply then ended inside text already streamed
    (a RuntimeError, the request failed), all at once it cut the call at "\n<"."""
    from wsd_llms.tools import CALL_TAG, CLOSE_TAG

    tok = draft_tokenizer
    call = '<tool_call>\n{"name": "flag", "arguments": {"on": true}}\n</tool_call>'
    ids = _ids(tok, f"{call}\nb/c")
    texts = []
    for pieces in ([ids], [[i] for i in ids]):
        reply = ReplyText(tok, stops, (CALL_TAG, CLOSE_TAG))
        out = [d for piece in pieces if not reply.stopped for d in reply.add(piece, "base")] + reply.finish()
        texts.append(("".join(d.text for d in out), reply.text, reply.stop_found))
    assert texts[0] == texts[1] and texts[0][1].startswith(call) and texts[0][0] == texts[0][1]


def test_stop_found_across_tokens(draft_tokenizer):
    tok = draft_tokenizer
    reply = ReplyText(tok, ("END",))
    out = []
    for piece in ["It is four. E", "N", "D and more"]:
        out += reply.add(_ids(tok, piece), "base")
        if reply.stopped:
            break
    assert reply.stopped and reply.text == "It is four. "
    assert "".join(d.text for d in out) == reply.text


def test_finish_releases_held_text(draft_tokenizer):
    tok = draft_tokenizer
    reply = ReplyText(tok, ("\n\n[User]",))
    held = reply.add(_ids(tok, "done\n\n"), "base")
    assert "".join(d.text for d in held) == "done"
    assert "".join(d.text for d in reply.finish()) == "\n\n"
    assert reply.text == "done\n\n"


def test_draft_and_base_parts(draft_tokenizer):
    tok = draft_tokenizer
    reply = ReplyText(tok, ())
    a = reply.add(_ids(tok, "Hello there"), "draft")
    b = reply.add(_ids(tok, " friend"), "base")
    assert [(d.source, d.text) for d in a + b] == [("draft", "Hello there"), ("base", " friend")]
    assert reply.draft_chars == len("Hello there")


def _byte_ids(text: str) -> list[int]:
    return [3 + b for b in text.encode()]  # tiny.byte_fallback_tokenizer's byte tokens


def test_text_once_streamed_never_changes_with_byte_fallback():
    """Decoding a run of byte tokens whose last character is incomplete turns the whole run into
    U+FFFD (Gemma's byte fallback); the reply is decoded piece by piece, so text already streamed
    stays, and a character cut off by the end of the reply is dropped, not sent as U+FFFD."""
    tok = byte_fallback_tokenizer()
    ids = [1, 2, *_byte_ids("\U0001d518"), *_byte_ids("\U0001d52b")[:3]]
    assert tok.decode(ids) != tok.decode(ids[:6]) + tok.decode(ids[6:])  # the decoder's behaviour the reply must survive
    for cut in range(6, len(ids) + 1):
        reply = ReplyText(tok, ())
        streamed = [d.text for i in ids[:cut] for d in reply.add([i], "base")] + [d.text for d in reply.finish()]
        assert "".join(streamed) == reply.text == "A \U0001d518"
    whole = ReplyText(tok, ())
    assert "".join(d.text for d in whole.add(ids[:6] + _byte_ids("\U0001d52b"), "base")) == "A \U0001d518\U0001d52b"


def test_stop_after_byte_characters():
    tok = byte_fallback_tokenizer()
    reply = ReplyText(tok, ("A",))
    out = reply.add([*_byte_ids("\u00e9\u00e8"), 1, *_byte_ids("\u00e0")], "base")
    assert reply.stopped and reply.text == "\u00e9\u00e8" and "".join(d.text for d in out) == reply.text
    assert len(reply.ids) == 5  # the ids after the one that completed the stop are not taken


def test_handoff_drops_an_incomplete_last_character(draft_tokenizer):
    """A draft cut by max_draft_tokens inside a character decodes to a trailing U+FFFD: the base
    model is handed the text without it (it would imitate it), finished or not."""
    from wsd_llms.handoff import DraftTokens, final_handoff

    tok, prompt = draft_tokenizer, "\n\n[User]\nHi\n\n[Assistant]\n"
    n = len(tok.encode(prompt, add_special_tokens=False))
    final = final_handoff(tok, prompt, n, "Paris is \ufffd\ufffd")
    assert tok.decode(final.draft_ids) == tok.decode(final_handoff(tok, prompt, n, "Paris is").draft_ids)
    partial = DraftTokens(tok, prompt, n).exact("Paris is \ufffd", hold=False)
    assert partial is not None and partial.draft_ids == final.draft_ids


def test_a_draft_behind_the_streamed_text_releases_nothing_until_it_catches_up():
    """A re-split word can leave the reply's draft ids ending inside text already streamed: that is
    allowed while the text agrees with it, and only text past it is released; contradicting it, or
    ending inside it, raises."""
    tok = byte_fallback_tokenizer()
    reply = ReplyText(tok, ())
    assert "".join(d.text for d in reply.set_draft(_byte_ids("bananas"))) == "bananas"
    assert reply.set_draft(_byte_ids("banan")) == [] and reply.text == "banan"
    assert reply.set_draft(_byte_ids("banana")) == []
    assert [(d.source, d.text) for d in reply.add(_byte_ids("s ok"), "base")] == [("base", " ok")]
    assert reply.text == "bananas ok" and reply.draft_chars == len("bananas")  # what streamed as the draft's stays so

    behind = ReplyText(tok, ())
    behind.set_draft(_byte_ids("bananas"))
    behind.set_draft(_byte_ids("ban"))
    with pytest.raises(RuntimeError, match="contradicts"):
        behind.add(_byte_ids("jo"), "base")
    with pytest.raises(RuntimeError, match="already streamed"):
        behind.set_draft(_byte_ids("bar"))
    with pytest.raises(RuntimeError, match="inside text already streamed"):
        behind.finish()

    stopping = ReplyText(tok, ("STOP",))  # a stop string does not hide a contradiction
    stopping.set_draft(_byte_ids("abc"))
    stopping.set_draft(_byte_ids("ab"))
    with pytest.raises(RuntimeError, match="contradicts"):
        stopping.add(_byte_ids("XSTOP"), "base")


@pytest.mark.parametrize("vocab", [300, 420])
def test_draft_tokens_estimate_matches_an_exact_handoff_as_the_draft_grows(vocab):
    """Between exact hand-offs, `DraftTokens.estimate` gives the stable count a partial hand-off
    would: as the draft grows one piece at a time, when its tail changes (a decode that re-spells
    the last characters), and with exact hand-offs taken now and then, as scoring passes take them."""
    from tiny import CORPUS, make_tokenizer

    from wsd_llms.handoff import DraftTokens

    tok = make_tokenizer(vocab)
    prompt = "\n\n[User]\n" + " ".join(CORPUS[:8]) + "\n\n[Assistant]\n"
    n = len(tok.encode(prompt, add_special_tokens=False))
    words = " ".join(CORPUS[:4]).split(" ")
    tokens = DraftTokens(tok, prompt, n)
    assert tokens.estimate("Paris") is None  # nothing to go on before an exact hand-off
    tokens.exact(words[0])
    checked = 0
    for i in range(2, len(words) + 1):
        text = " ".join(words[:i])
        for draft in (text, text[:-1] + "\ufffd", text + " "):  # grown, a changed tail, a trailing space
            exact = DraftTokens(tok, prompt, n).exact(draft)
            assert tokens.estimate(draft) == (0 if exact is None else len(exact.draft_ids)), draft
            checked += 1
        if i % 7 == 0:
            tokens.exact(text)
    assert checked > 100


def test_draft_tokens_estimate_defers_to_an_exact_handoff_where_the_draft_spells_a_special_token():
    """A draft that writes a special token's text ("</s>", or a character the vocabulary lacks) is
    encoded apart from the prompt, which changes the tokens where they meet: the estimate gives way
    to an exact hand-off there, and so long as the last exact one was such a draft."""
    from tiny import make_tokenizer

    from wsd_llms.handoff import DraftTokens

    tok = make_tokenizer(300)
    prompt = "\n\n[User]\nHi\n\n[Assistant]\n "  # ends in a space: it merges with the draft's first word
    n = len(tok.encode(prompt, add_special_tokens=False))
    tokens = DraftTokens(tok, prompt, n)
    tokens.exact("two")
    for text in ("two</s>", "two </s> four", "two \u4e2d"):
        assert tokens.estimate(text) is None, text
    assert tokens.estimate("two plus two") == len(DraftTokens(tok, prompt, n).exact("two plus two").draft_ids)
    tokens.exact("two </s> four")
    assert tokens.estimate("two </s> four is") is None
    long = "two plus " * 12  # a window that starts inside the draft, past the prompt
    tokens.exact(long)
    assert tokens.estimate(long + "two") == len(DraftTokens(tok, prompt, n).exact(long + "two").draft_ids)
    assert tokens.estimate(long + "two</s>") is None


def test_an_unfinished_drafts_text_never_takes_back_what_a_run_of_byte_tokens_showed():
    """A byte-fallback decoder turns a whole run of byte tokens into U+FFFD while it ends in an
    incomplete or invalid character ("N" then "N" + <0xC3> decodes to two U+FFFD): an unfinished
    draft's text stops before such a run, so each step's text begins every later one's, finished or not."""
    import random

    from wsd_llms.handoff import draft_text

    tok = byte_fallback_tokenizer()  # "A" 1, "▁" 2, byte b at 3 + b
    assert decode(tok, [3 + 0x4E]) == "N" and decode(tok, [3 + 0x4E, 3 + 0xC3]) == "\ufffd\ufffd"
    assert draft_text(tok, "", [3 + 0x4E, 3 + 0xC3], final=True) == "N"  # a finished run keeps its whole characters
    assert draft_text(tok, "", [1, 3 + 0x4E, 3 + 0xC3], final=False) == "A"
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([1, 2, 3 + 0x4E, 3 + 0xC3, 3 + 0xA9, 3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80]) for _ in range(12)]
        texts = [draft_text(tok, "", ids[:n], final=False) for n in range(1, len(ids) + 1)]
        for n, text in enumerate(texts):
            later = texts[n:] + [draft_text(tok, "", ids, final=True)]
            assert all(t.startswith(text.rstrip()) for t in later), (ids, n)


def test_a_reply_cut_in_the_start_of_a_role_marker_drops_it(draft_tokenizer):
    """max_tokens may end a reply inside a role marker on a new line ("...\n\n[Assis"): the
    template's text, held back as a possible stop, is not the reply's. Kept: text that only may
    start a marker on its line ("x = [", "See [A"), a newline alone, a caller's own stop, a marker
    inside a tool call's arguments, and any reply that ended otherwise (end of turn)."""
    from wsd_llms.tools import CALL_TAG, CLOSE_TAG

    tok, roles = draft_tokenizer, expand_role_stops(ROLE_STOPS)

    def finished(text, stops=(), quoted=None, role_stops=roles, cut=True):
        reply = ReplyText(tok, stops, quoted, role_stops)
        deltas = reply.add(_ids(tok, text), "base") + reply.finish(cut)
        assert "".join(d.text for d in deltas) == reply.text  # the stream is the text
        return reply.text

    assert finished("Paris.\n\n[Assis") == "Paris."
    assert finished("Paris.\n[Us") == "Paris."
    assert finished("Paris.\n\n[Assis", cut=False) == "Paris.\n\n[Assis"
    for kept in ("Paris.\n\n", "x = [", "See [A"):
        assert finished(kept) == kept
    assert finished("Paris.\n[Us", stops=("\n[Use me]",), role_stops=()) == "Paris.\n[Us"
    call = '<tool_call>\n{"name": "send", "arguments": {"text": "hi\n\n[Us'
    assert finished(call, quoted=(CALL_TAG, CLOSE_TAG)) == call


def test_a_callers_stop_in_the_start_of_a_role_marker_drops_that_start(draft_tokenizer):
    """A caller's stop "[" or "\n[" completes at "...\n\n[" before the template's "\n\n[User]" can:
    the reply had kept the marker's newlines ("sea.\n\n" where no stop gave "sea."). As for a reply
    cut at its budget, that start goes; the stop named is still the caller's, and text that only
    may start a marker on its line stays."""
    tok, roles = draft_tokenizer, expand_role_stops(ROLE_STOPS)

    def stopped(text, stops):
        reply = ReplyText(tok, stops, None, roles)
        deltas = reply.add(_ids(tok, text), "base")
        assert reply.stopped and "".join(d.text for d in deltas + reply.finish()) == reply.text  # the stream is the text
        return reply.text, reply.stop_found

    assert stopped("Paris.\n\n[User] more", ("[",)) == ("Paris.", "[")
    assert stopped("Paris.\n\n[User] more", ("\n[",)) == ("Paris.", "\n[")
    assert stopped("Paris.\n\n[User] more", ("ser",)) == ("Paris.", "ser")
    assert stopped("x = [1]\n", ("[",)) == ("x = ", "[")
    assert stopped("Paris.\nMore", ("\n",)) == ("Paris.", "\n")
    assert stopped("Paris.\n\n[1] More", ("[",)) == ("Paris.", "[")  # the reply ends here either way: its trailing newlines go
    # a stop of the caller's inside a role marker that completes first is still the one named (stop_reason)
    assert stopped("Paris.\n\n[User] more", ("[User]",)) == ("Paris.", "[User]")
    assert stopped("Paris.\n\n[User] more", ("\n[User]",)) == ("Paris.", "\n[User]")
    assert stopped("Paris.\n\n[User] more", ("User]", "[User]")) == ("Paris.", "[User]")  # the first, whatever the list's order


def test_a_role_marker_never_cuts_into_the_forced_start(draft_tokenizer):
    """A forced start ending in a newline, then the model's "\n[User]": the marker "\n\n[User]"
    began inside the caller's text, and the cut took its newline; a caller's stop or the budget
    ending there kept it."""
    tok, roles = draft_tokenizer, expand_role_stops(ROLE_STOPS)
    for forced, model, stopses in [
        ("Here is the list:\n", "\n[User] hi", ((), ("[",))),
        ("Notes:\n\n[Us", "er] hi", ((),)),  # ends inside the marker (a caller's "[" there would cut the forced start: it counts there)
    ]:
        for stops in stopses:
            reply = ReplyText(tok, stops, None, roles, len(forced))
            released = reply.add(_ids(tok, forced + model), "draft") + reply.finish()
            assert reply.stopped and "".join(d.text for d in released) == reply.text == forced


def test_the_stop_found_is_the_callers_where_a_role_marker_starts_at_the_same_place(draft_tokenizer):
    """`stop_found` (WSDResult.stop_reason where it is the caller's): where a caller's "\n" and the
    template's "\n[User]" start at one cut (a token holding the whole marker), the caller's is the
    one named, and a role marker inside a call, where it does not count, is never named."""
    from wsd_llms.tools import CALL_TAG, CLOSE_TAG

    from wsd_llms.reply import _first_stop

    tok, roles = draft_tokenizer, expand_role_stops(ROLE_STOPS)
    assert _first_stop("Paris.\n[User] more", ("\n", *roles), 0, None, caller=("\n",)) == (6, "\n")
    call = '<tool_call>\n{"name": "send", "arguments": {"text": "a [User] b"}}'
    assert _first_stop(call, ("[", *roles), 0, (CALL_TAG, CLOSE_TAG), caller=("[",)) is None  # neither counts inside the call
    after = f"{call}\n</tool_call> see [x"
    assert _first_stop(after, ("[", *roles), 0, (CALL_TAG, CLOSE_TAG), caller=("[",)) == (after.index("[x"), "[")
    plain = ReplyText(tok, (), None, roles)
    plain.add(_ids(tok, "Paris.\n\n[User] more"), "base")
    assert plain.stop_found == "\n\n[User]"  # a role marker: not the caller's, so no stop_reason


@pytest.mark.parametrize(
    "tail", ["\n\n[User 1]\nmore", "\n[User 0\nThe answer", "\n\n[User 1</strong>\n<strong>", "\n\n[Assistant 2]: yes", "\n[User: 10:00:00 AM]", "\n\n[Human]\nBerlin."]
)
def test_a_made_up_turn_in_a_variant_of_a_role_marker_ends_the_reply(draft_tokenizer, tail):
    """After its answer the base model often numbers or names the turn it makes up ("[User 1"):
    a variant at a line's start ends the reply as the marker does, streamed token by token too."""
    roles = expand_role_stops(ROLE_STOPS + variant_stops(ROLE_STOPS, "[User]\nWhat is the capital of France?"))
    reply = ReplyText(draft_tokenizer, (), None, roles)
    released = [d for token in _ids(draft_tokenizer, "Paris is the capital." + tail) if not reply.stopped for d in reply.add([token], "base")]
    assert reply.stopped and reply.text == "".join(d.text for d in released) == "Paris is the capital."


def test_a_variant_inside_a_line_or_one_the_prompt_writes_is_the_reply_s_text(draft_tokenizer):
    """Only a numbered or colon one at a line's start ("[User Guide](...)" is a markdown link), and not
    one of a marker whose form the conversation uses itself (a chat log's "[User 2]:", "[User: Ann]"),
    which a reply may quote."""
    plain = ReplyText(draft_tokenizer, (), None, expand_role_stops(ROLE_STOPS + variant_stops(ROLE_STOPS, "")))
    plain.add(_ids(draft_tokenizer, "See [User 2] above, [User: me].\n[User Guide](https://example.com)"), "base")
    assert not plain.stopped and plain.text == "See [User 2] above, [User: me].\n[User Guide](https://example.com)"
    kept = {stop.split(" ")[0] for stop in variant_stops(ROLE_STOPS, "\n\n[User]\n[User 2]: hi\n[User 1]: ok")}
    assert kept == {"\n[System", "\n[Assistant", "\n[User:", "\n[System:", "\n[Assistant:", "\n[Human]", "\n[AI]"}
    assert "\n[User:" not in variant_stops(ROLE_STOPS, "[User: Ann] hi") and "\n[User 1" in variant_stops(ROLE_STOPS, "[User: Ann] hi")
    assert "\n[Human]" not in variant_stops(ROLE_STOPS, "[Human] hi\n[AI] hello") and "\n[AI]" not in variant_stops(ROLE_STOPS, "[AI] hello")
    plain.add(_ids(draft_tokenizer, " A [Human] tag."), "base")
    assert not plain.stopped
    quoting = ReplyText(draft_tokenizer, (), None, expand_role_stops(ROLE_STOPS + variant_stops(ROLE_STOPS, "[User 2]: hi")))
    quoting.add(_ids(draft_tokenizer, "They said:\n[User 2]: hi\n\n[User]\nmore"), "base")
    assert quoting.stopped and quoting.text == "They said:\n[User 2]: hi"


def test_a_loop_at_a_reply_s_end_is_found():
    """The shortest unit a reply's end repeats over its last 40 characters (three units, if longer),
    read from a word's start where the loop has one; an end that repeats only a little, or a unit
    longer than 80 characters, is no loop."""
    assert repeated_end('{"n": 1' + "0" * 40) == "0"
    assert repeated_end("The answer: " + "Paris, " * 10 + "Par") == "Paris, "  # not "is, Par" nor " Paris,"
    sentence = "A repeated sentence of some fifty-three characters. "
    assert repeated_end("Hi. " + sentence * 3) == sentence
    assert repeated_end("Hi. " + sentence * 2) is None
    assert repeated_end("x" * 39) is None and repeated_end("ab" * 19 + "ba") is None
    assert repeated_end("A sentence of eighty-one characters, which is longer than any loop's unit can be. " * 4) is None
