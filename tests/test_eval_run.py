"""A small `wsd-llms eval` run end to end: records, summaries, the HTML/JSON/Markdown report, bad input."""

import json
import statistics
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from wsd_llms.cli import main
from wsd_llms.eval import Setting, evaluate, load_prompts
from wsd_llms.eval.report import write_all
from wsd_llms.eval.runner import run_settings

VOID = {"meta", "br", "hr", "img", "input", "link"}


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _prompt(text, category="facts", **extra):
    return json.dumps({"context": [{"role": "user", "content": text}], "category": category, **extra})


class _Balanced(HTMLParser):
    """Checks that every opened element is closed in order (a well-formed document)."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, shared_runtime):
    """One run over 3 good prompts (and a bad line) at 2 settings, shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("small_run")
    path = _write(tmp_path / "p.jsonl", [
        _prompt("What is the capital of France?"),
        "{oops",
        _prompt("Write a list of fruits.", "lists"),
        _prompt("How do I hurt someone?", "decline", id="bad-1"),
    ])
    prompts, problems = load_prompts(path)
    main_setting = Setting("online", 0.5, 2)
    settings = [Setting("base"), main_setting]
    report = evaluate(
        shared_runtime, prompts, problems, settings, main_setting,
        max_tokens=24, prompts_file=str(path), records_path=tmp_path / "records.jsonl",
    )
    return report, write_all(report, tmp_path / "out"), tmp_path


def test_html_report_is_self_contained_with_plots(small_run):
    report, paths, _ = small_run
    html = paths["html"].read_text(encoding="utf-8")
    parser = _Balanced()
    parser.feed(html)
    assert parser.errors == [] and parser.stack == []
    svgs = [html[i : html.index("</svg>", i) + 6] for i in range(len(html)) if html.startswith("<svg", i)]
    assert len(svgs) == 3  # switch-point histogram, τ vs switch rate, τ vs quality
    for fragment in svgs:
        ET.fromstring(fragment)  # each plot is well-formed SVG
    assert "Switch point, wsd τ=0.5 w=2" in html
    assert "src=" not in html and "<link" not in html  # nothing loaded from elsewhere
    assert "line 2: not valid JSON" in html
    assert "degenerate" in html and "role leak" in html
    # Each plot is also written as its own .svg file, the same SVG as in the page.
    assert [paths[name].read_text(encoding="utf-8") for name in ("switch", "sweep_switch_rate", "sweep_quality")] == svgs


def test_json_numbers_match_the_records(small_run):
    _, paths, tmp_path = small_run
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    records = data["records"]
    assert len(records) == 2 * 3 and all(r["error"] is None for r in records)
    streamed = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, streamed)) == sorted(map(json.dumps, records))  # nothing lost on the way
    assert data["problems"] == ["line 2: not valid JSON (Expecting property name enclosed in double quotes, column 2)"]
    for summary in data["settings"]:
        mine = [r for r in records if r["setting"] == summary["setting"]]
        assert summary["prompts"] == len(mine) == 3
        reply = sum(r["reply_tokens"] for r in mine)
        assert summary["reply_tokens"] == reply
        assert summary["draft_token_share"] == pytest.approx(sum(r["draft_written_tokens"] for r in mine) / reply)
        assert summary["base_token_share"] == pytest.approx(sum(r["base_written_tokens"] for r in mine) / reply)
        assert summary["repetition"] == pytest.approx(statistics.fmean(r["repetition"] for r in mine))
        assert summary["truncated"] == pytest.approx(sum(r["finish_reason"] == "length" for r in mine) / 3)
        assert summary["leak"] == pytest.approx(sum(r["leak"] for r in mine) / 3)
        assert summary["decline_prompts"] == 1
        assert summary["declined"] == float([r for r in mine if r["prompt_id"] == "bad-1"][0]["declined"])
        assert summary["latency_p50_s"] == sorted(r["total_s"] for r in mine)[1]
        if summary["mode"] == "online":
            points = [r["switch_point"] for r in mine if r["switch_point"] is not None]
            assert summary["switch_points"] == sorted(points)
            assert summary["no_switch"] == pytest.approx(1 - len(points) / 3)
        else:
            assert summary["switch_rate"] is None and summary["draft_token_share"] == 0
    md = paths["md"].read_text(encoding="utf-8")
    assert md.count("| wsd τ=0.5 w=2 |") == 1 and "## Definitions" in md


def test_a_failing_request_becomes_a_record(tmp_path, shared_runtime):
    path = _write(tmp_path / "p.jsonl", [_prompt("Hello there! " * 400), _prompt("What is two plus two?")])
    prompts, problems = load_prompts(path)
    main_setting = Setting("online", 0.8, 6)
    report = evaluate(shared_runtime, prompts, problems, [main_setting], main_setting, max_tokens=8, prompts_file=str(path))
    first, second = report["records"]
    assert "PromptTooLongError" in first["error"] and second["error"] is None
    assert report["settings"][0]["errors"] == 1


def test_cli_says_which_requests_failed(tmp_path, capsys, shared_runtime, monkeypatch):
    """Exit status 1 for failed requests came with nothing on stderr to say which or why."""
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: shared_runtime)
    path = _write(tmp_path / "p.jsonl", [_prompt("What is two plus two?", id="short"), _prompt("Hello there! " * 400, id="long")])
    assert main(["eval", "--prompts", str(path), "--max-tokens", "4", "--window", "2", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "error: 3 request(s) failed; the first: " in err and "on prompt long: " in err and "context window" in err


@pytest.mark.embedded
def test_cli_with_judge_on_the_embedded_pair(tmp_path, embedded):
    path = _write(tmp_path / "p.jsonl", [_prompt("What is the capital of France?"), _prompt("Name three colours.", "lists")])
    rc = main(["eval", "--prompts", str(path), "--max-tokens", "8", "--judge", "embedded:smollm2-135m-instruct", "--out", str(tmp_path / "o")])
    assert rc == 0
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [s["setting"] for s in data["settings"]] == ["base-only", "draft-only", "wsd τ=0.8 w=6"]
    judge = data["judge"]
    assert judge["pairs"] == 2 and judge["wsd_wins"] + judge["base_wins"] + judge["ties"] == 2
    assert "weak" in judge["caveat"]
    assert "Judge" in (tmp_path / "o" / "report.html").read_text()


@pytest.mark.parametrize("prompts", ["empty.jsonl", "missing.jsonl", "bad.jsonl", "."])
def test_cli_with_no_prompts_to_run_writes_nothing(tmp_path, capsys, prompts):
    """An empty, missing (a typo), all-bad or unreadable prompt file is a usage error that leaves a
    report already in --out as it was (it had been overwritten with an empty one)."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "records.jsonl").write_text("earlier\n")
    assert main(["eval", "--prompts", str(tmp_path / prompts), "--out", str(out)]) == 2
    assert "no prompts to run; nothing was written" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["records.jsonl"] and (out / "records.jsonl").read_text() == "earlier\n"


def test_cli_a_model_that_cannot_load_leaves_the_last_run_and_says_why(tmp_path, capsys):
    """A model that cannot load (a config huggingface_hub refuses) is an error line and exit 1 after
    the models load, before records.jsonl is opened (it was emptied first, and a traceback followed)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": "x"}')
    path = _write(tmp_path / "p.jsonl", [_prompt("What is 2 + 2?")])
    out = tmp_path / "o"
    out.mkdir()
    (out / "records.jsonl").write_text("earlier\n")
    assert main(["eval", "--prompts", str(path), "--draft", str(broken), "--base", str(broken), "--device", "cpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: could not load the draft model '{broken}': StrictDataclassFieldValidationError" in err and "Traceback" not in err
    assert (out / "records.jsonl").read_text() == "earlier\n"


def test_cli_a_report_it_cannot_write_is_an_error_line(tmp_path, capsys, shared_runtime, monkeypatch):
    """The replies are in records.jsonl; the report's own files failing to write is said, not a traceback."""
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: shared_runtime)
    path = _write(tmp_path / "p.jsonl", [_prompt("What is 2 + 2?")])
    (tmp_path / "o" / "report.json").mkdir(parents=True)  # a directory where the report's file goes
    assert main(["eval", "--prompts", str(path), "--max-tokens", "4", "--window", "2", "--out", str(tmp_path / "o")]) == 1
    assert f"error: cannot write the report to {tmp_path / 'o'}" in capsys.readouterr().err
    assert len((tmp_path / "o" / "records.jsonl").read_text().splitlines()) == 3  # base-only, draft-only, WSD


def test_cli_refuses_a_judge_without_a_chat_template_before_the_run(tmp_path, capsys):
    """It failed with a traceback after every reply was written, and no report."""
    path = _write(tmp_path / "p.jsonl", [_prompt("What is 2 + 2?")])
    assert main(["eval", "--prompts", str(path), "--max-tokens", "4", "--judge", "embedded:gemma-3-270m", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "the judge model 'embedded:gemma-3-270m' has no chat template" in err and not (tmp_path / "o" / "records.jsonl").exists()


@pytest.mark.parametrize("judge", ["embedded:nope", "/nonexistent/judge"])
def test_cli_a_judge_that_cannot_exist_fails_before_the_models_load(tmp_path, capsys, monkeypatch, judge):
    """An unknown embedded name or a missing path was found only after the draft and base had
    loaded (12-16 s); it is told at once, as a bad --draft is."""
    from wsd_llms.runtime import WSDRuntime

    monkeypatch.setattr(WSDRuntime, "load", lambda self: pytest.fail("the models loaded"))
    path = _write(tmp_path / "p.jsonl", [_prompt("What is 2 + 2?")])
    assert main(["eval", "--prompts", str(path), "--judge", judge, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "error: --judge: " in err and repr(judge) in err and "Traceback" not in err


def test_cli_prints_problems_as_text_not_markup(tmp_path, capsys):
    """A prompt file's text in a problem (a duplicate id) is printed as it is, not read as Rich markup."""
    path = _write(tmp_path / "p.jsonl", [_prompt("2 + 2?", id="[/x]"), _prompt("3 + 3?", id="[/x]")])
    assert main(["eval", "--prompts", str(path), "--max-tokens", "4", "--window", "2", "--out", str(tmp_path / "o")]) == 1  # a skipped line fails the run
    assert "duplicate id '[/x]'" in capsys.readouterr().err


def test_cli_rejects_bad_threshold(tmp_path, capsys):
    assert main(["eval", "--threshold", "2", "--out", str(tmp_path / "o")]) == 2
    assert "error: --threshold: invalid switch_threshold=2.0" in capsys.readouterr().err
    assert main(["eval", "--sweep", "--thresholds", "0.5,2", "--out", str(tmp_path / "o")]) == 2
    assert "error: --thresholds: invalid switch_threshold=2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--thresholds", "a,b"])
    assert exit_.value.code == 2 and "argument --thresholds: 'a,b' is not a comma-separated list of numbers" in capsys.readouterr().err
    for option, kind in (("--thresholds", "numbers"), ("--windows", "integers")):  # an empty list swept nothing, silently
        with pytest.raises(SystemExit) as exit_:
            main(["eval", "--sweep", option, " , "])
        assert exit_.value.code == 2 and f"argument {option}: ' , ' is not a comma-separated list of {kind}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_reports_bad_models_and_outputs_without_a_traceback(tmp_path, capsys):
    assert main(["eval", "--dtype", "int8", "--out", str(tmp_path / "o")]) == 2
    assert "error: --dtype: invalid dtype='int8'" in capsys.readouterr().err.replace("\n", "")
    taken = tmp_path / "afile"
    taken.write_text("")
    assert main(["eval", "--out", str(taken)]) == 2
    assert f"cannot write the report to --out {taken}" in capsys.readouterr().err


def test_settings_that_differ_have_names_that_differ():
    """The report keys its numbers on names: two thresholds that print alike at 6 digits had one name, and their records merged."""
    assert Setting("online", 0.8, 6).name == "wsd τ=0.8 w=6" and Setting("online", 1.0, 6).name == "wsd τ=1 w=6"
    assert Setting("online", 0.8000001, 6).name != Setting("online", 0.8, 6).name


def test_a_base_only_reply_after_a_forced_start_is_all_the_bases(shared_runtime):
    """A conversation that ends with the assistant's turn: base-only's share of draft tokens is 0
    (usage counts the forced start as the base's, the model that writes the reply)."""
    from wsd_llms.eval.prompts import EvalPrompt
    from wsd_llms.eval.runner import make_record

    messages = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two"}]
    result = shared_runtime.generate(messages, mode="base", max_tokens=6)
    assert result.usage.reply_tokens == result.usage.base_tokens  # the forced start is in both
    record = make_record(Setting("base"), EvalPrompt("p", "facts", messages, 1), result, lambda text: 0)
    assert (record["draft_written_tokens"], record["base_written_tokens"]) == (0, result.usage.reply_tokens)


def test_cli_a_load_that_fails_past_the_loader_is_an_error_line(tmp_path, capsys, monkeypatch):
    """A failure past from_pretrained (out of memory moving the weights, say) is a ModelLoadError
    from WSDRuntime.load, so eval says it in a line as chat does (it was a traceback)."""
    from wsd_llms import WSDRuntime

    def out_of_memory(self, role, source, revision):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(WSDRuntime, "_load", out_of_memory)
    path = _write(tmp_path / "p.jsonl", [_prompt("What is 2 + 2?")])
    out = tmp_path / "o"
    out.mkdir()
    (out / "records.jsonl").write_text("earlier\n")
    assert main(["eval", "--prompts", str(path), "--draft", str(tmp_path / "unique"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: the models could not load: RuntimeError: CUDA out of memory" in err and "Traceback" not in err
    assert (out / "records.jsonl").read_text() == "earlier\n"


def test_cli_a_load_that_fails_leaves_no_out_directory_it_made(tmp_path, capsys, monkeypatch):
    """--out is made before the models load (an unwritable one fails at once); a run that then
    fails to load took it back only if it was there before: it left empty directories behind."""
    from wsd_llms import WSDRuntime

    def out_of_memory(self, role, source, revision):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(WSDRuntime, "_load", out_of_memory)
    path = _write(tmp_path / "p.jsonl", [_prompt("What is 2 + 2?")])
    (tmp_path / "kept").mkdir()
    for out in ("a/b", "x/../a/b"):  # mkdir makes x too
        assert main(["eval", "--prompts", str(path), "--draft", str(tmp_path / "unique"), "--out", str(tmp_path / "kept" / out)]) == 1
        assert "error: the models could not load" in capsys.readouterr().err
        assert list((tmp_path / "kept").iterdir()) == []
    # one that cannot be made is said at once, and what was made on the way is taken back
    assert main(["eval", "--prompts", str(path), "--out", str(tmp_path / "kept" / "new" / ("x" * 300))]) == 2
    assert "cannot write the report to --out" in capsys.readouterr().err
    assert list((tmp_path / "kept").iterdir()) == []


def test_an_interrupted_run_ends_the_requests_in_flight(tmp_path, shared_runtime, monkeypatch):
    """Ctrl-C, or a records file that cannot be written, had dropped only the requests not yet
    started: the process printed its error, then waited for those in flight to write their whole
    replies. They are ended too. One short reply is the first record; three long ones are in flight."""
    path = _write(tmp_path / "p.jsonl", [_prompt("short"), _prompt("long one"), _prompt("long two"), _prompt("long three")])
    prompts, _ = load_prompts(path)
    stream = shared_runtime.stream

    def budgets(messages, **params):
        return stream(messages, **{**params, "max_tokens": 2 if messages[0]["content"] == "short" else 400})

    monkeypatch.setattr(shared_runtime, "stream", budgets)

    def full_disk(record):
        raise OSError(28, "No space left on device")

    before = shared_runtime.stats()
    with pytest.raises(OSError):
        run_settings(shared_runtime, prompts, [Setting("base")], max_tokens=400, concurrency=4, on_record=full_disk)
    deadline = time.monotonic() + 20
    while shared_runtime.stats().running and time.monotonic() < deadline:
        time.sleep(0.05)
    after = shared_runtime.stats()
    assert after.running == 0 and after.cancelled - before.cancelled == 3
    assert after.finished - before.finished == 1


def test_cli_a_records_file_it_cannot_write_is_an_error_line(tmp_path, capsys, shared_runtime, monkeypatch):
    """It was a traceback (IsADirectoryError, PermissionError, a full disk) after the models loaded."""
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: shared_runtime)
    path = _write(tmp_path / "p.jsonl", [_prompt("What is 2 + 2?")])
    (tmp_path / "o" / "records.jsonl").mkdir(parents=True)
    assert main(["eval", "--prompts", str(path), "--max-tokens", "4", "--window", "2", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write the replies to {tmp_path / 'o' / 'records.jsonl'}: Is a directory" in err and "Traceback" not in err


def test_cli_a_sweep_grid_given_is_a_sweep(tmp_path, capsys):
    """--thresholds or --windows without --sweep had been ignored, unchecked: --thresholds 1.5 reached
    the model load, and a valid grid ran no sweep. Either one now asks for the sweep."""
    assert main(["eval", "--thresholds", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "error: --thresholds: invalid switch_threshold=1.5" in capsys.readouterr().err
    assert main(["eval", "--windows", "4,0", "--out", str(tmp_path / "o")]) == 2
    assert "error: --windows: invalid switch_window=0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
