"""LlamaIndex integration of wsd-llms: `from llama_index.llms.wsd import WSDLLM`."""

from wsd_llms.errors import needs_extra

with needs_extra("llama_index.core", "llama-index"):
    from llama_index.llms.wsd.base import WSDLLM

__all__ = ["WSDLLM"]
