"""Recall with distance ties, duplicates and padding; latency statistics; Pareto frontier."""

from __future__ import annotations

import numpy as np
import pytest

from bench.ann.metrics import (
    best_qps_at,
    distances,
    latency_stats,
    pareto_frontier,
    recall_ids_per_query,
    recall_per_query,
)


def test_ties_at_the_kth_distance_count_as_hits():
    # base on a line; query at 0: rows 1 and 2 are both at distance 1, rows 3 and 4 at distance 2
    xb = np.array([[5.0], [1.0], [-1.0], [2.0], [-2.0], [3.0]], np.float32)
    xq = np.array([[0.0]], np.float32)
    true_ids = np.array([[1, 2, 3, 4, 5]])
    true_d = distances(xq, xb, true_ids, "l2")
    assert true_d.tolist() == [[1.0, 1.0, 2.0, 2.0, 3.0]]
    # k=3: the true top-3 is {1, 2, 3} but row 4 is tied with row 3: returning {1, 2, 4} is perfect
    run = np.array([[1, 2, 4]])
    assert recall_per_query(true_d, run, distances(xq, xb, run, "l2"), 3)[0] == 1.0
    assert recall_ids_per_query(true_ids, run, 3)[0] == pytest.approx(2 / 3)  # id matching is unfair here
    # a neighbour past the k-th distance is a miss
    run = np.array([[1, 5, 3]])
    assert recall_per_query(true_d, run, distances(xq, xb, run, "l2"), 3)[0] == pytest.approx(2 / 3)


def test_epsilon_is_absolute_and_configurable():
    true_d = np.array([[1.0, 2.0]])
    ids = np.array([[0, 1]])
    assert recall_per_query(true_d, ids, np.array([[1.0, 2.0009]]), 2)[0] == 1.0
    assert recall_per_query(true_d, ids, np.array([[1.0, 2.0011]]), 2)[0] == 0.5
    assert recall_per_query(true_d, ids, np.array([[1.0, 2.0011]]), 2, epsilon=0.01)[0] == 1.0


def test_duplicates_and_padding_never_count():
    xb = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
    xq = np.array([[0.0], [0.0]], np.float32)
    true_ids = np.array([[0, 1, 2], [0, 1, 2]])
    true_d = distances(xq, xb, true_ids, "l2")
    run = np.array([[0, 0, 0], [0, -1, -1]])
    d = distances(xq, xb, run, "l2")
    assert np.isinf(d[1, 1:]).all()
    np.testing.assert_allclose(recall_per_query(true_d, run, d, 3), [1 / 3, 1 / 3])


def test_only_the_first_k_returned_count():
    xb = np.arange(10, dtype=np.float32)[:, None]
    xq = np.zeros((1, 1), np.float32)
    true_d = distances(xq, xb, np.arange(10)[None], "l2")
    run = np.array([[9, 8, 0, 1]])  # the right answers come too late
    assert recall_per_query(true_d, run, distances(xq, xb, run, "l2"), 2)[0] == 0.0


def test_distances_per_metric():
    xb = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    xq = np.array([[1.0, 0.0]], np.float32)
    ids = np.array([[0, 1]])
    np.testing.assert_allclose(distances(xq, xb, ids, "l2"), [[np.sqrt(4 + 16), 0.0]])
    np.testing.assert_allclose(distances(xq, xb, ids, "ip"), [[-3.0, -1.0]])
    np.testing.assert_allclose(distances(xq, xb, ids, "cosine"), [[1 - 3 / 5, 0.0]])


def test_latency_stats_and_pareto():
    s = latency_stats(np.arange(1, 101) * 1e-3)
    assert s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    pts = [(0.5, 1000.0), (0.9, 500.0), (0.8, 400.0), (0.95, 100.0), (0.9, 600.0), (0.99, 50.0)]
    assert pareto_frontier(pts) == [(0.5, 1000.0), (0.9, 600.0), (0.95, 100.0), (0.99, 50.0)]
    assert best_qps_at(pts, 0.9) == 600.0
    assert best_qps_at(pts, 0.999) is None
