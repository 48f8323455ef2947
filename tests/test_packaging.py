"""What the installed packages tell a user's tools."""

from importlib.resources import files

import pytest


@pytest.mark.parametrize("package", ["wsd_llms", "langchain_wsd", "llama_index.llms.wsd"])
def test_each_package_says_it_is_typed(package: str) -> None:
    """PEP 561's marker, which mypy and pyright need before they read a package's own hints (without
    it, WSDChatModel and WSDLLM were Any to them), as langchain-core and llama-index-core ship it."""
    assert (files(package) / "py.typed").is_file()
