"""Reply assembly: stop strings cut the text, possible stop prefixes are held back, sources are tagged."""

from wsd_llms.prompts import ROLE_STOPS
from wsd_llms.reply import ReplyText, expand_role_stops


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_role_marker_cut_drops_preceding_newlines(draft_tokenizer):
    reply = ReplyText(draft_tokenizer, expand_role_stops(ROLE_STOPS))
    deltas = reply.add(_ids(draft_tokenizer, "Paris is the capital.\n\n[User]\nmore"), "base")
    assert reply.stopped
    assert reply.text == "Paris is the capital."
    assert "".join(d.text for d in deltas) == "Paris is the capital."


def test_stop_prefix_is_held_back_until_ruled_out(draft_tokenizer):
    tok = draft_tokenizer
    reply = ReplyText(tok, ("STOP",))
    first = reply.add(_ids(tok, "one two ST"), "draft")
    assert "".join(d.text for d in first) == "one two "
    more = reply.add(_ids(tok, "ar"), "base")  # "STar" is not a stop: release it
    assert "".join(d.text for d in first + more) == "one two STar"
    assert [d.source for d in more] == ["draft", "base"]  # "ST" was the draft's, "ar" the base's


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
