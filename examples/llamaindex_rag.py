"""LlamaIndex RAG on WSD: a VectorStoreIndex over the documents in examples/data/llamaindex_docs.

Runs fully offline on the embedded default models: the embedding is a small deterministic
bag-of-words hash written here (no download), and `Settings.llm` is a WSDLLM. It answers one
question through a streaming query engine, then through a `condense_plus_context` chat engine.

    python examples/llamaindex_rag.py ["your question"]
"""

from __future__ import annotations

import math
import re
import sys
import zlib
from pathlib import Path

from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.embeddings import BaseEmbedding

from llama_index.llms.wsd import WSDLLM

DOCS = Path(__file__).parent / "data" / "llamaindex_docs"
QUESTION = "What is the name of the mascot of the Quillmere Lantern Festival?"
STOPWORDS = frozenset("a an and at by every in is it of on the to was what which who with its".split())


class HashEmbedding(BaseEmbedding):
    """Bag of words hashed into `dim` buckets, L2-normalised: deterministic, local, good enough to retrieve."""

    dim: int = 512

    @classmethod
    def class_name(cls) -> str:
        return "HashEmbedding"

    def _embed(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            if word not in STOPWORDS:
                vector[zlib.crc32(word.encode()) % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)


def main(question: str = QUESTION) -> None:
    Settings.embed_model = HashEmbedding()
    Settings.llm = WSDLLM(max_tokens=64)
    index = VectorStoreIndex.from_documents(SimpleDirectoryReader(str(DOCS)).load_data())

    print(f"Q: {question}\n\n[streaming query engine]")
    query_engine = index.as_query_engine(streaming=True, similarity_top_k=1)
    streaming = query_engine.query(question)
    print(f"(retrieved: {streaming.source_nodes[0].node.metadata['file_name']})")
    for token in streaming.response_gen:
        print(token, end="", flush=True)

    print("\n\n[condense_plus_context chat engine]")
    chat_engine = index.as_chat_engine(chat_mode="condense_plus_context", similarity_top_k=1)
    for token in chat_engine.stream_chat(question).response_gen:
        print(token, end="", flush=True)
    print()


if __name__ == "__main__":
    main(*sys.argv[1:2])
