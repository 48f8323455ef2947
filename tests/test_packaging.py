"""What the installed packages tell a user's tools."""

from importlib.resources import files
from pathlib import Path

import pytest


@pytest.mark.parametrize("package", ["wsd_llms", "langchain_wsd", "llama_index.llms.wsd"])
def test_each_package_says_it_is_typed(package: str) -> None:
    """PEP 561's marker, which mypy and pyright need before they read a package's own hints (without
    it, WSDChatModel and WSDLLM were Any to them), as langchain-core and llama-index-core ship it."""
    assert (files(package) / "py.typed").is_file()


def test_the_package_and_the_readmes_code_type_check(tmp_path: Path) -> None:
    """With py.typed, users' type checkers read our hints: the adapters' constructors had come out
    of a create_model class that checkers cannot read (pyright refused every argument, mypy took any)
    and with Field defaults given positionally (mypy: 'Missing named argument "streaming"' for every
    WSDChatModel(...)); torch.device, a Path and a framework's tools were refused where they are taken.
    The packages' own code is checked too, every function typed (pyproject's [tool.mypy]; one run:
    checking the usage reads all of it anyway)."""
    import os
    import subprocess
    import sys

    usage = Path(__file__).with_name("typed_usage.py")
    packages = [arg for package in ("wsd_llms", "langchain_wsd", "llama_index.llms.wsd") for arg in ("-p", package)]
    done = subprocess.run(  # mypy takes files or modules, not both: the usage file as a module on MYPYPATH
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "--no-error-summary", "-m", usage.stem, *packages],
        capture_output=True, text=True, timeout=300, cwd=usage.parent.parent, env={**os.environ, "MYPYPATH": str(usage.parent)},
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("adapter", "framework", "extra"),
    [("langchain_wsd", "langchain_core", "langchain"), ("llama_index.llms.wsd", "llama_index.core", "llama-index")],
)
def test_an_adapter_without_its_framework_names_the_extra(adapter: str, framework: str, extra: str) -> None:
    """Imported where its framework is not installed, an adapter says which extra brings it (it
    said only "No module named 'langchain_core'"); the framework is hidden as a missing one fails."""
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class Missing(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name == {framework!r} or name.startswith({framework + '.'!r}):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        f"import {adapter}\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"ModuleNotFoundError: No module named {framework!r}; install it with: pip install 'wsd-llms[{extra}]'", done.stderr


def test_the_lowest_versions_pinned_are_the_floors_pyproject_declares() -> None:
    """`make test-lowest` runs the suite on constraints-lowest.txt; it proves the floors only while
    its pins are the floors. The floors had drifted far below what worked (transformers>=4.56, when
    5.17 still converted the models wrong)."""
    import re
    import tomllib

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [*project["dependencies"], *(r for extra in ("langchain", "llama-index", "structured") for r in extras[extra])]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\w.]+)", r).groups() for r in declared)  # type: ignore[union-attr]
    pins = dict(line.split("==") for line in (root / "constraints-lowest.txt").read_text().splitlines() if line and not line.startswith("#"))

    def release(version: str) -> tuple[int, ...]:
        parts = tuple(int(p) for p in version.split("."))
        return parts + (0,) * (3 - len(parts))

    assert set(pins) == set(floors)
    assert {name: release(pins[name]) for name in floors if name != "torch"} == {name: release(v) for name, v in floors.items() if name != "torch"}
    assert release(pins["torch"]) >= release(floors["torch"])
