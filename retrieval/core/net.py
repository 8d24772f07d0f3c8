"""Addresses: ``host:port`` as gRPC, uvicorn and people write them (IPv6 literals bracketed)."""

from __future__ import annotations

import ipaddress


def bind_address(host: str, port: int) -> str:
    """``host:port`` for gRPC and for people: an IPv6 literal is bracketed (``[::1]:50051``)."""
    h = unbracket(host)
    try:
        v6 = ipaddress.ip_address(h).version == 6
    except ValueError:
        v6 = False
    return f"[{h}]:{port}" if v6 else f"{h}:{port}"


def unbracket(host: str) -> str:
    h = host.strip()
    return h[1:-1] if h.startswith("[") and h.endswith("]") else h
