"""The delta buffer vs a naive dict model under random operation sequences (seeded)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.vectors.delta import NO_ID, Delta

D = 6


def brute(model: dict, xq: np.ndarray, k: int, metric: str, allowed=None):
    items = [(i, v) for i, (v, _) in model.items() if allowed is None or i in allowed]
    out_d = np.full((len(xq), k), np.inf)
    out_i = np.full((len(xq), k), NO_ID, np.uint64)
    if not items:
        return out_d, out_i
    ids = np.array([i for i, _ in items], np.uint64)
    xb = np.stack([v for _, v in items]).astype(np.float64)
    q = xq.astype(np.float64)
    dist = ((q[:, None, :] - xb[None]) ** 2).sum(-1) if metric == "l2" else 1 - q @ xb.T
    kk = min(k, len(ids))
    order = np.argsort(dist, axis=1, kind="stable")[:, :kk]
    out_d[:, :kk] = np.take_along_axis(dist, order, 1)
    out_i[:, :kk] = ids[order]
    return out_d, out_i


def check_search(delta: Delta, model: dict, rng, metric: str):
    xq = rng.standard_normal((3, D)).astype(np.float32)
    k = int(rng.integers(1, 12))
    allowed = None
    if rng.random() < 0.4 and model:
        keys = np.array(sorted(model), np.uint64)
        allowed = set(rng.choice(keys, size=max(1, len(keys) // 3), replace=False).tolist()) | {2**63 + 999}
    Dg, Ig = delta.search(xq, k, metric, None if allowed is None else np.array(sorted(allowed), np.uint64))
    Dr, Ir = brute(model, xq, k, metric, allowed)
    assert Dg.shape == (3, k) and Ig.dtype == np.uint64
    fin = np.isfinite(Dr)
    assert (np.isfinite(Dg) == fin).all()
    np.testing.assert_allclose(Dg[fin], Dr[fin], rtol=1e-4, atol=1e-4)
    assert (Ig[~fin] == NO_ID).all()
    # ids may differ only within float ties
    for r in range(3):
        for j in np.flatnonzero(Ig[r] != Ir[r]):
            assert abs(Dg[r, j] - Dr[r, j]) < 1e-4


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_random_operations_match_dict_model(seed, metric):
    rng = np.random.default_rng(seed)
    delta = Delta(D)
    model: dict[int, tuple[np.ndarray, int]] = {}   # id -> (vector, seq)
    universe = np.array([0, 1, 2, 3, 2**63 - 1, 2**63, 2**64 - 2] + list(range(10, 400)), np.uint64)
    seq = 0
    for step in range(300):
        op = rng.choice(["put", "put", "drop", "take", "search"])
        if op == "put":
            m = int(rng.integers(1, 80))
            ids = rng.choice(universe, size=m, replace=False)
            x = rng.standard_normal((m, D)).astype(np.float32)
            seq += 1
            delta.put(ids, x, seq)
            for i, v in zip(ids.tolist(), x):
                model[i] = (v, seq)
        elif op == "drop":
            ids = rng.choice(universe, size=int(rng.integers(1, 60)), replace=False)
            n = delta.drop(ids)
            assert n == sum(i in model for i in ids.tolist())
            for i in ids.tolist():
                model.pop(i, None)
        elif op == "take":
            rows, ids, vx = delta.take(int(rng.integers(1, 100)))
            assert len(set(ids.tolist())) == len(ids)
            for i, v in zip(ids.tolist(), vx):
                assert np.array_equal(model[i][0], v)  # only live, current rows are handed out
            # FIFO: the first row handed out is the oldest alive one
            if len(ids):
                assert model[int(ids[0])][1] == min(s for _, s in model.values())
            if rng.random() < 0.8:
                delta.consume(rows)
                for i in ids.tolist():
                    del model[i]
        else:
            check_search(delta, model, rng, metric)
        # invariants after every step
        assert len(delta) == len(model)
        live_ids, live_x, live_s = delta.live_arrays()
        assert sorted(live_ids.tolist()) == sorted(model)
        for i, v, s in zip(live_ids.tolist(), live_x, live_s.tolist()):
            assert np.array_equal(model[i][0], v) and model[i][1] == s
        assert delta.min_seq() == (min(s for _, s in model.values()) if model else None)
    check_search(delta, model, rng, metric)


def test_take_does_not_remove_and_consume_does():
    delta = Delta(2)
    delta.put(np.array([5, 6, 7], np.uint64), np.eye(3, 2, dtype=np.float32), 1)
    rows, ids, _ = delta.take(2)
    assert ids.tolist() == [5, 6] and len(delta) == 3
    delta.consume(rows)
    assert len(delta) == 1 and delta.live_arrays()[0].tolist() == [7]
    # replacing an id moves it to the back with its new seq
    delta.put(np.array([8], np.uint64), np.ones((1, 2), np.float32), 2)
    delta.put(np.array([7], np.uint64), np.zeros((1, 2), np.float32), 3)
    _, ids, vx = delta.take(10)
    assert ids.tolist() == [8, 7] and np.array_equal(vx[1], [0, 0])
    assert delta.min_seq() == 2


def test_empty_search_pads():
    D_, I_ = Delta(3).search(np.zeros((2, 3), np.float32), 4, "l2")
    assert np.isinf(D_).all() and (I_ == NO_ID).all()


def test_growth_keeps_contents():
    delta = Delta(3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 3)).astype(np.float32)
    for i in range(0, 5000, 700):
        delta.put(np.arange(i, min(i + 700, 5000), dtype=np.uint64), x[i : i + 700], i)
    ids, vx, _ = delta.live_arrays()
    assert np.array_equal(ids, np.arange(5000, dtype=np.uint64)) and np.array_equal(vx, x)


def test_take_skips_a_long_run_of_dead_rows():
    """Rows replaced or dropped at the front must not hide the live rows behind them."""
    delta = Delta(2)
    delta.put(np.arange(5000, dtype=np.uint64), np.ones((5000, 2), np.float32), 1)
    delta.drop(np.arange(3000, dtype=np.uint64))                         # 3000 dead rows at the front
    delta.put(np.arange(3000, 3500, dtype=np.uint64), np.zeros((500, 2), np.float32), 2)  # 500 more replaced
    rows, ids, _ = delta.take(16)
    assert len(rows) == 16 and ids.tolist() == list(range(3500, 3516))
    delta.consume(rows)
    while len(delta):  # the indexer's loop drains everything
        rows, ids, _ = delta.take(256)
        assert len(rows) > 0
        delta.consume(rows)
