"""Faults of issue 19, each against a real loopback server: silent streams after eviction, per-tokenizer
state slots, tokenizer fingerprints, what the service serves (recycling warm start), the draft gauges."""

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from retrieval.client import Client
from retrieval.drafting import DatastoreCatalog, DraftBudget, ManagerConfig, SessionManager
from retrieval.drafting.engine import DraftsEngine
from retrieval.drafting.tokenizer import Tokenizer, tokenizer_fingerprint, vocab_fingerprint
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

REPO = Path(__file__).resolve().parents[2]
TOK_DIR = REPO / "bench" / "datasets" / "drafting" / "tokenizer"
DOCS = [[1, 2, 3, 1, 2, 4, 5], [2, 3, 1, 2, 3, 6], [0, 1, 2, 3, 1, 2, 4], [5, 5, 5, 1, 2]]
IDLE_S = 1.0
MAX_SESSIONS = 4  # limits.max_sessions: admission slots of session streams
FP_A = vocab_fingerprint([f"a{i}" for i in range(7)])  # two made-up tokenizers of the same size
FP_B = vocab_fingerprint([f"b{i}" for i in range(7)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from retrieval.server.process import ServerProcess

    allowed = json.dumps([str(tmp_path_factory.getbasetemp()), str(REPO / "bench")])
    srv = ServerProcess(tmp_path_factory.mktemp("drafts_faults") / "data",
                        env={"RETRIEVAL_DRAFTS__IDLE_TIMEOUT_S": str(IDLE_S),
                             "RETRIEVAL_LIMITS__MAX_SESSIONS": str(MAX_SESSIONS),
                             "RETRIEVAL_METRICS_PORT": str(_free_port()),
                             "RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": allowed})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("ids") / "docs.ids"
    f.write_text("\n".join(" ".join(map(str, d)) for d in DOCS) + "\n")
    return f


@pytest.fixture(scope="module")
def stores(client, ids_file):
    """'plain' (ids, no tokenizer recorded) and 'tok_a' (the same ids, made by tokenizer A)."""
    for name, fp in (("plain", None), ("tok_a", FP_A)):
        job = client.build_datastore(name, [str(ids_file)], vocab_size=7, tokenizer_fingerprint=fp)
        assert job["state"] == "succeeded", job
    return ids_file


def _wait_evicted(client, sessions, timeout=IDLE_S + 6.0):
    """Until the server has ended every given silent stream (the sweeper runs every 0.25 s here)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            with client.draft_session([1, 2], vocab_size=7):
                return
        except ResourceExhausted:
            time.sleep(0.2)
    raise AssertionError("the evicted sessions still hold their admission slots")


# --- silent streams after eviction --------------------------------------------------------------------
def test_silent_streams_release_their_slots_when_evicted(client):
    """Fault: with every session slot held by silent streams, eviction closed the sessions but not the
    streams, so every new session was refused for good. Now the server ends an evicted session's stream
    with NOT_FOUND at once."""
    silent = [client.draft_session([1, 2, 3], vocab_size=7) for _ in range(MAX_SESSIONS)]
    with pytest.raises(ResourceExhausted, match="sessions are open"):
        client.draft_session([1, 2], vocab_size=7)
    t0 = time.monotonic()
    _wait_evicted(client, silent)
    assert time.monotonic() - t0 < IDLE_S + 5.0
    for s in silent:  # each stream was ended by the server with NOT_FOUND
        with pytest.raises(NotFound, match=r"was evicted after 1s idle; open a new session"):
            s.append([1])
        assert s.closed


def test_active_sessions_are_not_evicted(client):
    s = client.draft_session([1, 2, 3], vocab_size=7)
    for _ in range(8):  # 2.4 s of activity, more than twice the idle timeout
        s.append([1])
        time.sleep(0.3)
    assert s.step == 8
    s.close()


# --- state slots --------------------------------------------------------------------------------------
def test_unused_state_slots_are_freed(client):
    """Fault: seven opens with made-up vocab_size values filled the 8 per-vocabulary slots for good and a
    real vocabulary was refused until restart. Unused slots (no session) are now freed, least recently
    used first."""
    for v in range(101, 111):  # ten made-up vocabularies, more than the 8 slots
        with client.draft_session([1, 2], vocab_size=v) as s:
            s.append([3])
    with client.draft_session([1, 2, 3], vocab_size=32001) as s:  # a real vocabulary still gets a slot
        assert s.append([4]) is not None


def test_engine_frees_least_recently_used_slot(tmp_path):
    eng = DraftsEngine(tmp_path, max_vocabularies=3)
    a = eng.manager(10, "fp-a")
    s = a.open([1, 2])
    eng.manager(11)
    eng.manager(12)
    eng.manager(13)  # frees 11 (least recently used, no session)
    keys = set(eng._managers)
    assert (10, "fp-a") in keys and (11, None) not in keys and (13, None) in keys
    assert eng.manager(10, "fp-a") is a  # kept: it has an open session
    b = eng.manager(12).open([1])
    c = eng.manager(13).open([1])
    with pytest.raises(ResourceExhausted, match="with open draft sessions, the maximum is 3"):
        eng.manager(14)
    eng.manager(13).close(c.session_id)
    eng.manager(14)  # 13 had no session any more
    assert eng.freed == 2
    a.close(s.session_id)
    eng.manager(12).close(b.session_id)


# --- tokenizers -----------------------------------------------------------------------------------------
def test_fingerprint_is_the_same_for_every_form_of_a_tokenizer():
    sp = Tokenizer(TOK_DIR / "tokenizer.model")
    tj = Tokenizer(TOK_DIR / "tokenizer.json")
    assert sp.vocab_fingerprint == tj.vocab_fingerprint
    assert tokenizer_fingerprint(str(TOK_DIR / "tokenizer.model")) == sp.vocab_fingerprint
    assert tokenizer_fingerprint(sp.vocab_fingerprint) == sp.vocab_fingerprint
    assert tokenizer_fingerprint(sp._sp) == sp.vocab_fingerprint  # a sentencepiece processor
    assert tokenizer_fingerprint(tj._tk) == sp.vocab_fingerprint  # a tokenizers.Tokenizer
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(TOK_DIR / "tokenizer.json"))
    assert tokenizer_fingerprint(hf) == sp.vocab_fingerprint
    # another vocabulary of the same size (e.g. Mistral vs LLaMA) differs
    other = dict(hf.get_vocab())
    tok = next(iter(other))
    other[tok + "x"] = other.pop(tok)
    assert vocab_fingerprint(other) != sp.vocab_fingerprint
    with pytest.raises(InvalidArgument, match="neither a fingerprint"):
        tokenizer_fingerprint("/no/such/tokenizer.model")


def test_datastore_of_another_tokenizer_is_refused(client, stores):
    """Fault: state was keyed by vocab_size only and sessions named no tokenizer, so a datastore of another
    tokenizer of the same size was used without a word."""
    assert client.describe_datastore("tok_a")["tokenizer_fingerprint"] == FP_A
    assert client.describe_datastore("plain")["tokenizer_fingerprint"] == ""
    with pytest.raises(FailedPrecondition) as e:
        client.draft_session([1, 2], vocab_size=7, datastore="tok_a", tokenizer=FP_B)
    assert f"built with the tokenizer of fingerprint {FP_A}, but the session names tokenizer {FP_B}" in str(e.value)
    with pytest.raises(FailedPrecondition, match=FP_A):
        client.draft([1, 2], vocab_size=7, datastore="tok_a", tokenizer=FP_B)
    with client.draft_session([1, 2], vocab_size=7, datastore="tok_a", tokenizer=FP_A) as s:
        assert len(s.draft) > 0
    with client.draft_session([1, 2], vocab_size=7, datastore="tok_a") as s:  # unnamed: the old behaviour
        assert len(s.draft) > 0
    with client.draft_session([1, 2], vocab_size=7, datastore="plain", tokenizer=FP_B) as s:  # nothing recorded
        assert len(s.draft) > 0


def test_learned_state_is_kept_per_tokenizer(client):
    """Two tokenizers of one size no longer share history (nor recycling, calibration)."""
    out = [6, 0, 6, 0, 3]
    with client.draft_session([4, 4, 5], vocab_size=7, sources=["context", "history"], tokenizer="hist-a") as s:
        s.append(out)
    ctx = [4, 6, 0]
    assert set(client.draft(ctx, vocab_size=7, sources=["history"], tokenizer="hist-a").tokens.tolist()) <= {6, 3, 0}
    assert len(client.draft(ctx, vocab_size=7, sources=["history"], tokenizer="hist-a")) > 0
    assert len(client.draft(ctx, vocab_size=7, sources=["history"], tokenizer="hist-b")) == 0
    assert len(client.draft(ctx, vocab_size=7, sources=["history"], tokenizer=None)) == 0
    assert len(client.draft_batch([ctx], vocab_size=7, sources=["history"], tokenizer="hist-b")[0]) == 0


def test_text_datastore_records_the_fingerprint_sessions_name(client, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    f = tmp_path_factory.mktemp("text") / "docs.txt"
    f.write_text("The cat sat on the mat. The cat sat on the hat.\n")
    job = client.build_datastore("text_llama", [str(f)], tokenizer=str(TOK_DIR / "tokenizer.model"))
    assert job["state"] == "succeeded", job
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(TOK_DIR / "tokenizer.json"))
    assert client.describe_datastore("text_llama")["tokenizer_fingerprint"] == tokenizer_fingerprint(hf)
    ids = hf.encode("The cat sat on the", add_special_tokens=False)
    with client.draft_session(ids, vocab_size=32000, datastore="text_llama", tokenizer=hf) as s:
        assert len(s.draft) > 0
    with pytest.raises(FailedPrecondition, match="built with the tokenizer of fingerprint"):
        client.draft_session(ids, vocab_size=32000, datastore="text_llama", tokenizer="mistral-like")


# --- what the service serves ------------------------------------------------------------------------------
def test_server_warm_starts_recycling_as_reported(client, stores, tmp_path):
    """Fault: the README's figure came from managers whose recycling matrix was warm-started from the
    corpus; the server never did that. Now a server manager warm-starts when it first uses a datastore,
    and a fresh server-side state gives exactly the in-process drafts of that configuration."""
    cat = DatastoreCatalog(tmp_path / "stores")
    cat.build("plain", [str(stores)], vocab_size=7)
    local = SessionManager(ManagerConfig(vocab_size=7, warm_start_recycling=True, history_rebuild_fraction=0.05), cat)
    out = [1, 2, 4, 5, 2, 3, 1, 2, 3, 6]
    srcs = ["context", "recycling", "history", "corpus"]
    ls = local.open([5, 1], sources=srcs, datastore="plain", budget=DraftBudget(16, 4))
    with client.draft_session([5, 1], vocab_size=7, datastore="plain", sources=srcs, max_nodes=16, max_depth=4,
                              tokenizer="warm-congruence") as rs:  # a fresh state slot on the server
        remote, mine, i = rs.draft, ls.draft(), 0
        assert "recycling" in mine.sources  # the warm matrix proposes from the first step
        while i < len(out):
            assert remote.tokens.tolist() == mine.tokens.tolist()
            assert remote.parents.tolist() == mine.parents.tolist()
            np.testing.assert_allclose(remote.probs, mine.probs, rtol=1e-6)
            a = min(mine.accepted_length(out[i:i + 4]), len(out) - i - 1)
            ls.append(out[i:i + a + 1], defer_feedback=True)
            mine = ls.draft()
            ls.flush_feedback()
            remote = rs.append(out[i:i + a + 1])
            i += a + 1
    assert local.warm_started_from == "plain"


# --- many clients -----------------------------------------------------------------------------------------
def test_history_contribution_of_a_session_is_bounded(tmp_path):
    m = SessionManager(ManagerConfig(vocab_size=7, history_max_session_tokens=5))
    s = m.open([1, 2])
    s.append([3, 4, 5, 6, 0, 1, 2, 3, 4, 5])
    m.close(s.session_id)
    assert m.history.store.n_tokens == 5
    assert m.stats()["history_max_session_tokens"] == 5


def test_datastore_is_mapped_once_and_shared(tmp_path, ids_file):
    eng = DraftsEngine(tmp_path)
    eng.catalog.build("plain", [str(ids_file)], vocab_size=7)
    a = eng.manager(7, "fp-1").open([1, 2], datastore="plain")
    b = eng.manager(7, "fp-2").open([1, 2], datastore="plain")
    c = eng.manager(7).open([1, 2], datastore="plain")
    ds = [next(src.ds for src in s.sources if src.name == "corpus") for s in (a, b, c)]
    assert ds[0] is ds[1] is ds[2] and not ds[0].tokens.flags.writeable
    st = eng.stats()
    assert st["sessions"] == 3 and st["session_bytes"] == sum(s.nbytes() for s in (a, b, c)) and st["managers"] == 3


def test_draft_gauges_are_exported(server, client):
    """Fault: retrieval_draft_sessions was documented in server/metrics.py but never exported."""
    port = int(server.env["RETRIEVAL_METRICS_PORT"])
    open_ = [client.draft_session([1, 2, 3], vocab_size=7, tokenizer="gauge") for _ in range(2)]
    try:
        t_end, text = time.monotonic() + 8.0, ""
        while time.monotonic() < t_end:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
                     if ln.startswith("retrieval_draft_")}
            if lines.get("retrieval_draft_sessions") == 2.0:
                break
            for s in open_:
                s.append([1])  # keep them from being evicted
            time.sleep(0.3)
        assert lines.get("retrieval_draft_sessions") == 2.0, text[-2000:]
        assert lines["retrieval_draft_session_bytes"] > 0 and lines["retrieval_draft_session_max_bytes"] > 0
        assert 1 <= lines["retrieval_draft_state_slots"] <= 8
    finally:
        for s in open_:
            s.close()


def test_many_silent_clients_cannot_lock_out_a_new_one(client):
    """Many threads each open a session and go silent; after the idle timeout a new client is served."""
    held, lock = [], threading.Lock()

    def run():
        try:
            s = client.draft_session([1, 2, 3], vocab_size=7)
            with lock:
                held.append(s)
        except ResourceExhausted:
            pass

    ths = [threading.Thread(target=run) for _ in range(2 * MAX_SESSIONS)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert len(held) == MAX_SESSIONS
    _wait_evicted(client, held)
