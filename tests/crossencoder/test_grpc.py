"""The CrossEncoder service over a real loopback server: build as a job, search (congruent with the
in-process index), search batch, add / delete, re-anchoring, describe / list / drop, every bad-input
status, and a restart and a crash where the index must survive."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import errors
from retrieval.crossencoder import build_and_load, make_dual_encoder, make_scorer

N_ITEMS, K_Q = 40, 8


@pytest.fixture(scope="module")
def task(fx, tiny_hf_dir):
    items = [{"id": 1000 + j, "text": fx.items[j], "payload": {"col": j}} for j in range(N_ITEMS)]
    scorer = {"name": "hf", "model_dir": str(tiny_hf_dir), "device": "cpu", "batch_size": 64}
    de = {"name": "sentence-encoder", "model_dir": str(tiny_hf_dir), "device": "cpu"}
    return {"items": items, "anchors": fx.anchor_pool[:K_Q], "scorer": scorer, "de": de,
            "queries": fx.test_queries[:6]}


@pytest.fixture(scope="module")
def built(client, task):
    job = client.build_ce_index("docs", task["scorer"], items=task["items"], anchor_queries=task["anchors"],
                                dual_encoder=task["de"], params={"k_i": 10, "chunk_size": 16})
    assert job["state"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def local_index(tmp_path_factory, task):
    """The same index built in process: the reference the service must agree with."""
    sc = dict(task["scorer"])
    de = dict(task["de"])
    index, _ = build_and_load(tmp_path_factory.mktemp("ce-local") / "docs",
                              scorer=make_scorer(sc.pop("name"), **sc), dual_encoder=make_dual_encoder(de.pop("name"), **de),
                              items=task["items"], anchor_queries=task["anchors"], params={"k_i": 10, "chunk_size": 16})
    return index


def test_build_is_a_job_with_statistics(built, client):
    r = built["result"]
    assert r["calls"] == N_ITEMS * K_Q and r["k_q"] == K_Q and r["k_i"] == 10 and r["n_chunks"] == 3
    assert r["truncated_items"] > 0  # fixture answers exceed the tiny model's 64 tokens
    assert any(k["name"] == "crossencoder_build" and k["resumable"] for k in client.job_kinds())


def test_describe_and_list(built, client, task):
    d = client.describe_ce_index("docs")
    assert d["name"] == "docs" and d["n_items"] == N_ITEMS and d["k_q"] == K_Q and d["k_i"] == 10
    assert d["anchor_queries"] == task["anchors"] and len(d["anchor_item_ids"]) == 10
    assert d["scorer"]["spec"] == task["scorer"] and d["scorer"]["fingerprint"]["backend"] == "hf"
    assert d["build"]["stats"]["calls"] == N_ITEMS * K_Q
    assert set(d["modes"]) == {"cur", "adaptive", "adaptive-seeded", "rerank"}
    assert [i["name"] for i in client.list_ce_indexes()] == ["docs"]


@pytest.mark.parametrize("mode", ["cur", "adaptive", "adaptive-seeded", "rerank"])
def test_search_congruent_with_in_process_index(built, client, local_index, task, mode):
    for q in task["queries"][:3]:
        remote = client.ce_search("docs", q, k=5, mode=mode, budget=16)
        ref = local_index.search(q, k=5, params={"mode": mode, "budget": 16})
        np.testing.assert_array_equal(remote["ids"], ref.ids)
        np.testing.assert_allclose(remote["scores"], ref.scores, atol=1e-5)
        assert remote["calls"] == ref.calls == 16 and remote["mode"] == mode
        assert remote["scorer_seconds"] > 0 and remote["other_seconds"] >= 0
        assert remote["latency_seconds"] >= remote["scorer_seconds"] + remote["other_seconds"]


def test_search_batch_and_payloads(built, client, task):
    batch = client.ce_search_batch("docs", task["queries"], k=4, mode="adaptive", budget=12, with_payloads=True)
    assert len(batch) == len(task["queries"])
    for q, b in zip(task["queries"], batch, strict=True):
        one = client.ce_search("docs", q, k=4, mode="adaptive", budget=12)
        np.testing.assert_array_equal(b["ids"], one["ids"])
        assert b["payloads"] == [{"col": int(i) - 1000} for i in b["ids"]]


def test_exhaustive_budget_is_exact(built, client, local_index, task):
    q = task["queries"][0]
    r = client.ce_search("docs", q, k=N_ITEMS, mode="cur", budget=10_000)
    brute = local_index.scorer.score([q] * N_ITEMS, [it["text"] for it in task["items"]])
    assert r["calls"] == N_ITEMS
    np.testing.assert_allclose(r["scores"], np.sort(brute)[::-1], atol=1e-5)


def test_budget_unset_means_the_default_and_zero_is_refused(built, client, task):
    q = task["queries"][0]
    r = client.ce_search("docs", q, k=5, mode="adaptive")  # budget unset: the default, 100 calls
    assert r["calls"] == min(100, N_ITEMS)
    with pytest.raises(errors.InvalidArgument, match="budget is 0"):
        client.ce_search("docs", q, k=5, mode="adaptive", budget=0)
    with pytest.raises(errors.InvalidArgument, match="exceed the budget"):
        client.ce_search("docs", q, k=2, mode="cur", budget=4, k_i=5)


@pytest.mark.parametrize(
    "call,exc",
    [
        (lambda c: c.ce_search("nope", "q"), errors.NotFound),
        (lambda c: c.ce_search("docs", "q", k=10, budget=5), errors.InvalidArgument),
        (lambda c: c.ce_search("docs", "q", k=1, mode="cur", budget=1), errors.InvalidArgument),
        (lambda c: c.ce_search("docs", "q", k=1, budget=0), errors.InvalidArgument),
        (lambda c: c.ce_search_batch("docs", ["q"], k=1, budget=0), errors.InvalidArgument),
        (lambda c: c.ce_search("docs", "q", k=2, mode="cur", budget=4, k_i=5), errors.InvalidArgument),
        (lambda c: c.ce_search("docs", "q", mode="exhaustive"), errors.InvalidArgument),
        (lambda c: c.ce_search("docs", "   "), errors.InvalidArgument),
        (lambda c: c.ce_search("docs", "q", k=5000, budget=6000), errors.ResourceExhausted),
        (lambda c: c.ce_search_batch("docs", ["q"] * 300), errors.ResourceExhausted),
        (lambda c: c.ce_add_items("docs", [1000], ["dup"]), errors.AlreadyExists),
        (lambda c: c.ce_add_items("docs", [5], [""]), errors.InvalidArgument),
        (lambda c: c.ce_delete_items("docs", [424242]), errors.NotFound),
        (lambda c: c.ce_set_anchor_items("docs", anchor_method="best"), errors.InvalidArgument),
        (lambda c: c.drop_ce_index("nope"), errors.NotFound),
        (lambda c: c.describe_ce_index("bad/name"), errors.InvalidArgument),
    ],
)
def test_bad_input_statuses(built, client, call, exc):
    before = client.describe_ce_index("docs")
    with pytest.raises(exc):
        call(client)
    after = client.describe_ce_index("docs")
    assert after["n_items"] == before["n_items"] and after["k_i"] == before["k_i"]


def test_bad_builds_are_refused_at_start(built, client, task, tmp_path):
    ok = dict(anchor_queries=task["anchors"], items=task["items"][:5])
    with pytest.raises(errors.AlreadyExists):
        client.build_ce_index("docs", task["scorer"], **ok)
    with pytest.raises(errors.InvalidArgument, match="scorer.backend"):
        client.build_ce_index("x1", {"name": "bm25"}, **ok)
    with pytest.raises(errors.NotFound, match="does not exist"):
        client.build_ce_index("x2", {"name": "hf", "model_dir": str(tmp_path / "missing")}, **ok)
    with pytest.raises(errors.PermissionDenied, match="outside the folders clients may read"):
        client.build_ce_index("x5", {"name": "hf", "model_dir": "/etc"}, **ok)
    with pytest.raises(errors.PermissionDenied, match="outside the folders clients may read"):
        client.build_ce_index("x6", task["scorer"], anchor_queries=task["anchors"], items_path="/etc/passwd")
    with pytest.raises(errors.InvalidArgument, match="index name"):
        client.build_ce_index("../x", task["scorer"], **ok)
    with pytest.raises(errors.InvalidArgument, match="anchor_queries"):
        client.build_ce_index("x3", task["scorer"], items=task["items"][:5])
    with pytest.raises(errors.InvalidArgument, match="unknown solver"):
        client.build_ce_index("x4", task["scorer"], params={"solver": "lu"}, **ok)
    with pytest.raises(errors.InvalidArgument, match="kmeans-de"):
        client.build_ce_index("x6", task["scorer"], params={"anchor_method": "kmeans-de"}, **ok)
    # A job whose input is only found bad inside the body fails with the reason.
    job = client.build_ce_index("x5", task["scorer"], anchor_queries=task["anchors"],
                                items=[{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])
    assert job["state"] == "failed" and "duplicate" in job["error"]
    assert [i["name"] for i in client.list_ce_indexes()] == ["docs"]


def test_add_delete_and_reanchor(built, client, fx, task):
    new_ids = [2000, 2001, 2002]
    res = client.ce_add_items("docs", new_ids, [fx.items[100], fx.items[101], fx.items[102]], [{"n": 1}, None, None])
    assert res["added"] == 3 and res["calls"] == 3 * K_Q
    q = task["queries"][0]
    r = client.ce_search("docs", q, k=N_ITEMS + 3, mode="adaptive", budget=10_000)
    assert set(new_ids) <= set(r["ids"].tolist()) and r["calls"] == N_ITEMS + 3
    assert client.ce_delete_items("docs", new_ids) == 3
    r = client.ce_search("docs", q, k=N_ITEMS, mode="adaptive", budget=10_000)
    assert not set(new_ids) & set(r["ids"].tolist())
    before = client.describe_ce_index("docs")["build"]["stats"]["calls"]
    d = client.ce_set_anchor_items("docs", k_i=6, anchor_method="random", seed=3)
    assert d["k_i"] == 6 and d["build"]["params"]["anchor_method"] == "random"
    assert d["build"]["stats"]["calls"] == before  # re-anchoring costs no call
    client.ce_set_anchor_items("docs", k_i=10, anchor_method="qr", seed=0)


def test_index_survives_restart_and_crash(built, client, server, task):
    from retrieval.client import Client

    q = task["queries"][1]
    ref = client.ce_search("docs", q, k=5, mode="cur", budget=16)
    server.stop()
    server.start()
    with Client(server.address, timeout=60) as c2:
        r = c2.ce_search("docs", q, k=5, mode="cur", budget=16)
        np.testing.assert_array_equal(r["ids"], ref["ids"])
        c2.ce_add_items("docs", [3000], ["an item added before the crash"])
    server.kill()
    server.start()
    with Client(server.address, timeout=60) as c3:
        d = c3.describe_ce_index("docs")
        assert d["n_items"] == N_ITEMS + 1  # the acknowledged add survived SIGKILL
        c3.ce_delete_items("docs", [3000])
        r = c3.ce_search("docs", q, k=5, mode="cur", budget=16)
        np.testing.assert_array_equal(r["ids"], ref["ids"])


def test_drop(built, client, task):
    job = client.build_ce_index("tmp", task["scorer"], items=task["items"][:12], anchor_queries=task["anchors"][:3],
                                params={"k_i": 4})
    assert job["state"] == "succeeded"
    client.ce_search("tmp", "a question", k=3, budget=6)
    client.drop_ce_index("tmp")
    with pytest.raises(errors.NotFound):
        client.ce_search("tmp", "a question", k=3, budget=6)
    assert [i["name"] for i in client.list_ce_indexes()] == ["docs"]
