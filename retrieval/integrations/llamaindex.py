"""A LlamaIndex vector store over a collection of the service, and the shipped MiniLM as a LlamaIndex
embedding model.

    from llama_index.core import StorageContext, VectorStoreIndex
    from retrieval.integrations.llamaindex import MiniLMEmbedding, RetrievalVectorStore

    store = RetrievalVectorStore(collection_name="notes", address="127.0.0.1:50051")
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                             embed_model=MiniLMEmbedding())

Storage: one point per node, its payload LlamaIndex's own metadata dict
(``node_to_metadata_dict``: the node's metadata keys at the top level, the whole node as JSON under
``_node_content``, ``doc_id`` / ``ref_doc_id`` / ``document_id``) plus the node id under ``_node_id``.
Node ids map to point ids as in :mod:`retrieval.integrations._common` (63 bits of blake2b,
collisions detected and refused). The collection is created on the first :meth:`add` with the
dimension of the first embedding, ``metric`` (cosine by default) and keyword payload indexes on
``_node_id`` and ``ref_doc_id``. ``stores_text`` is True: query results carry the nodes.

Similarities (``VectorStoreQueryResult.similarities``, higher is nearer): cosine ``1 - d`` = cos;
ip ``1 - d`` = <q, x>; l2 ``1 - sqrt(d) / sqrt(2)``, ``d`` the server's distance.

Filters (``MetadataFilters``, nestable, conditions ``and`` / ``or`` / ``not`` = none holds): operators
``==``, ``!=``, ``>``, ``>=``, ``<``, ``<=`` (numbers), ``in``, ``nin``, ``any`` (a list field holds one
of), ``all`` (holds each of), ``contains`` (a list field holds the value). ``!=`` and ``nin`` also match
nodes without the key (as LlamaIndex's own simple store does). ``text_match``,
``text_match_insensitive`` and ``is_empty`` raise :class:`UnsupportedFilter` (a ``ValueError``): the
service filters by equality, membership and numeric ranges only. ``VectorStoreQuery.doc_ids`` /
``node_ids`` restrict the search to those ref doc ids / node ids (empty lists: no restriction, as
LlamaIndex's retriever means them).

Query modes: ``default`` and ``mmr`` (``mmr_threshold`` is LlamaIndex's lambda, 0.5 by default);
others raise ``ValueError``.

Thread-safety: as :class:`retrieval.integrations._common.StoreCollection`; async methods use one
:class:`retrieval.AsyncClient` per event loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.embeddings import BaseEmbedding
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from retrieval import errors
from retrieval.integrations._common import (
    IdCollision,
    StoreCollection,
    UnsupportedFilter,
    and_filters,
    any_of,
    check_key,
    number,
    relevance,
    scalar,
    values,
)

__all__ = ["IdCollision", "MiniLMEmbedding", "RetrievalVectorStore", "UnsupportedFilter", "translate_filters"]

NODE_ID_KEY = "_node_id"
REF_DOC_KEY = "ref_doc_id"
#: every point of a store (each holds its node id)
_ALL = {"must": [{"key": NODE_ID_KEY, "is_null": False}]}
_SUPPORTED = "==, !=, >, >=, <, <=, in, nin, any, all, contains"


def translate_filters(filters: MetadataFilters | None) -> dict | None:
    """LlamaIndex ``MetadataFilters`` in the service's filter form (keys at the payload's top level);
    None for no filter. Raises :class:`UnsupportedFilter`."""
    if filters is None or not filters.filters:
        return None
    return _filters(filters)


def _filters(fs: MetadataFilters) -> dict:
    clauses = [_filters(f) if isinstance(f, MetadataFilters) else _filter(f) for f in fs.filters]
    cond = fs.condition or FilterCondition.AND
    if cond == FilterCondition.AND:
        return {"must": clauses}
    if cond == FilterCondition.OR:
        return {"should": clauses} if clauses else {"must": []}
    if cond == FilterCondition.NOT:
        return {"must_not": clauses}
    raise UnsupportedFilter(f"unsupported filter condition {cond!r}; supported: and, or, not")


def _filter(f: MetadataFilter) -> dict:
    key = check_key(f.key)
    op, v = f.operator, f.value
    name = getattr(op, "value", op)
    if op == FilterOperator.EQ:
        return {"key": key, "is_null": True} if v is None else {"key": key, "equals": scalar(v, key, name)}
    if op == FilterOperator.NE:
        eq = {"key": key, "is_null": True} if v is None else {"key": key, "equals": scalar(v, key, name)}
        return {"must_not": [eq]}
    if op in (FilterOperator.GT, FilterOperator.GTE, FilterOperator.LT, FilterOperator.LTE):
        bound = {FilterOperator.GT: "gt", FilterOperator.GTE: "gte", FilterOperator.LT: "lt",
                 FilterOperator.LTE: "lte"}[op]
        return {"key": key, "range": {bound: number(v, key, name)}}
    if op in (FilterOperator.IN, FilterOperator.ANY):
        return any_of(key, values(v, key, name))
    if op == FilterOperator.NIN:
        vals = values(v, key, name)
        return {"must_not": [any_of(key, vals)]} if vals else {"must": []}
    if op == FilterOperator.ALL:
        return {"must": [{"key": key, "equals": x} for x in values(v, key, name)]}
    if op == FilterOperator.CONTAINS:
        return {"key": key, "equals": scalar(v, key, name)}
    raise UnsupportedFilter(f"unsupported filter operator {name!r} on {key!r}; supported: {_SUPPORTED}")


class RetrievalVectorStore(BasePydanticVectorStore):
    """A LlamaIndex vector store over collection ``collection_name`` of the server at ``address``.

    ``client`` / ``async_client``: existing :class:`retrieval.Client` / :class:`retrieval.AsyncClient`
    (else made from ``address`` and ``client_options``, the keyword arguments of ``Client``).
    ``metric`` / ``index``: used when this store creates the collection; ``ef`` / ``exact``: query
    settings of every search; ``flat_metadata``: refuse nested metadata values (LlamaIndex's check).
    See the module docstring for storage, similarities and filters.
    """

    stores_text: bool = True
    flat_metadata: bool = False
    collection_name: str = "llamaindex"
    address: str | None = None
    metric: str = "cosine"
    index: Any = None
    ef: int = 0
    exact: bool = False

    _col: StoreCollection = PrivateAttr()

    def __init__(self, collection_name: str = "llamaindex", address: str | None = None, *, client=None,
                 async_client=None, client_options: dict | None = None, metric: str = "cosine", index=None,
                 ef: int = 0, exact: bool = False, flat_metadata: bool = False, **kwargs: Any) -> None:
        super().__init__(collection_name=collection_name, address=address, metric=metric, index=index, ef=ef,
                         exact=exact, flat_metadata=flat_metadata, **kwargs)
        self._col = StoreCollection(collection_name, address, client=client, async_client=async_client,
                                    client_options=client_options, metric=metric, index=index,
                                    id_key=NODE_ID_KEY, keyword_keys=(REF_DOC_KEY,), ef=ef, exact=exact)

    @classmethod
    def class_name(cls) -> str:
        return "RetrievalVectorStore"

    @property
    def client(self):
        """The sync :class:`retrieval.Client` this store uses."""
        return self._col.client

    def close(self) -> None:
        self._col.close()

    async def aclose(self) -> None:
        await self._col.aclose()

    # --- writes ------------------------------------------------------------------------------------
    def _rows(self, nodes) -> tuple[list[str], np.ndarray | None, list[dict]]:
        if not nodes:
            return [], None, []
        sids, vecs, payloads = [], [], []
        for node in nodes:
            emb = node.get_embedding()  # raises when the node has no embedding
            pl = node_to_metadata_dict(node, remove_text=False, flat_metadata=self.flat_metadata)
            pl[NODE_ID_KEY] = node.node_id
            sids.append(node.node_id)
            vecs.append(emb)
            payloads.append(pl)
        return sids, np.asarray(vecs, np.float32), payloads

    def add(self, nodes: list[BaseNode], **kwargs: Any) -> list[str]:
        """Upsert nodes (each with its embedding); returns their node ids."""
        sids, xb, payloads = self._rows(nodes)
        if sids:
            self._col.upsert(sids, xb, payloads)
        return sids

    async def async_add(self, nodes: list[BaseNode], **kwargs: Any) -> list[str]:
        sids, xb, payloads = self._rows(nodes)
        if sids:
            await self._col.aupsert(sids, xb, payloads)
        return sids

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id``."""
        self._col.delete({"must": [{"key": REF_DOC_KEY, "equals": str(ref_doc_id)}]})

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await self._col.adelete({"must": [{"key": REF_DOC_KEY, "equals": str(ref_doc_id)}]})

    def _select(self, node_ids, filters, what: str) -> dict:
        if node_ids is None and (filters is None or not filters.filters):
            raise errors.InvalidArgument(f"{what} needs node_ids or filters (to remove everything: clear())")
        return and_filters(self._col.id_filter(node_ids) if node_ids is not None else None,
                           translate_filters(filters))

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        """Delete the nodes with these ids and/or matching ``filters`` (both: both must hold)."""
        if node_ids is not None and not node_ids:
            return
        self._col.delete(self._select(node_ids, filters, "delete_nodes"))

    async def adelete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                            **delete_kwargs: Any) -> None:
        if node_ids is not None and not node_ids:
            return
        await self._col.adelete(self._select(node_ids, filters, "delete_nodes"))

    def clear(self) -> None:
        """Delete every node of this store (points holding a node id); the collection stays."""
        self._col.delete(_ALL)

    async def aclear(self) -> None:
        await self._col.adelete(_ALL)

    # --- reads -------------------------------------------------------------------------------------
    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        """Nodes by id (in the order of ``node_ids``) and/or matching ``filters`` (in point-id order)."""
        if node_ids is not None and (filters is None or not filters.filters):
            by = {pl[NODE_ID_KEY]: pl for pl in self._col.get(node_ids)}
            return [metadata_dict_to_node(by[i]) for i in dict.fromkeys(node_ids) if i in by]
        return [metadata_dict_to_node(pl) for pl in self._col.scroll(self._select(node_ids, filters, "get_nodes"))]

    async def aget_nodes(self, node_ids: list[str] | None = None,
                         filters: MetadataFilters | None = None) -> list[BaseNode]:
        if node_ids is not None and (filters is None or not filters.filters):
            by = {pl[NODE_ID_KEY]: pl for pl in await self._col.aget(node_ids)}
            return [metadata_dict_to_node(by[i]) for i in dict.fromkeys(node_ids) if i in by]
        rows = await self._col.ascroll(self._select(node_ids, filters, "get_nodes"))
        return [metadata_dict_to_node(pl) for pl in rows]

    def _plan(self, query: VectorStoreQuery):
        if query.mode not in (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.MMR):
            raise ValueError(f"query mode {query.mode.value!r} is not supported; supported: default, mmr")
        if query.query_embedding is None:
            raise ValueError("this store searches by vector: the query needs a query_embedding")
        # empty doc_ids / node_ids mean "no restriction" (VectorIndexRetriever passes node_ids=[])
        flt = and_filters(translate_filters(query.filters),
                          {"must": [any_of(REF_DOC_KEY, query.doc_ids)]} if query.doc_ids else None,
                          self._col.id_filter(query.node_ids) if query.node_ids else None)
        k = int(query.similarity_top_k)
        mmr = query.mode == VectorStoreQueryMode.MMR
        return np.asarray(query.query_embedding, np.float32), k, flt, mmr

    def _result(self, q, rows, k: int, mmr: bool, query: VectorStoreQuery) -> VectorStoreQueryResult:
        if mmr and rows:
            from llama_index.core.indices.query.embedding_utils import get_top_k_mmr_embeddings

            lam = 0.5 if query.mmr_threshold is None else query.mmr_threshold
            _, picked = get_top_k_mmr_embeddings(q.tolist(), [r[2].tolist() for r in rows],
                                                 embedding_ids=list(range(len(rows))), similarity_top_k=k,
                                                 mmr_threshold=lam)
            rows = [rows[i] for i in picked]
        metric = self._col.metric
        return VectorStoreQueryResult(nodes=[metadata_dict_to_node(pl) for pl, _, _ in rows],
                                      similarities=[relevance(metric, d) for _, d, _ in rows],
                                      ids=[pl[NODE_ID_KEY] for pl, _, _ in rows])

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """The ``similarity_top_k`` nearest nodes (mode ``default``) or an MMR selection among the
        ``max(4 * top_k, 20)`` nearest (mode ``mmr``), nearest first."""
        q, k, flt, mmr = self._plan(query)
        rows = self._col.search(q, max(4 * k, 20) if mmr else k, flt, with_vectors=mmr)
        return self._result(q, rows, k, mmr, query)

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        q, k, flt, mmr = self._plan(query)
        rows = await self._col.asearch(q, max(4 * k, 20) if mmr else k, flt, with_vectors=mmr)
        return self._result(q, rows, k, mmr, query)


class MiniLMEmbedding(BaseEmbedding):
    """LlamaIndex embeddings over the shipped all-MiniLM-L6-v2 (384 dimensions, offline; see
    :mod:`retrieval.integrations.embeddings`). ``device``: "cpu", "cuda" or None (automatic)."""

    model_name: str = "all-MiniLM-L6-v2"
    device: str | None = None

    @classmethod
    def class_name(cls) -> str:
        return "MiniLMEmbedding"

    def _encode(self, texts: list[str]) -> list[list[float]]:
        from retrieval.integrations.embeddings import encode

        return encode(texts, self.device, max(1, int(self.embed_batch_size))).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._encode([query])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._encode([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._encode(list(texts))
