import threading

import numpy as np
import pytest

from retrieval.drafting import (ContextLookup, DraftBudget, ManagerConfig, Session, SessionLimits, SessionManager,
                                draft)
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


def manager(cat=None, **kw):
    return SessionManager(ManagerConfig(vocab_size=7, **kw), cat)


def test_session_loop_and_context(small_catalog):
    cat, _ = small_catalog
    m = manager(cat)
    s = m.open([1, 2, 3, 1, 2], datastore="tiny")
    assert [x.name for x in s.sources] == ["context", "corpus", "recycling", "history"]
    d = s.draft()
    assert len(d) > 0 and d.tokens[0] in (3, 4)
    s.append([3, 1])
    assert s.context.tolist() == [1, 2, 3, 1, 2, 3, 1] and s.output.tolist() == [3, 1]
    assert s.steps == 1
    m.close(s.session_id)
    assert m.history.store.n_tokens == 2  # the output went to the shared history
    with pytest.raises(FailedPrecondition):
        s.draft()
    with pytest.raises(NotFound):
        m.get(s.session_id)


@pytest.mark.parametrize("prompt,exc", [([], InvalidArgument), ([1, 7], InvalidArgument), ([-1], InvalidArgument),
                                        ([[1, 2]], InvalidArgument), ([1.5], InvalidArgument),
                                        (list(range(7)) * 10, ResourceExhausted)])
def test_bad_prompts(prompt, exc):
    m = manager(limits=SessionLimits(max_context_tokens=32))
    with pytest.raises(exc):
        m.open(prompt)
    assert len(m) == 0


def test_bad_appends_leave_the_session_usable():
    m = manager(limits=SessionLimits(max_context_tokens=12, max_append_tokens=4))
    s = m.open([1, 2, 3])
    for bad, exc in (([9], InvalidArgument), ([], InvalidArgument), ([1] * 5, InvalidArgument)):
        with pytest.raises(exc):
            s.append(bad)
    with pytest.raises(InvalidArgument):
        s.append([1, 2], topk=np.zeros((1, 3), int))  # wrong shape
    with pytest.raises(InvalidArgument):
        s.append([1, 2], topk=np.full((2, 3), 8))  # ids outside the vocabulary
    assert s.context.tolist() == [1, 2, 3]
    s.append([4, 5, 6, 1])
    s.append([2, 3, 4, 5])
    with pytest.raises(ResourceExhausted, match="max_context_tokens"):
        s.append([1, 2])
    assert len(s.context) == 11
    s.draft()  # still works


def test_unknown_sources_and_corpus_without_datastore(small_catalog):
    cat, _ = small_catalog
    m = manager(cat)
    with pytest.raises(InvalidArgument, match="unknown draft source .*; valid: "):
        m.open([1], sources=["bogus"])
    with pytest.raises(InvalidArgument, match="datastore"):
        m.open([1], sources=["corpus"])
    with pytest.raises(NotFound):
        m.open([1], datastore="missing")
    with pytest.raises(InvalidArgument):
        m.open([1], sources=["context", "context"])
    wrong = SessionManager(ManagerConfig(vocab_size=9), cat)
    with pytest.raises(FailedPrecondition, match="vocabulary"):
        wrong.open([1], datastore="tiny")
    fp = SessionManager(ManagerConfig(vocab_size=7, tokenizer_fingerprint="0" * 64), cat)
    fp.open([1], datastore="tiny")  # built from ids: no tokenizer fingerprint to compare


def test_idle_eviction_and_bounds():
    m = manager(idle_timeout_s=10, max_sessions=3)
    a, b, c = (m.open([1, 2]) for _ in range(3))
    with pytest.raises(ResourceExhausted, match="sessions"):
        m.open([1])
    b.last_used -= 100  # b went quiet
    assert m.evict_idle() == [b.session_id]
    assert m.history.store.n_tokens == 0  # an abandoned session is not learned from
    m.open([1])  # room again
    with pytest.raises(NotFound, match="evicted"):
        m.append(b.session_id, [1])
    # a full table evicts idle sessions on open
    a.last_used -= 100
    assert len(m) == 3
    m.open([3])
    assert len(m) == 3
    with pytest.raises(NotFound):
        m.get(a.session_id)
    m.get(c.session_id)


def test_total_memory_bound():
    m = manager(max_total_bytes=4000)
    s = m.open([1] * 10)
    per = s.nbytes()
    opened = [s]
    with pytest.raises(ResourceExhausted, match="max_total_bytes"):
        for _ in range(100):
            opened.append(m.open([1] * 10))
    assert len(opened) * per <= 4000 + per
    assert m.total_bytes() <= 4000


def test_sessions_are_isolated_under_threads():
    m = manager()
    errors = []

    def good(i):
        s = m.open([1, 2, 3, 1, 2])
        for _ in range(50):
            d = s.draft()
            s.append([int(d.tokens[0]) if len(d) else 1])
        m.close(s.session_id)

    def bad():
        s = m.open([1, 2])
        for _ in range(50):
            try:
                s.append([99])
            except InvalidArgument:
                pass
            else:
                errors.append("accepted a bad id")

    ts = [threading.Thread(target=good, args=(i,)) for i in range(6)] + [threading.Thread(target=bad)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert m.history.store.n_tokens == 6 * 50


def test_stateless_draft_and_limits():
    src = ContextLookup(max_ngram=3)
    d = draft([1, 2, 3, 4, 1, 2], DraftBudget.chain(3), [src])
    assert d.tokens.tolist() == [3, 4, 1] and d.is_chain
    with pytest.raises(InvalidArgument):
        draft([], DraftBudget(), [src])
    with pytest.raises(ResourceExhausted):
        draft([1] * 100, DraftBudget(), [src], max_context_tokens=50)
    with pytest.raises(InvalidArgument):
        draft([1, 2], {"max_nodes": 4}, [src])
    with pytest.raises(InvalidArgument):
        draft([1, 40], DraftBudget(), [src], vocab_size=10)


def test_session_budget_respected(small_catalog):
    cat, _ = small_catalog
    m = manager(cat)
    s = m.open([1, 2, 3, 1, 2, 4, 5, 1, 2, 3, 6], datastore="tiny")
    for b in (DraftBudget(1, 1), DraftBudget(3, 2), DraftBudget(64, 10), DraftBudget.chain(4)):
        d = s.draft(b)
        assert len(d) <= b.max_nodes and (len(d) == 0 or d.depths().max() <= b.max_depth)
        if not b.tree:
            assert d.is_chain


def test_session_vocab_check_against_sources():
    from retrieval.drafting import RecyclingSource

    with pytest.raises(FailedPrecondition):
        Session([1], [RecyclingSource(vocab_size=5)], vocab_size=7)


def test_deferred_feedback_matches_immediate():
    from retrieval.drafting import Calibrator

    seq = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 6, 1, 2, 3, 4]
    tables = []
    for defer in (False, True):
        cal = Calibrator()
        s = Session(seq[:4], [ContextLookup()], vocab_size=7, calibrator=cal)
        for i in range(4, len(seq)):
            s.draft()
            s.append([seq[i]], defer_feedback=defer)
            s.flush_feedback()
        tables.append(cal.table("context"))
    assert np.array_equal(tables[0][0], tables[1][0]) and np.array_equal(tables[0][1], tables[1][1])
    assert tables[0][1].sum() > 0


def test_manager_refuses_growth_past_total_bytes():
    m = manager(max_total_bytes=3000, limits=SessionLimits(max_context_tokens=4096))
    s = m.open([1] * 60)  # 256-byte buffer
    with pytest.raises(ResourceExhausted, match="max_total_bytes"):
        for _ in range(100):
            m.append(s.session_id, [1] * 60)
    assert m.total_bytes() <= 3000
