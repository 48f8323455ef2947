"""LangChain integration of wsd-llms: `WSDChatModel`, Weak-to-Strong Decoding as a chat model."""

from langchain_wsd.chat_models import WSDChatModel

__all__ = ["WSDChatModel"]
