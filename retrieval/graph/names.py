"""Names of graphs, embeddings and models in the graph store: what may name a folder under it."""

from __future__ import annotations

import re

from retrieval.errors import InvalidArgument

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def check_name(name, what: str = "graph name") -> str:
    """A name is 1-128 characters of letters, digits, ``_ . -``, starting with a letter or digit.

    This keeps names inside the store folder (no ``/``, ``..``, or hidden files)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"{what} {name!r} is not valid: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name
