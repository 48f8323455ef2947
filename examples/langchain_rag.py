"""Retrieval-augmented answers with WSD in a LangChain chain: retriever | prompt | WSDChatModel | StrOutputParser.

The documents ship with the example (examples/data/langchain_docs); they are embedded with a small
local hashing embedding, so nothing is downloaded. The answer streams to the terminal.

    python examples/langchain_rag.py "When does the library open on Saturdays?"
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from langchain_wsd import WSDChatModel

DOCS = Path(__file__).parent / "data" / "langchain_docs"
PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question in one or two sentences, using only this context:\n\n{context}"),
        ("human", "{question}"),
    ]
)


class HashingEmbeddings(Embeddings):
    """Bag of words hashed into a fixed number of buckets, L2-normalised: deterministic and local."""

    def __init__(self, size: int = 512) -> None:
        self.size = size

    def _embed(self, text: str) -> list[float]:
        vector = [0.0] * self.size
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            vector[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % self.size] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._embed(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._embed(text)


def load_documents() -> list[Document]:
    return [Document(page_content=path.read_text(), metadata={"source": path.name}) for path in sorted(DOCS.glob("*.md"))]


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(doc.page_content.strip() for doc in docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="When does the library open on Saturdays?")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    store = InMemoryVectorStore.from_documents(load_documents(), HashingEmbeddings())
    retriever = store.as_retriever(search_kwargs={"k": 1})
    model = WSDChatModel(max_tokens=args.max_tokens)
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | model | StrOutputParser()

    sources = [doc.metadata["source"] for doc in retriever.invoke(args.question)]
    print(f"Question: {args.question}\nSources: {', '.join(sources)}\nAnswer: ", end="", flush=True)
    for piece in chain.stream(args.question):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
