"""The LangChain vector store against a real server on loopback: LangChain's own standard suite
(``langchain_tests.integration_tests.VectorStoreIntegrationTests``, sync and async), then our own
tests of what the suite does not cover (filters, scores, MMR, collisions, retriever).

Skipped standard tests: none (all sync and async tests run). The suite's async tests are plain
``async def`` written for ``asyncio_mode = "auto"``; the repository runs pytest-asyncio in strict mode,
so :class:`TestStandard` carries the ``asyncio`` mark (see there).
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings
from langchain_tests.integration_tests.vectorstores import VectorStoreIntegrationTests

from retrieval.client import Client
from retrieval.integrations import _common
from retrieval.integrations.langchain import (
    IdCollision,
    RetrievalVectorStore,
    UnsupportedFilter,
    translate_filter,
)

_names = itertools.count()


@pytest.fixture(scope="module")
def lc_client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def _fresh_store(client, embedding, **kw) -> RetrievalVectorStore:
    return RetrievalVectorStore(embedding, f"lc-{next(_names)}", client=client, **kw)


class TestStandard(VectorStoreIntegrationTests):
    """LangChain's standard vector-store tests; each test gets a new, empty collection."""

    # the suite's async tests are plain ``async def`` (written for asyncio_mode = "auto"; this repository
    # runs pytest-asyncio in strict mode) and it forbids overriding them, so the class carries the mark;
    # pytest-asyncio then warns on each sync test that it is not async: that warning is silenced here
    pytestmark: ClassVar = [pytest.mark.asyncio,
                  pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio' "
                                             "but it is not an async function")]

    @pytest.fixture()
    def vectorstore(self, lc_client):
        store = _fresh_store(lc_client, self.get_embeddings())
        try:
            yield store
        finally:
            store.delete_collection()


# --- beyond the standard suite ---------------------------------------------------------------------
class Axis(Embeddings):
    """Texts "a:<x>,<y>" embed to the 2-D vector (x, y): distances a test can compute by hand."""

    def embed_documents(self, texts):
        return [self.embed_query(t) for t in texts]

    def embed_query(self, text):
        x, y = text.split(":", 1)[1].split(",")
        return [float(x), float(y)]


@pytest.fixture()
def store(lc_client):
    s = _fresh_store(lc_client, Axis())
    yield s
    s.delete_collection()


DOCS = [("a:1,0", {"year": 2020, "lang": "en", "tags": ["x", "y"]}),
        ("a:1,0.2", {"year": 2021, "lang": "de", "tags": ["y"]}),
        ("a:1,1", {"year": 2022, "lang": "en", "nested": {"ok": True}}),
        ("a:0,1", {"year": 2023, "lang": "fr", "score": 0.5}),
        ("a:-1,0", {"year": 2024, "lang": None})]


def _load(store):
    texts, metas = zip(*DOCS)
    return store.add_texts(list(texts), list(metas), ids=[f"d{i}" for i in range(len(DOCS))])


def test_scores_are_cosine_distances(store):
    _load(store)
    res = store.similarity_search_with_score("a:1,0", k=5)
    ids = [d.id for d, _ in res]
    assert ids == ["d0", "d1", "d2", "d3", "d4"]
    want = [0.0, 1 - 1 / np.sqrt(1.04), 1 - 1 / np.sqrt(2), 1.0, 2.0]
    np.testing.assert_allclose([s for _, s in res], want, atol=1e-5)
    rel = store.similarity_search_with_relevance_scores("a:1,0", k=2)
    np.testing.assert_allclose([s for _, s in rel], [1.0, 1 / np.sqrt(1.04)], atol=1e-5)


def test_search_by_vector_and_payload(store, lc_client):
    _load(store)
    docs = store.similarity_search_by_vector([0.0, 1.0], k=1)
    assert docs == [Document(id="d3", page_content="a:0,1", metadata=DOCS[3][1])]
    pts = lc_client.get(store.collection_name, [_common.point_id("d3")])
    assert pts.payloads[0] == {"id": "d3", "page_content": "a:0,1", "metadata": DOCS[3][1]}


@pytest.mark.parametrize("flt, want", [
    ({"lang": "en"}, {"d0", "d2"}),
    ({"lang": {"$eq": "en"}}, {"d0", "d2"}),
    ({"lang": {"$ne": "en"}}, {"d1", "d3", "d4"}),
    ({"year": {"$gt": 2021}}, {"d2", "d3", "d4"}),
    ({"year": {"$gte": 2021, "$lt": 2023}}, {"d1", "d2"}),
    ({"year": {"$lte": 2020}}, {"d0"}),
    ({"lang": {"$in": ["de", "fr"]}}, {"d1", "d3"}),
    ({"lang": {"$nin": ["de", "fr"]}}, {"d0", "d2", "d4"}),
    ({"lang": {"$in": []}}, set()),
    ({"score": {"$exists": True}}, {"d3"}),
    ({"lang": None}, {"d4"}),
    ({"tags": "y"}, {"d0", "d1"}),
    ({"nested.ok": True}, {"d2"}),
    ({"lang": "en", "year": 2022}, {"d2"}),
    ({"$or": [{"lang": "de"}, {"year": 2024}]}, {"d1", "d4"}),
    ({"$and": [{"lang": "en"}, {"$not": {"year": 2020}}]}, {"d2"}),
])
def test_filters(store, flt, want):
    _load(store)
    got = {d.id for d in store.similarity_search("a:1,0", k=5, filter=flt)}
    assert got == want
    assert {d.id for d in store.max_marginal_relevance_search("a:1,0", k=5, fetch_k=5, filter=flt)} == want


@pytest.mark.parametrize("flt, match", [
    ({"lang": {"$like": "e%"}}, r"\$like"),
    ({"$nor": [{"lang": "en"}]}, r"\$nor"),
    ({"year": {"$gt": "2020"}}, "finite number"),
    ({"lang": ["en", "de"]}, "string, number or bool"),
    ({"lang": {"$in": "en"}}, "list"),
    ({"bad key": 1}, "cannot be filtered on"),
    ({"$or": []}, "non-empty list"),
])
def test_unsupported_filters_are_refused(store, flt, match):
    with pytest.raises(UnsupportedFilter, match=match):
        store.similarity_search("a:1,0", k=1, filter=flt)
    assert isinstance(UnsupportedFilter("x"), ValueError)


def test_translate_filter_form():
    assert translate_filter({"a": 1, "b": {"$lt": 2}}) == {
        "must": [{"key": "metadata.a", "equals": 1}, {"key": "metadata.b", "range": {"lt": 2}}]}
    assert translate_filter({}) is None and translate_filter(None) is None


def test_delete_by_filter_and_refusals(store):
    _load(store)
    store.delete(filter={"lang": "en"})
    assert {d.id for d in store.similarity_search("a:1,0", k=5)} == {"d1", "d3", "d4"}
    store.delete(["d1"], filter={"lang": "fr"})  # both must hold: d1 is "de"
    assert len(store.similarity_search("a:1,0", k=5)) == 3
    with pytest.raises(ValueError, match="delete_collection"):
        store.delete()
    assert store.delete([]) is True


def test_mmr_prefers_diversity(store):
    _load(store)
    # nearest two to (1, 0) are d0 and d1 (almost the same direction); MMR with low lambda picks d0 then
    # something far from d0
    near = [d.id for d in store.similarity_search("a:1,0", k=2)]
    mmr = [d.id for d in store.max_marginal_relevance_search("a:1,0", k=2, fetch_k=5, lambda_mult=0.1)]
    assert near == ["d0", "d1"] and mmr[0] == "d0" and mmr[1] != "d1"


def test_string_ids_map_deterministically_and_collisions_are_refused(store, lc_client, monkeypatch):
    assert _common.point_id("doc-1") == _common.point_id("doc-1") == 0x7FFFFFFFFFFFFFFF & _common.point_id("doc-1")
    assert _common.point_id("doc-1") != _common.point_id("doc-2")
    store.add_texts(["a:1,0"], ids=["x"])
    # force a collision: every id hashes to the same point
    monkeypatch.setattr(_common, "point_id", lambda s: 12345)
    store.add_texts(["a:0,1"], ids=["y"])          # point 12345 is free: written
    with pytest.raises(IdCollision, match="holds 'y'"):
        store.add_texts(["a:1,1"], ids=["z"])
    with pytest.raises(IdCollision, match="same point id"):
        store.add_texts(["a:1,1", "a:0,1"], ids=["p", "q"])
    assert [d.page_content for d in store.get_by_ids(["y", "z"])] == ["a:0,1"]  # point 12345 holds "y", not "z"
    monkeypatch.undo()
    assert {d.id for d in store.similarity_search("a:1,0", k=5)} == {"x", "y"}
    # delete goes by the stored string, never by the hash alone
    monkeypatch.setattr(_common, "point_id", lambda s: 12345)
    store.delete(["z"])
    monkeypatch.undo()
    assert {d.id for d in store.similarity_search("a:1,0", k=5)} == {"x", "y"}


def test_get_by_ids_order_and_duplicates_in_one_batch(store):
    ids = store.add_texts(["a:1,0", "a:0,1", "a:1,1"], ids=["u", "v", "u"])
    assert ids == ["u", "v", "u"]
    docs = store.get_by_ids(["v", "missing", "u"])
    assert [(d.id, d.page_content) for d in docs] == [("v", "a:0,1"), ("u", "a:1,1")]  # last "u" wins


def test_from_texts_retriever_and_existing_collection(lc_client):
    name = f"lc-{next(_names)}"
    s = RetrievalVectorStore.from_texts(["a:1,0", "a:0,1"], Axis(), [{"k": 1}, {"k": 2}], ids=["p", "q"],
                                        collection_name=name, client=lc_client)
    try:
        info = lc_client.describe_collection(name)
        assert info["dimension"] == 2 and info["metric"] == "cosine"
        assert [e["key"] for e in lc_client.list_payload_indexes(name)] == ["id"]
        r = s.as_retriever(search_kwargs={"k": 1, "filter": {"k": 2}})
        assert [d.id for d in r.invoke("a:1,0")] == ["q"]
        # a second store on the same collection sees the documents; a wrong dimension is refused
        again = RetrievalVectorStore(Axis(), name, client=lc_client)
        assert [d.id for d in again.similarity_search("a:1,0", k=1)] == ["p"]
        wrong = RetrievalVectorStore(DeterministicFakeEmbedding(size=3), name, client=lc_client)
        with pytest.raises(ValueError, match="dimension 2"):
            wrong.add_texts(["a"])
    finally:
        s.delete_collection()


@pytest.mark.asyncio
async def test_async_filters_mmr_and_scores(lc_client):
    s = _fresh_store(lc_client, Axis())
    try:
        texts, metas = zip(*DOCS)
        await s.aadd_texts(list(texts), list(metas), ids=[f"d{i}" for i in range(len(DOCS))])
        res = await s.asimilarity_search_with_score("a:1,0", k=2, filter={"lang": "en"})
        assert [d.id for d, _ in res] == ["d0", "d2"]
        np.testing.assert_allclose([d for _, d in res], [0.0, 1 - 1 / np.sqrt(2)], atol=1e-5)
        mmr = await s.amax_marginal_relevance_search("a:1,0", k=2, fetch_k=5, lambda_mult=0.1)
        assert mmr[0].id == "d0" and mmr[1].id != "d1"
        await s.adelete(filter={"year": {"$gte": 2022}})
        assert {d.id for d in await s.asimilarity_search_by_vector([1.0, 0.0], k=5)} == {"d0", "d1"}
        r = s.as_retriever(search_kwargs={"k": 1})
        assert [d.id for d in await r.ainvoke("a:0,1")] == ["d1"]
        s2 = await RetrievalVectorStore.afrom_texts(["a:1,0"], Axis(), ids=["w"], collection_name=s.collection_name,
                                                    client=lc_client)
        assert [d.id for d in await s2.aget_by_ids(["w", "d0"])] == ["w", "d0"]
        await s.aclose()
    finally:
        s.delete_collection()


def test_collection_dropped_behind_the_store_is_created_again(store, lc_client):
    store.add_texts(["a:1,0"], ids=["x"])
    lc_client.drop_collection(store.collection_name)
    assert store.similarity_search("a:1,0", k=1) == [] and store.get_by_ids(["x"]) == []
    store.add_texts(["a:0,1"], ids=["y"])
    assert [d.id for d in store.similarity_search("a:1,0", k=5)] == ["y"]
