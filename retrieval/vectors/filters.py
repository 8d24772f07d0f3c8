"""Payload filters: a small domain model and its translation to SQLite.

A filter is a tree of clauses::

    Filter(must=[...], should=[...], must_not=[...])
    Condition(key="color", equals="red")            # equality (str, int, float or bool)
    Condition(key="tags", any_of=["a", "b"])         # set membership
    Condition(key="price", range=Range(gte=10, lt=20))
    Condition(key="deleted_at", is_null=True)        # key missing or null

``must``: all hold; ``should``: at least one holds (ignored when empty); ``must_not``: none holds.
A condition on a key whose value is an array holds when any element satisfies it. ``key`` is a
dotted path into the JSON payload ("a.b"), each part ``[A-Za-z0-9_-]+``.

The SQL produced is evaluated by SQLite's JSON functions over the stored payloads, with every user
value bound as a parameter (never formatted into the SQL text).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Union

from retrieval.errors import InvalidArgument

Scalar = Union[str, int, float, bool]

MAX_DEPTH = 8
MAX_CONDITIONS = 256
MAX_VALUES = 1024
_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")


@dataclass(frozen=True)
class Range:
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class Condition:
    key: str
    equals: Scalar | None = None
    any_of: tuple[Scalar, ...] | None = None
    range: Range | None = None
    is_null: bool | None = None


@dataclass(frozen=True)
class Filter:
    must: tuple["Clause", ...] = field(default_factory=tuple)
    should: tuple["Clause", ...] = field(default_factory=tuple)
    must_not: tuple["Clause", ...] = field(default_factory=tuple)

    def is_empty(self) -> bool:
        return not (self.must or self.should or self.must_not)


Clause = Union[Condition, Filter]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def validate_filter(f: Filter) -> Filter:
    """Check keys, value types, ranges, depth and size; raise :class:`InvalidArgument` if malformed."""
    count = [0]
    _validate(f, 1, count)
    return f


def _validate(f: Filter, depth: int, count: list[int]) -> None:
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"filter is nested more than {MAX_DEPTH} levels deep")
    for clause in (*f.must, *f.should, *f.must_not):
        if isinstance(clause, Filter):
            _validate(clause, depth + 1, count)
            continue
        count[0] += 1
        if count[0] > MAX_CONDITIONS:
            raise InvalidArgument(f"filter has more than {MAX_CONDITIONS} conditions")
        _validate_condition(clause)


def _validate_scalar(v: object, key: str) -> None:
    if isinstance(v, bool) or isinstance(v, str):
        return
    if isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            raise InvalidArgument(f"filter value {v} for key {key!r} does not fit in 64 bits")
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise InvalidArgument(f"filter value for key {key!r} must be finite, got {v}")
        return
    raise InvalidArgument(f"filter value for key {key!r} must be a string, number or bool, got {type(v).__name__}")


def _validate_condition(c: Condition) -> None:
    if not isinstance(c.key, str) or not c.key or len(c.key) > 256 or _KEY_RE.fullmatch(c.key) is None:
        raise InvalidArgument(
            f"filter key {str(c.key)[:80]!r} is not valid: use dotted parts of letters, digits, '_' and '-'"
        )
    given = [x is not None for x in (c.equals, c.any_of, c.range, c.is_null)]
    if sum(given) != 1:
        raise InvalidArgument(
            f"filter condition on {c.key!r} must have exactly one of equals, any_of, range, is_null"
        )
    if c.equals is not None:
        _validate_scalar(c.equals, c.key)
    if c.any_of is not None:
        if not c.any_of:
            raise InvalidArgument(f"filter condition any_of on {c.key!r} is empty")
        if len(c.any_of) > MAX_VALUES:
            raise InvalidArgument(f"filter condition any_of on {c.key!r} has more than {MAX_VALUES} values")
        for v in c.any_of:
            _validate_scalar(v, c.key)
    if c.range is not None:
        r = c.range
        bounds = [b for b in (r.gt, r.gte, r.lt, r.lte) if b is not None]
        if not bounds:
            raise InvalidArgument(f"filter range on {c.key!r} has no bound")
        for b in bounds:
            if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b):
                raise InvalidArgument(f"filter range bound on {c.key!r} must be a finite number, got {b!r}")


# --------------------------------------------------------------------------------------------------
# SQL translation
# --------------------------------------------------------------------------------------------------
def json_path(key: str) -> str:
    """SQLite JSON path for a validated dotted key: ``a.b`` -> ``$."a"."b"``."""
    return "$." + ".".join(f'"{part}"' for part in key.split("."))


#: Epoch seconds (millisecond precision) of an ISO 8601 / RFC 3339 text ``{v}`` ("2024-05-01T12:00:00Z",
#: "2024-05-01 12:00:00.250+02:00", "2024-05-01"), NULL for other text. Used for range conditions on
#: keys with a datetime payload index, here and by the index itself (the same SQLite expression).
DATETIME_SQL = ("(CASE WHEN {v} GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*' "
                "THEN round((julianday({v}) - 2440587.5) * 86400.0, 3) END)")


class SqlWhere(tuple):
    """``(sql, params)`` as returned by :func:`to_sql`, with the validated :class:`Filter` it came from
    in ``.filter`` (so a shard can answer it from payload indexes instead)."""

    filter: Filter | None = None


def to_sql(f: Filter, column: str = "payload", datetime_keys: frozenset[str] = frozenset()) -> tuple[str, list]:
    """Translate a validated filter into a SQL boolean expression over ``column`` and its parameters
    (a :class:`SqlWhere`). A range condition on a key in ``datetime_keys`` (keys with a datetime payload
    index) also matches text values that are ISO 8601 timestamps, compared in epoch seconds."""
    params: list = []
    sql = _filter_sql(f, column, params, datetime_keys)
    out = SqlWhere((sql, params))
    out.filter = f
    return out


def _filter_sql(f: Filter, column: str, params: list, dk: frozenset[str] = frozenset()) -> str:
    parts: list[str] = []
    for clause in f.must:
        parts.append(_clause_sql(clause, column, params, dk))
    if f.should:
        parts.append("(" + " OR ".join(_clause_sql(c, column, params, dk) for c in f.should) + ")")
    for clause in f.must_not:
        parts.append("NOT " + _clause_sql(clause, column, params, dk))
    return "(" + " AND ".join(parts) + ")" if parts else "1"


def _clause_sql(c: Clause, column: str, params: list, dk: frozenset[str] = frozenset()) -> str:
    if isinstance(c, Filter):
        return _filter_sql(c, column, params, dk)
    path = json_path(c.key)
    if c.is_null is not None:
        params.extend([path, path])
        test = f"(json_type({column}, ?) IS NULL OR json_type({column}, ?) = 'null')"
        return test if c.is_null else f"NOT {test}"
    preds: list[str] = []
    inner: list = []
    if c.equals is not None:
        preds.append(_scalar_pred(c.equals, inner))
    elif c.any_of is not None:
        preds.append("(" + " OR ".join(_scalar_pred(v, inner) for v in c.any_of) + ")")
    elif c.range is not None:
        r = c.range
        rp = ["je.type IN ('integer', 'real')"]
        for op, b in ((">", r.gt), (">=", r.gte), ("<", r.lt), ("<=", r.lte)):
            if b is not None:
                rp.append(f"je.value {op} ?")
                inner.append(float(b))
        pred = "(" + " AND ".join(rp) + ")"
        if c.key in dk:
            ts = DATETIME_SQL.format(v="je.value")
            tp = ["je.type = 'text'"]
            for op, b in ((">", r.gt), (">=", r.gte), ("<", r.lt), ("<=", r.lte)):
                if b is not None:
                    tp.append(f"{ts} {op} ?")
                    inner.append(float(b))
            pred = f"({pred} OR ({' AND '.join(tp)}))"
        preds.append(pred)
    params.append(path)
    params.extend(inner)
    # json_each walks the elements of an array (integer keys) or the value itself (NULL key), and also
    # the members of an object (text keys): those are not elements, so they never match.
    return (f"EXISTS (SELECT 1 FROM json_each({column}, ?) AS je "
            f"WHERE typeof(je.key) <> 'text' AND {' AND '.join(preds)})")


def _scalar_pred(v: Scalar, params: list) -> str:
    if isinstance(v, bool):
        return "je.type = 'true'" if v else "je.type = 'false'"
    if isinstance(v, str):
        params.append(v)
        return "(je.type = 'text' AND je.value = ?)"
    params.append(v)
    return "(je.type IN ('integer', 'real') AND je.value = ?)"


# --------------------------------------------------------------------------------------------------
# Plain-Python form (used by the client and the CLI): {"must": [{"key": ..., "equals": ...}], ...}
# --------------------------------------------------------------------------------------------------
def from_dict(d: dict) -> Filter:
    """Build a :class:`Filter` from its dict form; raise :class:`InvalidArgument` when malformed."""
    if not isinstance(d, dict):
        raise InvalidArgument(f"filter must be a dict, got {type(d).__name__}")
    unknown = set(d) - {"must", "should", "must_not"}
    if unknown:
        raise InvalidArgument(f"filter has unknown fields {sorted(unknown)}; expected must, should, must_not")
    out = {}
    for part in ("must", "should", "must_not"):
        items = d.get(part, [])
        if not isinstance(items, (list, tuple)):
            raise InvalidArgument(f"filter.{part} must be a list")
        out[part] = tuple(_clause_from_dict(x) for x in items)
    return validate_filter(Filter(**out))


def _clause_from_dict(x: dict) -> Clause:
    if not isinstance(x, dict):
        raise InvalidArgument(f"filter clause must be a dict, got {type(x).__name__}")
    if "key" not in x:
        return from_dict(x)
    unknown = set(x) - {"key", "equals", "any_of", "range", "is_null"}
    if unknown:
        raise InvalidArgument(f"filter condition has unknown fields {sorted(unknown)}")
    rng = x.get("range")
    if rng is not None:
        if not isinstance(rng, dict) or set(rng) - {"gt", "gte", "lt", "lte"}:
            raise InvalidArgument("filter range must be a dict with gt / gte / lt / lte")
        rng = Range(**rng)
    any_of = x.get("any_of")
    if any_of is not None:
        if not isinstance(any_of, (list, tuple)):
            raise InvalidArgument("filter any_of must be a list")
        any_of = tuple(any_of)
    return Condition(key=x["key"], equals=x.get("equals"), any_of=any_of, range=rng, is_null=x.get("is_null"))


def to_dict(f: Filter) -> dict:
    """Inverse of :func:`from_dict`."""
    def clause(c: Clause) -> dict:
        if isinstance(c, Filter):
            return to_dict(c)
        out: dict = {"key": c.key}
        if c.equals is not None:
            out["equals"] = c.equals
        if c.any_of is not None:
            out["any_of"] = list(c.any_of)
        if c.range is not None:
            out["range"] = {k: v for k, v in vars(c.range).items() if v is not None}
        if c.is_null is not None:
            out["is_null"] = c.is_null
        return out

    return {part: [clause(c) for c in getattr(f, part)] for part in ("must", "should", "must_not") if getattr(f, part)}
