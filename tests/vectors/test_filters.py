"""Payload filters: SQL translation vs a pure-Python reference evaluator, validation, dict form.

The reference implements the documented semantics (retrieval/v1/common.proto, retrieval/vectors/filters.py):
``key`` is a dotted path through JSON objects; a condition on a value that is an array holds when
any element satisfies it (one level, no recursion); ``equals`` / ``any_of`` compare strings with
strings, bools with bools and numbers with numbers (a bool is never a number); ``range`` holds for
numbers only; ``is_null`` is "missing or null"; ``must`` all, ``should`` at least one when non-empty,
``must_not`` none.
"""

from __future__ import annotations

import json
import random
import sqlite3

import pytest

from retrieval.errors import InvalidArgument
from retrieval.vectors import filters as flt
from retrieval.vectors.filters import Condition, Filter, Range
from tests.vectors.helpers import ref_eval

# --------------------------------------------------------------------------------------------------
# Random payloads and filters
# --------------------------------------------------------------------------------------------------
SCALARS = [0, 1, 2, -1, 3, 0.5, 1.0, 2.5, -0.5, "red", "blue", "", "ü", True, False, None]
KEYS = ["a", "b", "tags", "n.x", "n.y", "n", "deep.l1.l2", "missing", "my-key", "_u"]
FILTER_VALUES = [0, 1, 2, -1, 3, 0.5, 1.0, 2.5, -0.5, "red", "blue", "", "ü", True, False, 7]


def rand_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if r < 0.55 or depth >= 2:
        return rng.choice(SCALARS)
    if r < 0.85:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["x", "y", "a"]): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def rand_payload(rng: random.Random):
    if rng.random() < 0.08:
        return None  # a point without payload
    p: dict = {}
    for key in ("a", "b", "tags", "my-key", "_u"):
        if rng.random() < 0.75:
            p[key] = rand_value(rng)
    if rng.random() < 0.7:
        p["n"] = {k: rand_value(rng) for k in ("x", "y") if rng.random() < 0.7} if rng.random() < 0.8 else rand_value(rng)
    if rng.random() < 0.3:
        p["deep"] = {"l1": {"l2": rand_value(rng)}} if rng.random() < 0.8 else {"l1": rand_value(rng)}
    if rng.random() < 0.1:
        p["a.b"] = 1  # a literal dotted key is not the path a.b
    return p


def rand_condition(rng: random.Random) -> Condition:
    key = rng.choice(KEYS)
    kind = rng.choice(["equals", "any_of", "range", "is_null"])
    if kind == "equals":
        return Condition(key, equals=rng.choice(FILTER_VALUES))
    if kind == "any_of":
        return Condition(key, any_of=tuple(rng.sample(FILTER_VALUES, rng.randint(1, 4))))
    if kind == "range":
        b = {}
        while not b:
            for name in ("gt", "gte", "lt", "lte"):
                if rng.random() < 0.4:
                    b[name] = rng.choice([-1, 0, 0.5, 1, 2, 2.5, 3])
        return Condition(key, range=Range(**b))
    return Condition(key, is_null=rng.random() < 0.5)


def rand_filter(rng: random.Random, depth: int = 1) -> Filter:
    parts = {}
    for part in ("must", "should", "must_not"):
        items = []
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if depth < 4 and rng.random() < 0.25:
                items.append(rand_filter(rng, depth + 1))
            else:
                items.append(rand_condition(rng))
        parts[part] = tuple(items)
    return Filter(**parts)


def sql_matches(con: sqlite3.Connection, f: Filter) -> set[int]:
    sql, params = flt.to_sql(flt.validate_filter(f))
    return {r[0] for r in con.execute(f"SELECT rowid FROM p WHERE {sql}", params)}


@pytest.fixture(scope="module")
def table():
    rng = random.Random(1234)
    payloads = [rand_payload(rng) for _ in range(400)]
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE p (payload TEXT)")
    for i, p in enumerate(payloads, start=1):
        con.execute("INSERT INTO p(rowid, payload) VALUES (?, ?)", (i, None if p is None else json.dumps(p)))
    return con, payloads


def _check(con, payloads, f: Filter) -> None:
    want = {i for i, p in enumerate(payloads, start=1) if ref_eval(f, p)}
    got = sql_matches(con, f)
    if got != want:
        bad = sorted(got ^ want)[:3]
        detail = [(i, payloads[i - 1], "sql" if i in got else "reference") for i in bad]
        pytest.fail(f"filter {flt.to_dict(f)} disagrees with the reference on {len(got ^ want)} rows, "
                    f"e.g. (row, payload, who matched): {detail}")


def test_random_filters_match_reference(table):
    con, payloads = table
    rng = random.Random(99)
    nonempty = 0
    for _ in range(600):
        f = rand_filter(rng)
        _check(con, payloads, f)
        nonempty += bool(sql_matches(con, f)) and len(sql_matches(con, f)) < len(payloads)
    assert nonempty > 150  # the random filters are selective, not trivially all / nothing


@pytest.mark.parametrize("payload,cond,want", [
    ({"a": 1}, Condition("a", equals=1), True),
    ({"a": 1.0}, Condition("a", equals=1), True),              # numbers compare as numbers
    ({"a": True}, Condition("a", equals=1), False),            # a bool is not the number 1
    ({"a": 1}, Condition("a", equals=True), False),
    ({"a": True}, Condition("a", equals=True), True),
    ({"a": "1"}, Condition("a", equals=1), False),             # a string is not a number
    ({"a": [3, "x", None]}, Condition("a", equals="x"), True),  # any element
    ({"a": [[1]]}, Condition("a", equals=1), False),           # one level of arrays only
    ({"a": {"x": 1}}, Condition("a", equals=1), False),        # an object's members are not elements
    ({"a": {"x": 1}}, Condition("a", range=Range(gte=0)), False),
    ({"a": {"x": "r"}}, Condition("a", any_of=("r",)), False),
    ({"a": None}, Condition("a", is_null=True), True),
    ({}, Condition("a", is_null=True), True),
    ({"a": []}, Condition("a", is_null=True), False),          # an empty array is present
    ({"a": [None]}, Condition("a", is_null=False), True),
    ({"a": 5}, Condition("a.b", is_null=True), True),          # path through a scalar: missing
    ({"a.b": 5}, Condition("a.b", equals=5), False),           # dotted key is a path, not a literal
    ({"a": {"b": 5}}, Condition("a.b", equals=5), True),
    ({"a": True}, Condition("a", range=Range(gte=0)), False),  # bools are not in numeric ranges
    ({"a": 2**62 + 1}, Condition("a", equals=2**62), False),   # large ints compare exactly
    ({"a": 2**62}, Condition("a", equals=2**62), True),
    ({"a": -0.5}, Condition("a", range=Range(gt=-1, lt=0)), True),
    ({"a": 0}, Condition("a", range=Range(gt=0)), False),
    ({"a": 0}, Condition("a", range=Range(gte=0)), True),
    ({"a": "b"}, Condition("a", range=Range(gte=0)), False),
    ({"a": "O'Brien\"; DROP TABLE p; --"}, Condition("a", equals="O'Brien\"; DROP TABLE p; --"), True),
])
def test_edge_cases(payload, cond, want):
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE p (payload TEXT)")
    con.execute("INSERT INTO p(rowid, payload) VALUES (1, ?)", (json.dumps(payload),))
    f = Filter(must=(cond,))
    assert ref_eval(f, payload) is want  # the reference itself encodes the documented semantics
    assert sql_matches(con, f) == ({1} if want else set()), (payload, cond)
    # and its negation
    assert sql_matches(con, Filter(must_not=(cond,))) == (set() if want else {1})


def test_no_payload_row():
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE p (payload TEXT)")
    con.execute("INSERT INTO p(rowid, payload) VALUES (1, NULL)")
    assert sql_matches(con, Filter(must=(Condition("a", is_null=True),))) == {1}
    assert sql_matches(con, Filter(must=(Condition("a", equals=1),))) == set()
    assert sql_matches(con, Filter(must_not=(Condition("a", equals=1),))) == {1}


def test_should_semantics():
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE p (payload TEXT)")
    for i, p in enumerate([{"a": 1}, {"a": 2}, {"a": 3}], start=1):
        con.execute("INSERT INTO p(rowid, payload) VALUES (?, ?)", (i, json.dumps(p)))
    f = Filter(should=(Condition("a", equals=1), Condition("a", equals=3)))
    assert sql_matches(con, f) == {1, 3}
    # must and should together: both must hold
    f = Filter(must=(Condition("a", range=Range(gte=2)),), should=(Condition("a", equals=1), Condition("a", equals=3)))
    assert sql_matches(con, f) == {3}
    # nested: NOT (a == 1 OR a == 2)
    f = Filter(must_not=(Filter(should=(Condition("a", equals=1), Condition("a", equals=2))),))
    assert sql_matches(con, f) == {3}
    assert sql_matches(con, Filter()) == {1, 2, 3}


def test_values_are_bound_not_formatted():
    f = Filter(must=(Condition("a", equals="x'); DROP TABLE p; --"),))
    sql, params = flt.to_sql(f)
    assert "DROP" not in sql and "x'); DROP TABLE p; --" in params


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _nested(depth: int) -> Filter:
    f = Filter(must=(Condition("a", equals=1),))
    for _ in range(depth - 1):
        f = Filter(must=(f,))
    return f


@pytest.mark.parametrize("f,words", [
    (Filter(must=(Condition("", equals=1),)), "key"),
    (Filter(must=(Condition("a b", equals=1),)), "key"),
    (Filter(must=(Condition("a..b", equals=1),)), "key"),
    (Filter(must=(Condition("a.", equals=1),)), "key"),
    (Filter(must=(Condition('a"b', equals=1),)), "key"),
    (Filter(must=(Condition("$.a", equals=1),)), "key"),
    (Filter(must=(Condition("x" * 257, equals=1),)), "key"),
    (Filter(must=(Condition("a"),)), "exactly one"),
    (Filter(must=(Condition("a", equals=1, is_null=True),)), "exactly one"),
    (Filter(must=(Condition("a", any_of=()),)), "empty"),
    (Filter(must=(Condition("a", any_of=tuple(range(1025))),)), "more than 1024"),
    (Filter(must=(Condition("a", range=Range()),)), "no bound"),
    (Filter(must=(Condition("a", range=Range(gt=float("nan"))),)), "finite"),
    (Filter(must=(Condition("a", range=Range(lt=True)),)), "finite number"),
    (Filter(must=(Condition("a", equals=float("inf")),)), "finite"),
    (Filter(must=(Condition("a", equals=2**64),)), "64 bits"),
    (Filter(must=(Condition("a", equals=[1]),)), "string, number or bool"),
    (Filter(must=tuple(Condition("a", equals=i) for i in range(257))), "more than 256"),
    (_nested(flt.MAX_DEPTH + 1), "nested"),
])
def test_invalid_filters(f, words):
    with pytest.raises(InvalidArgument, match=words):
        flt.validate_filter(f)


def test_max_depth_is_accepted():
    flt.validate_filter(_nested(flt.MAX_DEPTH))


def test_dict_form_round_trip():
    rng = random.Random(5)
    for _ in range(200):
        f = rand_filter(rng)
        d = flt.to_dict(f)
        json.dumps(d)  # plain JSON-able data
        assert flt.from_dict(d) == f


@pytest.mark.parametrize("d,words", [
    ([], "must be a dict"),
    ({"must": [], "shoulds": []}, "unknown fields"),
    ({"must": {"key": "a"}}, "must be a list"),
    ({"must": [{"key": "a", "eq": 1}]}, "unknown fields"),
    ({"must": [{"key": "a", "range": {"from": 1}}]}, "gt / gte / lt / lte"),
    ({"must": [{"key": "a", "any_of": "abc"}]}, "must be a list"),
    ({"must": ["a"]}, "must be a dict"),
    ({"must": [{"key": "a b", "equals": 1}]}, "key"),
])
def test_from_dict_errors(d, words):
    with pytest.raises(InvalidArgument, match=words):
        flt.from_dict(d)


def test_json_path_quotes_parts():
    assert flt.json_path("a.b-c._d") == '$."a"."b-c"."_d"'
