"""LangChain integration of wsd-llms: `WSDChatModel`, Weak-to-Strong Decoding as a chat model."""

from wsd_llms.errors import needs_extra

with needs_extra("langchain_core", "langchain"):
    from langchain_wsd.chat_models import WSDChatModel

__all__ = ["WSDChatModel"]
