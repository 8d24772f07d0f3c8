"""Parsing JSON that clients send (``*_json`` fields of requests, payloads): one helper, one set of rules.

:func:`loads_client_json` refuses, with :class:`retrieval.errors.InvalidArgument` (gRPC
``INVALID_ARGUMENT``) and a message naming the field:

* text that is not JSON (and ``NaN`` / ``Infinity``, which are not JSON either);
* nesting deeper than :data:`MAX_DEPTH` arrays / objects (``limits.max_json_depth``; the server sets it
  at start-up with :func:`set_max_depth`). The depth is measured by a linear scan *before* parsing, so
  10,000 levels never reach the parser's recursion (Python's ``json`` raises ``RecursionError`` there);
* optionally, a value of the wrong JSON type (``expect=dict`` for "a JSON object").
"""

from __future__ import annotations

import json
import re

from retrieval.errors import InvalidArgument

#: Deepest nesting of arrays / objects accepted in client JSON (``limits.max_json_depth``).
MAX_DEPTH = 64

# a JSON string (with its escapes) or one bracket; everything else cannot change the depth
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a JSON string"}


def set_max_depth(depth: int) -> None:
    """Set the server-wide depth limit (from ``limits.max_json_depth``)."""
    global MAX_DEPTH
    if depth < 1:
        raise ValueError(f"max_json_depth must be >= 1, got {depth}")
    MAX_DEPTH = int(depth)


def json_depth(text: str, stop_above: int | None = None) -> int:
    """Deepest nesting of arrays / objects in ``text`` (0 for a scalar), without parsing it; stops
    counting once past ``stop_above``. Brackets inside strings do not count."""
    # fast path: fewer opening brackets than the limit cannot nest past it
    if stop_above is not None and text.count("[") + text.count("{") <= stop_above:
        return 0
    depth = deepest = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    return deepest
        elif c in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def check_depth(text: str, what: str, max_depth: int | None = None) -> None:
    """Raise InvalidArgument when ``text`` nests deeper than ``max_depth`` (default :data:`MAX_DEPTH`)."""
    limit = MAX_DEPTH if max_depth is None else max_depth
    if json_depth(text, stop_above=limit) > limit:
        raise InvalidArgument(f"{what} is nested more than {limit} levels deep (arrays / objects inside each "
                              f"other); the limit is limits.max_json_depth = {limit}")


def loads_client_json(text: str | bytes | None, what: str, *, default=None, expect: type | None = None,
                      max_depth: int | None = None):
    """Parse JSON a client sent in field ``what``; empty text gives ``default``. See the module docstring."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{what} is not valid UTF-8: {e}") from None
    if not text:
        return default
    check_depth(text, what, max_depth)
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # deep in another way (cannot happen after check_depth, kept as a guard)
        raise InvalidArgument(f"{what} is nested too deeply") from None
    except ValueError as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    if expect is not None and not isinstance(obj, expect):
        raise InvalidArgument(f"{what} must be {_NAMES.get(expect, expect.__name__)}, got a JSON "
                              f"{_json_type(obj)}")
    return obj


def _json_type(obj) -> str:
    if obj is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(obj), type(obj).__name__)
