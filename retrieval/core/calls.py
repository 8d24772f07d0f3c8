"""What every servicer does around an engine call, written once: run blocking work off the event
loop, and check the request sizes the settings allow (``limits.*``)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from retrieval.errors import ResourceExhausted

T = TypeVar("T")


async def run_blocking(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn(*args, **kw)`` in the loop's default executor: engines score, load and read files there,
    never on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kw))


def check_k(k: int, max_k: int, default: int = 10) -> int:
    """``k`` of a request (0 means ``default``), at most ``max_k`` (``limits.max_k``)."""
    k = int(k) or default
    if k > max_k:
        raise ResourceExhausted(f"k = {k} exceeds the limit of {max_k}")
    return k


def check_count(n: int, limit: int, what: str) -> int:
    """``n`` things in one request (queries, nodes, pairs), at most ``limit``."""
    if n > limit:
        raise ResourceExhausted(f"{n} {what} in one request; the limit is {limit}")
    return n
