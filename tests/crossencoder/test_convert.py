"""Round trips of every CrossEncoder proto conversion."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.crossencoder import convert as cconv
from retrieval.crossencoder.index import AddResult, SearchParams, SearchResult
from retrieval.errors import InvalidArgument
from retrieval.v1 import crossencoder_pb2 as pb


def test_scorer_and_dual_encoder_specs():
    for spec in ({"name": "minilm-joint"}, {"name": "hf", "model_dir": "/m", "batch_size": 8, "device": "cpu",
                                             "precision": "bf16", "max_length": 256}):
        assert cconv.scorer_spec_from_proto(cconv.scorer_spec_to_proto(spec)) == spec
    with pytest.raises(InvalidArgument, match="scorer.backend"):
        cconv.scorer_spec_from_proto(pb.ScorerSpec(backend="callable"))
    for spec in (None, {"name": "minilm"}, {"name": "sentence-encoder", "model_dir": "/d", "device": "cuda"}):
        assert cconv.dual_encoder_spec_from_proto(cconv.dual_encoder_spec_to_proto(spec)) == spec
    with pytest.raises(InvalidArgument, match="dual_encoder.backend"):
        cconv.dual_encoder_spec_from_proto(pb.DualEncoderSpec(backend="table"))


def test_items():
    items = [{"id": 3, "text": "a", "payload": {"x": [1, 2]}}, {"id": 2**63 - 1, "text": "b", "payload": None}]
    assert cconv.items_from_proto(cconv.items_to_proto(items)) == items
    with pytest.raises(InvalidArgument, match="JSON object"):
        cconv.items_from_proto([pb.CrossEncoderItem(id=1, text="t", payload_json="[1]")])
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        cconv.items_from_proto([pb.CrossEncoderItem(id=1, text="t", payload_json="{")])


def test_build_params_and_request():
    for p in ({}, {"k_i": 50, "anchor_method": "kmeans-r", "solver": "truncated", "rank": 20, "seed": 4,
                   "chunk_size": 8}, {"ridge": 0.0}, {"ridge": 0.01}):
        assert cconv.build_params_from_proto(cconv.build_params_to_proto(p)) == p
    req = cconv.build_request_to_proto("n", {"name": "minilm-joint"}, items=[{"id": 1, "text": "t", "payload": None}],
                                       anchor_queries=["q1", "q2"], params={"k_i": 2},
                                       dual_encoder={"name": "minilm"})
    d = cconv.build_request_from_proto(req)
    assert d == {"name": "n", "scorer": {"name": "minilm-joint"}, "dual_encoder": {"name": "minilm"},
                 "items": [{"id": 1, "text": "t", "payload": None}], "items_path": None, "anchor_queries": ["q1", "q2"],
                 "query_log": None, "k_q": None, "query_seed": 0, "params": {"k_i": 2}}


def test_search_params():
    assert cconv.search_params_from_proto(pb.CrossEncoderSearchParams()) == SearchParams()
    p = SearchParams(mode="cur", budget=70, k_i=20, rounds=4, seed_fraction=0.0, ridge=0.0)
    assert cconv.search_params_from_proto(cconv.search_params_to_proto(p)) == p


def test_search_budget_unset_is_the_default_and_an_explicit_zero_is_refused():
    assert cconv.search_params_from_proto(pb.CrossEncoderSearchParams(mode="cur")).budget == SearchParams().budget
    with pytest.raises(InvalidArgument, match=r"budget is 0.*leave budget unset for the default \(100 calls\)"):
        cconv.search_params_from_proto(pb.CrossEncoderSearchParams(budget=0))
    assert cconv.search_params_from_proto(pb.CrossEncoderSearchParams(budget=1)).budget == 1
    # The wire of clients built before the field was optional: a 0 was never sent (unset, the
    # default); any other value arrives as field 2 (varint) and is kept.
    assert cconv.search_params_from_proto(pb.CrossEncoderSearchParams.FromString(b"")).budget == 100
    assert cconv.search_params_from_proto(pb.CrossEncoderSearchParams.FromString(b"\x10\x10")).budget == 16
    assert pb.CrossEncoderSearchParams(budget=0).SerializeToString() == b"\x10\x00"  # explicit 0 is sent


def test_hits():
    r = SearchResult(ids=np.array([5, 2**62, -1]), scores=np.array([0.9, 0.5, -np.inf], dtype=np.float32), calls=40,
                     scorer_seconds=0.25, other_seconds=0.01, mode="adaptive", k_i=0, k_r=0, rounds=4,
                     truncated_pairs=3, query_truncated=True)
    d = cconv.hits_from_proto(cconv.hits_to_proto(r, [{"a": 1}, None]))
    assert d["ids"].tolist() == [5, 2**62] and d["scores"].tolist() == [pytest.approx(0.9), 0.5]
    assert d["payloads"] == [{"a": 1}, None]
    assert {k: d[k] for k in ("calls", "mode", "rounds", "truncated_pairs", "query_truncated")} == \
        {"calls": 40, "mode": "adaptive", "rounds": 4, "truncated_pairs": 3, "query_truncated": True}
    assert cconv.hits_from_proto(cconv.hits_to_proto(r))["payloads"] is None


def test_info_add_and_anchor_requests(fixture_index):
    index, _ = fixture_index
    d = index.describe()
    spec = {"scorer": {"name": "table"}, "dual_encoder": None}
    info = cconv.info_from_proto(cconv.info_to_proto("fx", d, spec))
    assert info["name"] == "fx" and info["n_items"] == 1000 and info["k_q"] == 300 and info["k_i"] == 100
    assert info["anchor_queries"] == d["anchor_queries"] and info["anchor_item_ids"] == d["anchor_item_ids"]
    assert info["scorer"] == {"spec": {"name": "table"}, "fingerprint": d["scorer"]}
    assert info["build"] == {"params": d["build"], "stats": d["build_stats"]}
    assert info["search_defaults"] == {"defaults": d["search_defaults"], "min_budget": d["min_budget"]}
    # the typed fields and the deprecated JSON ones (what older servers send) read the same
    msg = cconv.info_to_proto("fx", d, spec)
    assert msg.build_params.k_i == d["build"]["k_i"] and msg.build_stats.calls == d["build_stats"]["calls"]
    assert msg.search_defaults.budget == d["search_defaults"]["budget"] and dict(msg.min_budget) == d["min_budget"]
    for f in ("build_params", "build_stats", "search_defaults", "min_budget"):
        msg.ClearField(f)
    assert cconv.info_from_proto(msg) == info
    old = dict(d, build_stats={}, build=dict(d["build"], rank=4, ridge=0.0))  # before build stats; a zero ridge
    back = cconv.info_from_proto(cconv.info_to_proto("fx", old, spec))
    assert back["build"] == {"params": old["build"], "stats": {}}
    a = AddResult(added=2, calls=600, scorer_seconds=1.5, seconds=1.6, truncated_items=1)
    assert cconv.add_result_from_proto(cconv.add_result_to_proto(a)) == {
        "added": 2, "calls": 600, "scorer_seconds": 1.5, "seconds": 1.6, "truncated_items": 1}
    for kw in ({}, {"k_i": 5}, {"anchor_method": "qr", "seed": 0}, {"k_i": 7, "anchor_method": "random", "seed": 9}):
        assert cconv.set_anchor_items_from_proto(cconv.set_anchor_items_to_proto("fx", **kw)) == kw
