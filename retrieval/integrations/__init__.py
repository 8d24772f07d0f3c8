"""Framework integrations (the ``[integrations]`` extra: ``langchain-core``, ``llama-index-core``).

- :mod:`retrieval.integrations.langchain`: ``RetrievalVectorStore``, a LangChain ``VectorStore``.
- :mod:`retrieval.integrations.llamaindex`: ``RetrievalVectorStore``, a LlamaIndex
  ``BasePydanticVectorStore``, and ``MiniLMEmbedding``, a LlamaIndex embedding model.
- :mod:`retrieval.integrations.embeddings`: ``MiniLMEmbeddings``, LangChain embeddings over the
  all-MiniLM-L6-v2 weights shipped with the service (offline).

Each submodule imports its framework; importing this package imports neither. Usage and examples:
docs/integrations.md.
"""

from retrieval.integrations._common import IdCollision, UnsupportedFilter, point_id

__all__ = ["IdCollision", "UnsupportedFilter", "point_id"]
