"""LangChain's own standard test suites for WSDChatModel, on the embedded default models."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_wsd import WSDChatModel


class _WSDFlags:
    """Features WSDChatModel does not have; each is turned off with the suite's own flag."""

    @property
    def chat_model_class(self) -> type[WSDChatModel]:
        return WSDChatModel

    # Tool calling and structured output need constrained decoding (issue 4), not implemented yet.
    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    # Text-only models: no image, audio, PDF or video inputs.
    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    # A per-call `model` cannot switch the loaded models (it must name the configured base model);
    # `ls_model_name` still reports a per-call `model` for tracing.
    @property
    def supports_model_override(self) -> bool:
        return False


class TestWSDChatModelUnit(_WSDFlags, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {}


@pytest.mark.embedded
class TestWSDChatModelIntegration(_WSDFlags, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"max_tokens": 24, "max_draft_tokens": 32}
