"""A LangChain ``VectorStore`` over a collection of the service.

    from retrieval.integrations.embeddings import MiniLMEmbeddings
    from retrieval.integrations.langchain import RetrievalVectorStore

    store = RetrievalVectorStore(MiniLMEmbeddings(), collection_name="notes", address="127.0.0.1:50051")
    store.add_texts(["..."], metadatas=[{"lang": "en"}])
    store.similarity_search("...", k=4, filter={"lang": "en"})

Storage: one point per document, payload ``{"id": <string id>, "page_content": <text>, "metadata":
{...}}`` (the key names are settable). The collection is created on the first write with the
dimension of the first embeddings, ``metric`` (cosine by default), ``index`` (HNSW by default) and a
keyword payload index on the id key; an existing collection is used as it is (its metric wins). String
ids map to point ids deterministically (63 bits of blake2b; collisions are detected and refused, see
:mod:`retrieval.integrations._common`); documents without an id get a uuid4.

Scores: :meth:`RetrievalVectorStore.similarity_search_with_score` returns the server's **distance,
smaller is nearer** (cosine: ``1 - cos``, in [0, 2]; ip: ``1 - <q, x>``; l2: squared Euclidean);
``similarity_search_with_relevance_scores`` turns it into a relevance, higher is nearer (cosine:
``cos``; ip: ``<q, x>``; l2: ``1 - sqrt(d) / sqrt(2)``).

Filters: a dict over metadata keys, Mongo-style as in other LangChain stores: ``{"lang": "en"}``,
``{"year": {"$gte": 2020, "$lt": 2024}}``, ``{"$or": [{...}, {...}]}``, ``{"$and": [...]}``,
``{"$not": {...}}``; operators ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte`` (numbers), ``$in``,
``$nin``, ``$exists``. Several keys in one dict must all hold. ``{"k": None}`` means missing or null.
On a list value a condition holds when any element satisfies it (``{"tags": "a"}`` matches
``tags: ["a", "b"]``). Dotted keys reach into nested metadata. Anything else raises
:class:`UnsupportedFilter` (a ``ValueError``) naming the operator, before anything is sent.

Thread-safety: as :class:`retrieval.integrations._common.StoreCollection`: the sync methods may be
called from many threads; the async ones run on :class:`retrieval.AsyncClient`, one per event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from retrieval import errors
from retrieval.integrations._common import (
    NOTHING_ON,
    IdCollision,
    StoreCollection,
    UnsupportedFilter,
    and_filters,
    any_of,
    check_key,
    new_id,
    number,
    relevance,
    scalar,
    values,
)

__all__ = ["IdCollision", "RetrievalVectorStore", "UnsupportedFilter", "translate_filter"]

_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
_RANGE = {"$gt": "gt", "$gte": "gte", "$lt": "lt", "$lte": "lte"}


def translate_filter(f: dict | None, prefix: str = "metadata") -> dict | None:
    """A LangChain metadata filter (see the module docstring) in the service's filter form, on payload
    keys ``prefix.<key>``; None for no filter. Raises :class:`UnsupportedFilter`."""
    if f is None:
        return None
    if not isinstance(f, dict):
        raise UnsupportedFilter(f"filter must be a dict such as {{'lang': 'en'}}, got {type(f).__name__}")
    if not f:
        return None
    return _node(f, prefix)


def _node(f: Any, prefix: str) -> dict:
    if not isinstance(f, dict) or not f:
        raise UnsupportedFilter(f"each filter in $and / $or / $not must be a non-empty dict, got {f!r}")
    must: list[dict] = []
    for key, value in f.items():
        if key in ("$and", "$or"):
            if not isinstance(value, (list, tuple)) or not value:
                raise UnsupportedFilter(f"{key} needs a non-empty list of filters, got {value!r}")
            subs = [_node(x, prefix) for x in value]
            must.append({"must": subs} if key == "$and" else {"should": subs})
        elif key == "$not":
            must.append({"must_not": [_node(value, prefix)]})
        elif isinstance(key, str) and key.startswith("$"):
            raise UnsupportedFilter(f"unsupported filter operator {key!r} at the top of a filter; supported: "
                                    "$and, $or, $not, and {key: value or {operator: value}} with operators "
                                    + ", ".join(_OPS))
        else:
            path = check_key(f"{prefix}.{key}" if prefix else key)
            if isinstance(value, dict):
                if not value:
                    raise UnsupportedFilter(f"the condition on {key!r} is an empty dict")
                must.extend(_op(path, key, op, v) for op, v in value.items())
            else:
                must.append(_op(path, key, "$eq", value))
    return {"must": must}


def _op(path: str, key: str, op: str, v: Any) -> dict:
    if op == "$eq":
        if v is None:
            return {"key": path, "is_null": True}
        return {"key": path, "equals": scalar(v, key, op)}
    if op == "$ne":
        return {"must_not": [_op(path, key, "$eq", v)]}
    if op in _RANGE:
        return {"key": path, "range": {_RANGE[op]: number(v, key, op)}}
    if op == "$in":
        vals = values(v, key, op)
        return any_of(path, vals) if vals else NOTHING_ON(path)
    if op == "$nin":
        vals = values(v, key, op)
        return {"must_not": [any_of(path, vals)]} if vals else {"must": []}
    if op == "$exists":
        if not isinstance(v, bool):
            raise UnsupportedFilter(f"$exists on {key!r} needs true or false, got {v!r}")
        return {"key": path, "is_null": not v}
    raise UnsupportedFilter(f"unsupported filter operator {op!r} on {key!r}; supported: {', '.join(_OPS)}")


class RetrievalVectorStore(VectorStore):
    """A LangChain vector store over collection ``collection_name`` of the server at ``address``.

    ``embedding``: any LangChain ``Embeddings``. ``client`` / ``async_client``: existing
    :class:`retrieval.Client` / :class:`retrieval.AsyncClient` to use (else made from ``address`` and
    ``client_options``, the keyword arguments of ``Client``: ``api_key``, ``tls``, ``timeout``...).
    ``metric`` ("cosine", "ip", "l2") and ``index`` (as in ``Client.create_collection``) apply when this
    store creates the collection. ``ef`` / ``exact``: query settings of every search. ``id_key``,
    ``text_key``, ``metadata_key``: payload field names. See the module docstring for ids, scores and
    filters.
    """

    def __init__(self, embedding: Embeddings, collection_name: str = "langchain", address: str | None = None,
                 *, client=None, async_client=None, client_options: dict | None = None, metric: str = "cosine",
                 index=None, ef: int = 0, exact: bool = False, id_key: str = "id", text_key: str = "page_content",
                 metadata_key: str = "metadata") -> None:
        self.embedding = embedding
        self.text_key = text_key
        self.metadata_key = check_key(metadata_key, "metadata_key")
        self._col = StoreCollection(collection_name, address, client=client, async_client=async_client,
                                    client_options=client_options, metric=metric, index=index, id_key=id_key,
                                    ef=ef, exact=exact)

    # --- plumbing ----------------------------------------------------------------------------------
    @property
    def embeddings(self) -> Embeddings:
        return self.embedding

    @property
    def collection_name(self) -> str:
        return self._col.name

    @property
    def client(self):
        """The sync :class:`retrieval.Client` this store uses."""
        return self._col.client

    def close(self) -> None:
        """Close the client this store made (a given client is left open)."""
        self._col.close()

    async def aclose(self) -> None:
        await self._col.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def delete_collection(self) -> None:
        """Drop the collection (all its documents); the next write creates it again."""
        try:
            self._col.client.drop_collection(self._col.name)
        except errors.NotFound:
            pass
        self._col.dimension = None

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        metric = self._col.metric
        return lambda d: relevance(metric, d)

    def _filter(self, f: dict | None) -> dict | None:
        return translate_filter(f, self.metadata_key)

    def _rows(self, texts: Iterable[str], metadatas, ids) -> tuple[list[str], list[str], list[dict]]:
        texts = list(texts)
        n = len(texts)
        if metadatas is None:
            metadatas = [{}] * n
        metadatas = list(metadatas)
        if len(metadatas) != n:
            raise errors.InvalidArgument(f"{n} texts need {n} metadatas, got {len(metadatas)}")
        ids = [None] * n if ids is None else list(ids)
        if len(ids) != n:
            raise errors.InvalidArgument(f"{n} texts need {n} ids, got {len(ids)}")
        sids = []
        for i in ids:
            if i is None or i == "":
                sids.append(new_id())
            elif isinstance(i, str):
                sids.append(i)
            else:
                raise errors.InvalidArgument(f"ids must be strings (or None), got {type(i).__name__} {i!r}")
        payloads = [{self._col.id_key: s, self.text_key: t, self.metadata_key: dict(m or {})}
                    for s, t, m in zip(sids, texts, metadatas)]
        return texts, sids, payloads

    def _doc(self, pl: dict) -> Document:
        return Document(id=pl.get(self._col.id_key), page_content=pl.get(self.text_key) or "",
                        metadata=pl.get(self.metadata_key) or {})

    # --- writes ------------------------------------------------------------------------------------
    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *, ids: list[str] | None = None,
                  **kwargs: Any) -> list[str]:
        """Embed and upsert ``texts``; returns their string ids (given, or new uuid4s). A document
        whose id is already stored is replaced."""
        texts, sids, payloads = self._rows(texts, metadatas, ids)
        if not texts:
            return []
        vectors = self.embedding.embed_documents(texts)
        self._col.upsert(sids, vectors, payloads)
        return sids

    async def aadd_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *,
                         ids: list[str] | None = None, **kwargs: Any) -> list[str]:
        texts, sids, payloads = self._rows(texts, metadatas, ids)
        if not texts:
            return []
        vectors = await self.embedding.aembed_documents(texts)
        await self._col.aupsert(sids, vectors, payloads)
        return sids

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """Upsert ``documents`` (``Document.id`` is used when set; ``ids=`` overrides it)."""
        ids = kwargs.pop("ids", None)
        if ids is None:
            ids = [d.id for d in documents]
        return self.add_texts([d.page_content for d in documents], [d.metadata for d in documents], ids=ids)

    async def aadd_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        ids = kwargs.pop("ids", None)
        if ids is None:
            ids = [d.id for d in documents]
        return await self.aadd_texts([d.page_content for d in documents], [d.metadata for d in documents], ids=ids)

    def _delete_filter(self, ids, filter) -> dict:
        if ids is None and filter is None:
            raise errors.InvalidArgument("delete needs ids or filter= (to remove everything: delete_collection())")
        parts = []
        if ids is not None:
            parts.append(self._col.id_filter(list(ids)))
        if filter is not None:
            f = self._filter(filter)
            if f is None:
                raise errors.InvalidArgument("delete(filter={}) would delete everything: use delete_collection()")
            parts.append(f)
        return and_filters(*parts)

    def delete(self, ids: list[str] | None = None, *, filter: dict | None = None, **kwargs: Any) -> bool:
        """Delete the documents with these string ids (missing ones are ignored) and/or matching the
        metadata ``filter``. Returns True."""
        if ids is not None and not list(ids) and filter is None:
            return True
        self._col.delete(self._delete_filter(ids, filter))
        return True

    async def adelete(self, ids: list[str] | None = None, *, filter: dict | None = None, **kwargs: Any) -> bool:
        if ids is not None and not list(ids) and filter is None:
            return True
        await self._col.adelete(self._delete_filter(ids, filter))
        return True

    # --- reads -------------------------------------------------------------------------------------
    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents with these ids, in the order of ``ids`` (missing ones left out)."""
        return self._in_order(ids, self._col.get(list(ids)))

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return self._in_order(ids, await self._col.aget(list(ids)))

    def _in_order(self, ids, payloads: list[dict]) -> list[Document]:
        by = {pl[self._col.id_key]: pl for pl in payloads}
        return [self._doc(by[i]) for i in dict.fromkeys(ids) if i in by]

    def similarity_search_with_score_by_vector(self, embedding: list[float], k: int = 4,
                                               filter: dict | None = None, **kwargs: Any
                                               ) -> list[tuple[Document, float]]:
        """``[(document, distance)]`` of the ``k`` nearest, nearest first (distance: module docstring)."""
        return [(self._doc(pl), d) for pl, d, _ in self._col.search(embedding, k, self._filter(filter))]

    async def asimilarity_search_with_score_by_vector(self, embedding: list[float], k: int = 4,
                                                      filter: dict | None = None, **kwargs: Any
                                                      ) -> list[tuple[Document, float]]:
        rows = await self._col.asearch(embedding, k, self._filter(filter))
        return [(self._doc(pl), d) for pl, d, _ in rows]

    def similarity_search_with_score(self, query: str, k: int = 4, filter: dict | None = None,
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        """``[(document, distance)]``, smaller distance is nearer (cosine: ``1 - cos``)."""
        return self.similarity_search_with_score_by_vector(self.embedding.embed_query(query), k, filter)

    async def asimilarity_search_with_score(self, query: str, k: int = 4, filter: dict | None = None,
                                            **kwargs: Any) -> list[tuple[Document, float]]:
        q = await self.embedding.aembed_query(query)
        return await self.asimilarity_search_with_score_by_vector(q, k, filter)

    def similarity_search(self, query: str, k: int = 4, filter: dict | None = None, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter)]

    async def asimilarity_search(self, query: str, k: int = 4, filter: dict | None = None,
                                 **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score(query, k, filter)]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, filter: dict | None = None,
                                    **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, filter)]

    async def asimilarity_search_by_vector(self, embedding: list[float], k: int = 4, filter: dict | None = None,
                                           **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score_by_vector(embedding, k, filter)]

    def _mmr(self, q, rows, k: int, lambda_mult: float) -> list[Document]:
        if not rows:
            return []
        picked = maximal_marginal_relevance(np.asarray(q, np.float32), [r[2] for r in rows], lambda_mult, k)
        return [self._doc(rows[i][0]) for i in picked]

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, fetch_k: int = 20,
                                                lambda_mult: float = 0.5, filter: dict | None = None,
                                                **kwargs: Any) -> list[Document]:
        """``k`` documents chosen among the ``fetch_k`` nearest by maximal marginal relevance
        (``lambda_mult`` 1: pure relevance, 0: pure diversity)."""
        rows = self._col.search(embedding, max(fetch_k, k), self._filter(filter), with_vectors=True)
        return self._mmr(embedding, rows, k, lambda_mult)

    async def amax_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4,
                                                       fetch_k: int = 20, lambda_mult: float = 0.5,
                                                       filter: dict | None = None, **kwargs: Any) -> list[Document]:
        rows = await self._col.asearch(embedding, max(fetch_k, k), self._filter(filter), with_vectors=True)
        return self._mmr(embedding, rows, k, lambda_mult)

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                                      filter: dict | None = None, **kwargs: Any) -> list[Document]:
        return self.max_marginal_relevance_search_by_vector(self.embedding.embed_query(query), k, fetch_k,
                                                            lambda_mult, filter)

    async def amax_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20,
                                             lambda_mult: float = 0.5, filter: dict | None = None,
                                             **kwargs: Any) -> list[Document]:
        q = await self.embedding.aembed_query(query)
        return await self.amax_marginal_relevance_search_by_vector(q, k, fetch_k, lambda_mult, filter)

    # --- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict] | None = None, *,
                   ids: list[str] | None = None, collection_name: str = "langchain", address: str | None = None,
                   **kwargs: Any) -> RetrievalVectorStore:
        """A store on ``collection_name`` (other keyword arguments as the constructor) with ``texts`` added."""
        store = cls(embedding, collection_name, address, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    @classmethod
    async def afrom_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict] | None = None, *,
                          ids: list[str] | None = None, collection_name: str = "langchain",
                          address: str | None = None, **kwargs: Any) -> RetrievalVectorStore:
        store = cls(embedding, collection_name, address, **kwargs)
        await store.aadd_texts(texts, metadatas, ids=ids)
        return store
