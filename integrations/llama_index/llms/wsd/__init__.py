"""LlamaIndex integration of wsd-llms: `from llama_index.llms.wsd import WSDLLM`."""

from llama_index.llms.wsd.base import WSDLLM

__all__ = ["WSDLLM"]
