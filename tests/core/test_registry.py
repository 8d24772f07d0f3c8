"""The one registry every engine uses: lookups, lazy entries, plugins, and its two errors."""

from __future__ import annotations

import pytest

from retrieval.core.registry import Registry
from retrieval.errors import InvalidArgument


def test_register_get_and_the_unknown_name_error():
    r: Registry[int] = Registry("widget")
    r.register("b", 2)

    @r.register("a")
    def a():
        return 1

    assert r.get("a") is a and r.get("b") == 2
    assert r.names() == ["a", "b"] and list(r) == ["a", "b"] and len(r) == 2 and "a" in r and "c" not in r
    assert r.find("c") is None and r.find("b") == 2
    with pytest.raises(InvalidArgument, match=r"^unknown widget 'c'; valid: a, b$"):
        r.get("c")
    for bad in (None, 5, ["a"]):  # not a string: the same sentence, never a TypeError
        with pytest.raises(InvalidArgument, match="unknown widget"):
            r.get(bad)
    with pytest.raises(InvalidArgument, match="valid: none"):
        Registry("gadget").get("x")


def test_a_name_registered_twice_is_refused_unless_it_is_the_same_object():
    r: Registry[object] = Registry("widget")
    obj = object()
    r.register("x", obj)
    r.register("x", obj)  # re-importing a module registers the same class again: fine
    with pytest.raises(ValueError, match="widget 'x' is registered twice"):
        r.register("x", object())
    r.unregister("x")
    r.register("x", object())


def test_lazy_entries_import_on_first_get():
    r: Registry[type] = Registry("codec")
    r.register_lazy("od", "collections:OrderedDict")
    import collections

    assert r.get("od") is collections.OrderedDict
    with pytest.raises(ValueError, match="module:attr"):
        r.register_lazy("bad", "collections.OrderedDict")


def test_case_insensitive_registries_and_plugin_modules():
    r: Registry[int] = Registry("metric", case_insensitive=True)
    r.register("L2", 1)
    assert r.get("l2") == 1 and r.get("L2") == 1 and "l2" in r

    # a registry with modules imports them on first use; their import registers the entries
    from bench.ann import adapters

    assert {"hnswlib", "exact-numpy"} <= set(adapters.ALGORITHMS.names())


def test_every_engine_uses_the_one_registry():
    from bench.ann.adapters import ALGORITHMS
    from index_builder.readers import READERS
    from retrieval.crossencoder.dual import DUAL_ENCODERS
    from retrieval.crossencoder.scorers import SCORERS
    from retrieval.drafting.base import SOURCES
    from retrieval.graph.readers import READERS as GRAPH_READERS
    from retrieval.indexes.registry import BACKENDS, SPECS

    for reg in (ALGORITHMS, READERS, DUAL_ENCODERS, SCORERS, BACKENDS, SPECS, SOURCES, GRAPH_READERS):
        assert isinstance(reg, Registry), reg
        with pytest.raises(InvalidArgument, match=f"unknown {reg.what} 'no-such'; valid: "):
            reg.get("no-such")
