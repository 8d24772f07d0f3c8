"""The Drafts service over a real loopback server: sessions, stateless drafts, datastores, statuses."""

import json
from pathlib import Path
import threading
import time

import grpc
import numpy as np
import pytest

from retrieval.client import Client
from retrieval.drafting import DraftBudget, ManagerConfig, SessionManager
from retrieval.drafting import convert as dconv
from retrieval.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from retrieval.v1 import drafts_pb2

DOCS = [[1, 2, 3, 1, 2, 4, 5], [2, 3, 1, 2, 3, 6], [0, 1, 2, 3, 1, 2, 4], [5, 5, 5, 1, 2]]
IDLE_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from retrieval.server.process import ServerProcess

    # clients may name files under the test's temporary folders and the shipped datasets
    allowed = json.dumps([str(tmp_path_factory.getbasetemp()), str(Path(__file__).resolve().parents[2] / "bench")])
    srv = ServerProcess(tmp_path_factory.mktemp("drafts") / "data",
                        env={"RETRIEVAL_DRAFTS__IDLE_TIMEOUT_S": str(IDLE_S), "RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": allowed})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(client, tmp_path_factory):
    f = tmp_path_factory.mktemp("ids") / "docs.ids"
    f.write_text("\n".join(" ".join(map(str, d)) for d in DOCS) + "\n")
    job = client.build_datastore("tiny", [str(f)], vocab_size=7)
    assert job["state"] == "succeeded", job
    return f


def test_convert_round_trips():
    d = dconv.draft_from_proto(dconv.draft_to_proto(
        __import__("retrieval.drafting", fromlist=["Draft"]).Draft([5, 6, 7], [-1, 0, -1], [0.5, 0.25, 0.125],
                                                                   [0, 1, 0], ("context", "corpus"))))
    assert d.tokens.tolist() == [5, 6, 7] and d.parents.tolist() == [-1, 0, -1] and d.sources == ["context", "corpus", "context"]
    b = DraftBudget(12, 3, tree=False)
    assert dconv.budget_from_proto(dconv.budget_to_proto(b)) == b
    assert dconv.budget_from_proto(drafts_pb2.DraftBudget()) == DraftBudget()
    o = dconv.open_from_proto(dconv.open_to_proto([1, 2], 7, "tiny", ["context"], b).open)
    assert o["prompt_ids"].tolist() == [1, 2] and o["vocab_size"] == 7 and o["datastore"] == "tiny" and o["budget"] == b
    a = dconv.append_from_proto(dconv.append_to_proto([3, 4], np.array([[1, 2], [3, -1]]), b).append)
    assert a["accepted_ids"].tolist() == [3, 4] and a["topk"].tolist() == [[1, 2], [3, -1]] and a["budget"] == b
    assert dconv.append_from_proto(dconv.append_to_proto([3]).append)["budget"] is None
    assert dconv.close_from_proto(dconv.close_to_proto(True).close) == {"record": False}
    with pytest.raises(InvalidArgument):
        dconv.append_from_proto(drafts_pb2.AppendTokens(accepted_ids=[1, 2], topk_ids=[1, 2, 3], topk_k=2))
    r = dconv.draft_request_from_proto(dconv.draft_request_to_proto([1, 2, 3], 7, None, None, b))
    assert r["context_ids"].tolist() == [1, 2, 3] and r["datastore"] is None and r["sources"] is None
    p = dconv.build_request_from_proto(dconv.build_request_to_proto("x", ["a", "b"], "t.model", None, "json", ["q"]))
    assert p == {"name": "x", "inputs": ["a", "b"], "input_format": "json", "overwrite": False, "tokenizer": "t.model",
                 "text_fields": ["q"]}
    m = {"name": "x", "n_tokens": 5, "n_docs": 2, "vocab_size": 7, "bytes_on_disk": 9,
         "tokenizer": {"fingerprint": "file-sha", "vocab_fingerprint": "vocab-sha256:ab"}}
    back = dconv.datastore_info_from_proto(dconv.datastore_info_to_proto(m))
    assert back["tokenizer_fingerprint"] == "vocab-sha256:ab" and back["n_tokens"] == 5 and back["bytes_on_disk"] == 9
    # the tokenizer fingerprint travels on open, stateless and build requests ("" = none)
    o = dconv.open_from_proto(dconv.open_to_proto([1], 7, tokenizer_fingerprint="fp-a").open)
    assert o["tokenizer_fingerprint"] == "fp-a"
    assert dconv.open_from_proto(dconv.open_to_proto([1], 7).open)["tokenizer_fingerprint"] is None
    r = dconv.draft_request_from_proto(dconv.draft_request_to_proto([1], 7, tokenizer_fingerprint="fp-b"))
    assert r["tokenizer_fingerprint"] == "fp-b"
    p = dconv.build_request_from_proto(dconv.build_request_to_proto("x", ["a"], vocab_size=7, tokenizer_fingerprint="fp"))
    assert p["tokenizer_fingerprint"] == "fp"
    # an error reply round-trips to the package's exception
    e = dconv.session_error_from_proto(dconv.session_error_to_proto(InvalidArgument("bad ids"),
                                                                    drafts_pb2.SessionReply()).error)
    assert isinstance(e, InvalidArgument) and str(e) == "bad ids"


@pytest.mark.parametrize("ids", [[1, 2**31], [2**40], [1.5, 2.0], [-2]])
def test_ids_outside_int32_are_refused_by_name(ids):
    """ids >= 2**31 used to escape as protobuf's raw ValueError; now InvalidArgument naming the argument."""
    for build, what in ((lambda: dconv.open_to_proto(ids, 7), "prompt_ids"),
                        (lambda: dconv.append_to_proto(ids), "accepted_ids"),
                        (lambda: dconv.draft_request_to_proto(ids, 7), "context_ids")):
        with pytest.raises(InvalidArgument, match=what):
            build()


def test_datastore_management(client, tiny):
    names = [d["name"] for d in client.list_datastores()]
    assert "tiny" in names
    info = client.describe_datastore("tiny")
    assert info["n_docs"] == 4 and info["vocab_size"] == 7 and info["n_tokens"] == sum(map(len, DOCS))
    with pytest.raises(AlreadyExists):
        client.build_datastore("tiny", [str(tiny)], vocab_size=7)
    with pytest.raises(InvalidArgument):
        client.build_datastore("bad/name", [str(tiny)], vocab_size=7)
    with pytest.raises(InvalidArgument):
        client.build_datastore("novocab", [str(tiny)])
    from retrieval.errors import PermissionDenied

    with pytest.raises(PermissionDenied, match="outside the folders clients may read"):
        client.build_datastore("escape", ["/etc/passwd"], vocab_size=7)
    with pytest.raises(PermissionDenied, match="outside the folders clients may read"):
        client.build_datastore("escape", [str(tiny)], tokenizer="/etc/hostname")
    failed = client.build_datastore("small", [str(tiny)], vocab_size=6)  # ids outside the vocabulary
    assert failed["state"] == "failed" and "outside the vocabulary" in failed["error"]
    with pytest.raises(NotFound):
        client.describe_datastore("nope")
    with pytest.raises(NotFound):
        client.drop_datastore("nope")
    job = client.build_datastore("tmp", [str(tiny)], vocab_size=7)
    assert job["state"] == "succeeded" and json.loads(json.dumps(job["result"]))["n_docs"] == 4
    client.drop_datastore("tmp")
    assert "tmp" not in [d["name"] for d in client.list_datastores()]


def test_session_stream_and_history(client, tiny):
    with client.draft_session([1, 2, 3, 1, 2], vocab_size=7, datastore="tiny", max_nodes=8, max_depth=3) as s:
        d = s.draft
        assert 0 < len(d) <= 8 and d.depths().max() <= 3 and d.tokens[0] in (3, 4)
        d = s.append([3, 1])
        assert s.step == 1 and len(d) <= 8
        d = s.append([2, 6], max_nodes=2, chain=True)
        assert d.is_chain and len(d) <= 2
    # the finished output [3, 1, 2, 6] is now in the shared history of vocabulary 7
    d = client.draft([5, 3, 1, 2], vocab_size=7, sources=["history"], max_nodes=4)
    assert d.tokens.tolist()[:1] == [6] and set(d.sources) == {"history"}
    batch = client.draft_batch([[1, 2], [2, 3], [5]], vocab_size=7, datastore="tiny", sources=["corpus"], chain=True)
    assert len(batch) == 3 and all(b.is_chain for b in batch)
    assert batch[0].tokens.tolist()[:1] == [3]


def test_session_matches_in_process_congruence(client):
    """The same generation through gRPC and through an in-process manager gives identical drafts."""
    from bench.drafts.data import load_turns

    turns = load_turns()[:3]
    local = SessionManager(ManagerConfig(vocab_size=32000, history_rebuild_fraction=0.05))
    for t in turns:
        ls = local.open(t.prompt, sources=["context", "recycling", "history"], budget=DraftBudget(32, 6))
        with client.draft_session(t.prompt, 32000, sources=["context", "recycling", "history"], max_nodes=32,
                                  max_depth=6) as rs:
            out, i = t.output, 0
            remote, mine = rs.draft, ls.draft()
            while i < min(len(out), 200):
                assert remote.tokens.tolist() == mine.tokens.tolist()
                assert remote.parents.tolist() == mine.parents.tolist()
                np.testing.assert_allclose(remote.probs, mine.probs, rtol=1e-6)
                a = min(mine.accepted_length(out[i:i + 7].tolist()), len(out) - i - 1)
                # the server's order: append (calibration deferred), draft, reply, then learn
                ls.append(out[i:i + a + 1], defer_feedback=True)
                mine = ls.draft()
                ls.flush_feedback()
                remote = rs.append(out[i:i + a + 1])
                i += a + 1
        local.close(ls.session_id)


@pytest.mark.parametrize("prompt,kw,exc", [
    ([], {}, InvalidArgument),
    ([1, 9], {}, InvalidArgument),
    ([1, 2], {"max_nodes": 5000}, InvalidArgument),
    ([1, 2], {"max_depth": 1000}, InvalidArgument),
    ([1, 2], {"sources": ["bogus"]}, InvalidArgument),
    ([1, 2], {"datastore": "missing"}, NotFound),
    ([1] * 40000, {}, ResourceExhausted),
])
def test_open_errors(client, tiny, prompt, kw, exc):
    with pytest.raises(exc):
        client.draft_session(prompt, vocab_size=7, **kw)


def test_datastore_of_another_vocabulary(client, tiny):
    with pytest.raises(FailedPrecondition, match="vocabulary"):
        client.draft_session([1, 2], vocab_size=50, datastore="tiny")
    with pytest.raises(InvalidArgument):
        client.draft_session([1, 2], vocab_size=0)


def test_append_errors_keep_the_session_and_isolation(client, tiny):
    """A refused message gets an error reply; the session stays open and as it was (it used to end the
    stream and lose the session)."""
    good = client.draft_session([1, 2, 3], vocab_size=7, datastore="tiny")
    ref = client.draft_session([1, 2, 3], vocab_size=7, sources=["context"])
    s = client.draft_session([1, 2, 3], vocab_size=7, sources=["context"])
    for bad, kw, msg in (([9], {}, r"accepted_ids\[0\] = 9 is outside the vocabulary \[0, 7\)"),
                         ([], {}, "accepted_ids is empty"),
                         ([1, 2], {"topk": np.array([[1, 2, 3]])}, r"topk_ids has 3 ids; expected .* = 2 x 3"),
                         ([1] * 40000, {}, "more than max_append_tokens"),
                         ([1], {"max_nodes": 5000}, "max_nodes"),
                         ([1, 2**31], {}, r"accepted_ids\[1\] = 2147483648")):  # refused by the client
        with pytest.raises(InvalidArgument, match=msg):
            s.append(bad, **kw)
        assert not s.closed and s.step == 0
    d, dr = s.append([1, 2]), ref.append([1, 2])  # continues exactly as a session that never saw the bad ones
    assert s.step == 1 and d.tokens.tolist() == dr.tokens.tolist() and d.parents.tolist() == dr.parents.tolist()
    s.close()
    ref.close()
    # the other session is unaffected
    d = good.append([1, 2])
    assert good.step == 1 and len(d) > 0
    good.close()


def test_stream_protocol_errors_are_error_replies(client):
    """Protocol errors are answered on the stream (reply.error) and the stream goes on."""
    stub = client._drafts_stub()
    import grpc

    replies = list(stub.Session(iter([dconv.append_to_proto([1]), drafts_pb2.SessionRequest(),
                                      dconv.open_to_proto([1, 2], 7), dconv.open_to_proto([1], 7),
                                      dconv.append_to_proto([9]), dconv.append_to_proto([3]),
                                      dconv.close_to_proto(discard=True)])))
    codes = [r.error.code for r in replies]
    fp, ia = grpc.StatusCode.FAILED_PRECONDITION.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes == [fp, ia, 0, fp, ia, 0, 0]
    assert "first message of a draft session must be 'open'" in replies[0].error.message
    assert "already open on this stream" in replies[3].error.message
    assert replies[2].session_id and all(r.session_id == replies[2].session_id for r in replies[3:])
    assert [r.step for r in replies[2:]] == [0, 0, 0, 1, 1]
    assert not replies[4].HasField("draft") and replies[5].HasField("draft")
    # a failed open leaves no session: the stream ends with the status
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Session(iter([dconv.open_to_proto([1, 9], 7)])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_ids[1] = 9" in e.value.details()


def test_vanished_client_is_not_recorded_and_idle_sessions_are_evicted(client):
    s = client.draft_session([4, 4, 4], vocab_size=11)
    s.append([8, 9, 10])
    s.abort()  # the client vanishes mid-generation
    idle = client.draft_session([1, 2], vocab_size=11)
    time.sleep(IDLE_S + 2.5)
    with pytest.raises(NotFound, match="evicted after 3s idle"):
        idle.append([3])
    assert idle.closed
    d = client.draft([7, 8, 9], vocab_size=11, sources=["history"])
    assert len(d) == 0  # neither the aborted nor the evicted session was learned from


def test_many_concurrent_sessions(client, tiny):
    n = 128
    errors = []
    done = []

    def run(k):
        try:
            with client.draft_session([1, 2, 3, 1, 2, k % 7], vocab_size=7, datastore="tiny", max_nodes=16) as s:
                for step in range(5):
                    d = s.append([int(d0) for d0 in (s.draft.tokens[:1] if len(s.draft) else [1])])
                    assert len(d) <= 16
            done.append(k)
        except Exception as e:  # collected and reported below
            errors.append(repr(e))

    ths = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert not errors, errors[:3]
    assert len(done) == n


def test_datastore_survives_restart(server, client, tiny):
    s = client.draft_session([1, 2], vocab_size=7)
    server.kill()  # a crash: no shutdown code runs (a graceful stop could evict the idle session first)
    server.start()
    with Client(server.address, timeout=60) as c2:
        assert "tiny" in [d["name"] for d in c2.list_datastores()]
        d = c2.draft([1, 2], vocab_size=7, datastore="tiny", sources=["corpus"])
        assert len(d) > 0
    from retrieval.errors import Unavailable

    with pytest.raises(Unavailable) as e:
        s.append([3])  # the old stream died with the old process
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and str(e.value) and s.closed
