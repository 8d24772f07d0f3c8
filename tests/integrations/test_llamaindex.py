"""The LlamaIndex vector store against a real server on loopback, modelled on llama-index's tests of
its Qdrant and Chroma stores: add nodes, query top-k, metadata filters with every supported operator
and nested and/or/not conditions, delete by ref_doc_id, delete_nodes, get_nodes, clear, doc_ids /
node_ids restrictions, MMR, the async methods, and a VectorStoreIndex end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.embeddings import BaseEmbedding
from llama_index.core.schema import Document, NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from retrieval.client import Client
from retrieval.integrations.llamaindex import RetrievalVectorStore, UnsupportedFilter, translate_filters

_names = itertools.count()


@pytest.fixture(scope="module")
def li_client(server):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture()
def store(li_client):
    s = RetrievalVectorStore(f"li-{next(_names)}", client=li_client)
    yield s
    try:
        li_client.drop_collection(s.collection_name)
    except KeyError:  # never created
        pass


def _node(i, text, emb, ref, **meta):
    return TextNode(id_=f"n{i}", text=text, embedding=emb, metadata=meta,
                    relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=ref)})


NODES = [
    _node(0, "The Shawshank Redemption", [1.0, 0.0, 0.0], "doc-a", author="Stephen King", theme="Friendship",
          year=1994, tags=["prison", "hope"]),
    _node(1, "The Godfather", [0.9, 0.1, 0.0], "doc-a", director="Francis Ford Coppola", theme="Mafia", year=1972,
          tags=["crime"]),
    _node(2, "Inception", [0.0, 1.0, 0.0], "doc-b", director="Christopher Nolan", theme="Fiction", year=2010,
          rating=8.8),
    _node(3, "To Kill a Mockingbird", [0.0, 0.9, 0.1], "doc-b", author="Harper Lee", theme="Mafia", year=1960),
    _node(4, "1984", [0.0, 0.0, 1.0], "doc-c", author="George Orwell", theme="Totalitarianism", year=1949,
          tags=["dystopia", "hope"]),
]


def _copies():
    return [n.model_copy(deep=True) for n in NODES]


def _ids(result):
    return set(result.ids)


def _q(emb=(1.0, 0.0, 0.0), k=5, **kw):
    return VectorStoreQuery(query_embedding=list(emb), similarity_top_k=k, **kw)


def F(key, value, op="=="):
    return MetadataFilter(key=key, value=value, operator=FilterOperator(op))


def test_add_and_query_top_k(store, li_client):
    assert store.add(_copies()) == [f"n{i}" for i in range(5)]
    info = li_client.describe_collection(store.collection_name)
    assert info["dimension"] == 3 and info["metric"] == "cosine" and info["points"] == 5
    assert sorted(e["key"] for e in li_client.list_payload_indexes(store.collection_name)) == ["_node_id",
                                                                                              "ref_doc_id"]
    res = store.query(_q(k=2))
    assert res.ids == ["n0", "n1"]
    np.testing.assert_allclose(res.similarities, [1.0, 0.9 / np.sqrt(0.82)], atol=1e-5)
    n = res.nodes[0]
    assert n.node_id == "n0" and n.get_content() == "The Shawshank Redemption" and n.ref_doc_id == "doc-a"
    assert n.metadata == NODES[0].metadata
    assert store.query(_q(k=0)).ids == []


def test_query_on_empty_store(store):
    res = store.query(_q(k=3))
    assert res.ids == [] and res.nodes == [] and res.similarities == []


@pytest.mark.parametrize("filters, want", [
    ([F("theme", "Mafia")], {"n1", "n3"}),
    ([F("theme", "Mafia", "!=")], {"n0", "n2", "n4"}),
    ([F("year", 1972, ">")], {"n0", "n2"}),
    ([F("year", 1972, ">=")], {"n0", "n1", "n2"}),
    ([F("year", 1960, "<")], {"n4"}),
    ([F("year", 1960, "<=")], {"n3", "n4"}),
    ([F("rating", 8.5, ">")], {"n2"}),
    ([F("theme", ["Mafia", "Fiction"], "in")], {"n1", "n2", "n3"}),
    ([F("theme", ["Mafia", "Fiction"], "nin")], {"n0", "n4"}),
    ([F("tags", ["crime", "dystopia"], "any")], {"n1", "n4"}),
    ([F("tags", ["prison", "hope"], "all")], {"n0"}),
    ([F("tags", "hope", "contains")], {"n0", "n4"}),
    ([F("author", "Harper Lee"), F("year", 1950, ">")], {"n3"}),
])
def test_filters_and(store, filters, want):
    store.add(_copies())
    assert _ids(store.query(_q(filters=MetadataFilters(filters=filters)))) == want


def test_filters_or_not_and_nested(store):
    store.add(_copies())
    orf = MetadataFilters(filters=[F("theme", "Fiction"), F("year", 1950, "<")], condition=FilterCondition.OR)
    assert _ids(store.query(_q(filters=orf))) == {"n2", "n4"}
    notf = MetadataFilters(filters=[F("theme", "Mafia"), F("year", 2000, ">")], condition=FilterCondition.NOT)
    assert _ids(store.query(_q(filters=notf))) == {"n0", "n4"}
    nested = MetadataFilters(filters=[F("year", 1950, ">"), orf], condition=FilterCondition.AND)
    assert _ids(store.query(_q(filters=nested))) == {"n2"}
    # top-k under a filter: the nearest matches, nearest first
    res = store.query(_q(emb=(0.0, 1.0, 0.0), k=1, filters=MetadataFilters(filters=[F("theme", "Mafia")])))
    assert res.ids == ["n3"]


@pytest.mark.parametrize("op", ["text_match", "text_match_insensitive", "is_empty"])
def test_unsupported_operators_are_refused(store, op):
    with pytest.raises(UnsupportedFilter, match=op):
        store.query(_q(filters=MetadataFilters(filters=[F("theme", "Mafia", op)])))


def test_unsupported_values_are_refused():
    with pytest.raises(UnsupportedFilter, match="finite number"):
        translate_filters(MetadataFilters(filters=[F("theme", "M", ">")]))
    with pytest.raises(UnsupportedFilter, match="cannot be filtered"):
        translate_filters(MetadataFilters(filters=[F("a b", 1)]))
    with pytest.raises(ValueError, match="not supported"):
        RetrievalVectorStore("x", client=None).query(_q(mode=VectorStoreQueryMode.HYBRID))


def test_doc_ids_and_node_ids_restrict_the_search(store):
    store.add(_copies())
    assert _ids(store.query(_q(doc_ids=["doc-b", "doc-c"]))) == {"n2", "n3", "n4"}
    assert _ids(store.query(_q(node_ids=["n1", "n4"]))) == {"n1", "n4"}
    assert len(store.query(_q(doc_ids=[], node_ids=[])).ids) == 5  # empty: no restriction (LlamaIndex's meaning)


def test_delete_by_ref_doc_id(store):
    store.add(_copies())
    store.delete("doc-a")
    assert _ids(store.query(_q())) == {"n2", "n3", "n4"}
    store.delete("no-such-doc")
    assert len(store.query(_q()).ids) == 3


def test_delete_nodes_get_nodes_and_clear(store):
    store.add(_copies())
    assert [n.node_id for n in store.get_nodes(["n3", "missing", "n1"])] == ["n3", "n1"]
    mafia = MetadataFilters(filters=[F("theme", "Mafia")])
    assert sorted(n.node_id for n in store.get_nodes(filters=mafia)) == ["n1", "n3"]
    assert [n.node_id for n in store.get_nodes(["n1", "n2"], filters=mafia)] == ["n1"]
    store.delete_nodes(["n0"])
    store.delete_nodes(filters=MetadataFilters(filters=[F("year", 2000, ">")]))
    assert _ids(store.query(_q())) == {"n1", "n3", "n4"}
    store.delete_nodes(["n1", "n4"], filters=mafia)  # both must hold: n1 only
    assert _ids(store.query(_q())) == {"n3", "n4"}
    with pytest.raises(ValueError, match="clear"):
        store.delete_nodes()
    store.clear()
    assert store.query(_q()).ids == []
    store.add(_copies()[:1])  # the collection survives clear()
    assert store.query(_q()).ids == ["n0"]


def test_upsert_replaces_a_node(store):
    store.add(_copies())
    n = _copies()[2]
    n.text, n.metadata["theme"], n.embedding = "Inception (2010)", "Heist", [1.0, 0.0, 0.0]
    store.add([n])
    res = store.query(_q(k=5))
    assert len(res.ids) == 5 and res.ids[0] in ("n0", "n2")
    assert store.get_nodes(["n2"])[0].get_content() == "Inception (2010)"


def test_mmr(store):
    store.add(_copies())
    plain = store.query(_q(k=2))
    mmr = store.query(_q(k=2, mode=VectorStoreQueryMode.MMR, mmr_threshold=0.1))
    assert plain.ids == ["n0", "n1"]
    assert mmr.ids[0] == "n0" and mmr.ids[1] != "n1" and len(mmr.nodes) == 2


@pytest.mark.asyncio
async def test_async_methods(li_client):
    s = RetrievalVectorStore(f"li-{next(_names)}", client=li_client)
    try:
        assert (await s.aquery(_q())).ids == []
        assert await s.async_add(_copies()) == [f"n{i}" for i in range(5)]
        res = await s.aquery(_q(k=2, filters=MetadataFilters(filters=[F("year", 1950, ">")])))
        assert res.ids == ["n0", "n1"]
        await s.adelete("doc-a")
        assert _ids(await s.aquery(_q())) == {"n2", "n3", "n4"}
        await s.adelete_nodes(["n2"])
        assert [n.node_id for n in await s.aget_nodes(["n2", "n3"])] == ["n3"]
        assert [n.node_id for n in await s.aget_nodes(filters=MetadataFilters(filters=[F("theme", "Mafia")]))] == ["n3"]
        await s.aclear()
        assert (await s.aquery(_q())).ids == []
        await s.aclose()
    finally:
        li_client.drop_collection(s.collection_name)


class Axis3(BaseEmbedding):
    """Texts naming "x", "y" or "z" embed to that axis (plus a little of the others)."""

    def _vec(self, text: str) -> list[float]:
        t = text.lower()
        return [1.0 if "x" in t else 0.05, 1.0 if "y" in t else 0.05, 1.0 if "z" in t else 0.05]

    def _get_query_embedding(self, query):
        return self._vec(query)

    async def _aget_query_embedding(self, query):
        return self._vec(query)

    def _get_text_embedding(self, text):
        return self._vec(text)


def test_vector_store_index_end_to_end(li_client):
    s = RetrievalVectorStore(f"li-{next(_names)}", client=li_client)
    try:
        docs = [Document(text="about x", id_="dx", metadata={"axis": "x"}),
                Document(text="about y", id_="dy", metadata={"axis": "y"}),
                Document(text="about z", id_="dz", metadata={"axis": "z"})]
        index = VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=s),
                                                embed_model=Axis3())
        got = index.as_retriever(similarity_top_k=1).retrieve("tell me about y")
        assert [r.node.ref_doc_id for r in got] == ["dy"] and got[0].node.get_content() == "about y"
        flt = MetadataFilters(filters=[F("axis", ["x", "z"], "in")])
        got = index.as_retriever(similarity_top_k=1, filters=flt).retrieve("tell me about y")
        assert got[0].node.ref_doc_id in ("dx", "dz")
        index.delete_ref_doc("dy")
        got = index.as_retriever(similarity_top_k=3).retrieve("y")
        assert sorted(r.node.ref_doc_id for r in got) == ["dx", "dz"]
    finally:
        li_client.drop_collection(s.collection_name)
