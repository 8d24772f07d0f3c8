"""Fixtures of the server tests: certificates, API keys, a server with keys."""

from __future__ import annotations

import secrets

import pytest

from tests.server.rpc import make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory):
    """Two read-write keys (one from a file, one from the environment) and one read-only key (file)."""
    folder = tmp_path_factory.mktemp("keys")
    rw_file, rw_env, ro = (secrets.token_urlsafe(32) for _ in range(3))
    (folder / "keys").write_text(f"# read-write keys\n{rw_file}\n")
    (folder / "keys").chmod(0o600)
    (folder / "ro-keys").write_text(f"{ro}  # a dashboard\n")
    (folder / "ro-keys").chmod(0o600)
    (folder / "client-key").write_text(rw_file + "\n")
    return {"rw": rw_file, "rw_env": rw_env, "ro": ro, "file": folder / "keys", "ro_file": folder / "ro-keys",
            "client_file": folder / "client-key"}
