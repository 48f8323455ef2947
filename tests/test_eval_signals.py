"""Each quality signal of `wsd-llms eval` on hand-made texts, and the prompt loader on bad input."""

import json
import re

import pytest

from wsd_llms.eval import load_prompts
from wsd_llms.eval.prompts import DEFAULT_PROMPTS
from wsd_llms.eval.signals import (
    is_declined,
    is_degenerate,
    is_empty,
    is_truncated,
    leaked_role_marker,
    repetition_share,
)


@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("", 0.0),
        ("too short", 0.0),
        ("The cat sat on the mat and looked at the dog.", 0.0),  # no trigram occurs twice
        ("a a a a a", 1.0),  # overlapping occurrences cover every word once
        ("I like it. I like it. I like it. I like it.", 1.0),
        ("one two three four one two three five six seven", 6 / 10),
        ("Go go GO, go!", 1.0),  # case and punctuation are ignored
    ],
)
def test_repetition_share(text, share):
    assert repetition_share(text) == pytest.approx(share)


def test_degenerate_threshold():
    assert is_degenerate("the end the end the end the end")
    assert not is_degenerate("Paris is the capital of France, and Rome is the capital of Italy.")  # 6 of 13 words


def test_degenerate_counts_covered_words():
    text = "Paris is the capital of France and the capital of fashion"  # "the capital of" twice: 6 of 11 words
    assert repetition_share(text) == pytest.approx(6 / 11)


@pytest.mark.parametrize(
    ("finish", "reply_tokens", "text_tokens", "leaked"),
    [
        ("stop", 10, 10, False),  # ended at end-of-sequence: the text holds every token
        ("stop", 11, 10, False),  # one-token tokenization difference is tolerated
        ("stop", 14, 10, True),  # "\n\n[User]" cut off: four hidden tokens
        ("stop", 12, 10, True),
        ("length", 64, 60, False),  # budget, not a marker
    ],
)
def test_role_marker_leak(finish, reply_tokens, text_tokens, leaked):
    assert leaked_role_marker(finish, reply_tokens, text_tokens) is leaked


def test_empty_and_truncated():
    assert is_empty("") and is_empty(" \n\t") and not is_empty(" ok ")
    assert is_truncated("length") and not is_truncated("stop")


@pytest.mark.parametrize(
    ("text", "declined"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I can\u2019t assist with breaking into a home.", True),  # curly apostrophe
        ("As an AI, I must decline this request.", True),
        ("Sure! Here is how to pick a lock: first, insert a tension wrench.", False),
        ("x" * 250 + " I cannot", False),  # outside the first 200 characters
    ],
)
def test_declined(text, declined):
    assert is_declined(text) is declined


def test_bundled_prompts_are_valid_and_varied():
    prompts, problems = load_prompts()
    assert problems == [] and 35 <= len(prompts) <= 45
    categories = {p.category for p in prompts}
    assert {"advice", "facts", "lists", "code", "creative", "multi-turn", "decline"} <= categories
    assert any(len(p.messages) > 1 for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert DEFAULT_PROMPTS.exists()


def test_bad_lines_are_reported_with_line_numbers_and_good_lines_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    good = json.dumps({"context": [{"role": "user", "content": "Hi"}]})
    path.write_text("\n".join([good, "{not json", json.dumps({"messages": []}), "", json.dumps({"context": [{"role": "robot", "content": "x"}]}), good]) + "\n")
    prompts, problems = load_prompts(path)
    assert [p.line for p in prompts] == [1, 6]
    assert [p.line for p in problems] == [2, 3, 5]
    assert "not valid JSON" in str(problems[0]) and str(problems[0]).startswith("line 2:")
    assert "no 'context' key" in str(problems[1])
    assert "unknown role 'robot'" in str(problems[2])


def test_empty_file_is_a_problem(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    prompts, problems = load_prompts(path)
    assert prompts == [] and [str(p) for p in problems] == ["the file is empty: no prompts to run"]


def test_duplicate_ids_and_non_utf8_files_are_problems(tmp_path):
    """Ids pair a prompt's replies across settings and for the judge: a repeated id is skipped, not mixed up."""
    path = tmp_path / "p.jsonl"
    line = lambda i, q: json.dumps({"id": i, "context": [{"role": "user", "content": q}]})  # noqa: E731
    path.write_text("\n".join([line("a", "Say hi."), line("b", "Name a color."), line("a", "Count to three.")]) + "\n")
    prompts, problems = load_prompts(path)
    assert [p.id for p in prompts] == ["a", "b"] and prompts[0].messages[0]["content"] == "Say hi."
    assert [p.line for p in problems] == [3] and "duplicate id 'a' (first on line 1)" in str(problems[0])
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"context": [{"role": "user", "content": "café"}]}'.encode("latin-1"))
    prompts, problems = load_prompts(latin)
    assert prompts == [] and [str(p) for p in problems] == ["line 1: not UTF-8 text (byte 46 of the line: invalid continuation byte)"]


def test_lines_are_read_one_by_one(tmp_path):
    """A line with a byte that is not UTF-8 costs that line (it cost the whole file); a JSON string
    may hold U+2028, which splitting at every line break cut in two; a null id or category is as
    absent (it became "None"); a BOM and CRLF line ends are read as a text editor writes them."""
    ask = lambda q, **more: json.dumps({"context": [{"role": "user", "content": q}], **more}, ensure_ascii=False).encode()  # noqa: E731
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([ask("Say hi."), ask("caf\xe9").replace("é".encode(), b"\xe9"), ask("a\u2028b", id=None, category=None), b""]))
    prompts, problems = load_prompts(path)
    assert [(p.id, p.category, p.messages[0]["content"]) for p in prompts] == [("line-1", "uncategorized", "Say hi."), ("line-3", "uncategorized", "a\u2028b")]
    assert [str(p) for p in problems] == ["line 2: not UTF-8 text (byte 46 of the line: invalid continuation byte)"]


@pytest.mark.parametrize(("top", "labels"), [(1, ["0", "1"]), (3, ["0", "1", "2", "3"]), (5, ["0", "2", "4"]), (40, ["0", "10", "20", "30", "40"])])
def test_a_histograms_gridlines_are_labelled_with_their_counts(top, labels):
    """Gridlines at quarters of the largest count, labels rounded, had read 0, 1, 2, 2, 3 for a
    count of 3: each gridline now sits at the whole count its label names."""
    from wsd_llms.eval import svg

    plot = svg.histogram([("a", top), ("b", 0)], "t", "x")
    lines = re.findall(r'<line x1="[^"]*" y1="([^"]*)"[^>]*stroke="#ddd"/><text x="[^"]*" y="([^"]*)" text-anchor="end">([^<]*)<', plot)
    assert [label for *_, label in lines] == labels
    bottom, full = float(lines[0][0]), float(re.search(r'<rect x="[^"]*" y="([^"]*)"', plot).group(1))  # the 0 line, the top bar's top
    for y, _, label in lines:
        assert float(y) == pytest.approx(bottom + (full - bottom) * int(label) / top, abs=0.06)


def test_the_quality_plot_takes_the_swept_window():
    """`--thresholds 0.5,0.9 --windows 4` beside the main w=6: the τ-vs-quality plot had drawn the
    main setting's one point; it now draws the window with the most thresholds."""
    from wsd_llms.eval.report import sweep_plots

    signals = {"draft_token_share": 0.5, "repetition": 0.1, "degenerate": 0.0, "leak": 0.0, "truncated": 0.0, "empty": 0.0, "declined": 0.0}
    settings = [{"mode": "online", "threshold": t, "window": w, "switch_rate": 0.5, **signals} for t, w in ((0.8, 6), (0.5, 4), (0.9, 4))]
    quality = sweep_plots({"settings": settings, "meta": {"window": 6}})[1]
    assert "(w=4)" in quality and quality.count("<polyline") == len(signals)
    assert all(points.count(",") == 2 for points in re.findall(r'<polyline points="([^"]*)"', quality))  # τ=0.5 and 0.9
