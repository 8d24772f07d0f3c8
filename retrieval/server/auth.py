"""Authentication and transport security: API keys, read-only keys, TLS and mutual TLS.

API keys
    Off by default on loopback; required when the server listens on any other address (the server
    refuses to start without one). Keys are read from files (``security.api_keys_file``,
    ``security.read_only_keys_file``: one key per line, ``#`` comments) or from the environment
    (``RETRIEVAL_API_KEYS``, ``RETRIEVAL_READ_ONLY_API_KEYS``: comma- or whitespace-separated), never
    from command-line arguments (they would land in shell history and ``ps``). A key is 16 to 256
    printable ASCII characters without spaces.

    A client sends its key as ``authorization: Bearer <key>`` or ``x-api-key: <key>`` metadata on
    every call (streams included). Keys are compared in constant time: the SHA-256 of the presented
    key against the SHA-256 of every configured key with :func:`hmac.compare_digest`, always visiting
    every key. Missing or wrong key -> ``UNAUTHENTICATED``; a read-only key on a write RPC ->
    ``PERMISSION_DENIED``. Health checks (``grpc.health.v1.Health``) stay open.

Read and write RPCs
    An RPC is a *read* when it is listed in :data:`READ_METHODS`, declared by its service
    (:func:`register_read_methods`, called from the service's ``start``), or marked
    ``option idempotency_level = NO_SIDE_EFFECTS;`` in its proto. Everything else is a write (fail
    closed). The same classification drives the in-flight write-bytes limit.

TLS
    ``security.tls_cert_file`` + ``security.tls_key_file`` switch the port to TLS;
    ``security.tls_client_ca_file`` additionally requires client certificates signed by that CA.

Client-named files
    :func:`resolve_client_file` is the one gate for paths a client sends (e.g. corpus inputs of a
    datastore build): they must lie inside an allowed folder after symlinks are resolved, and a regular
    file must not be hard-linked. That check runs when the request arrives; code that reads the file
    later (jobs) opens it through :mod:`retrieval.server.sandbox`, which checks the opened file itself
    (no symlink followed, real path of the descriptor inside the folders, no symlinks in folder inputs),
    so a file swapped after the check is refused, not read. The allowed folders are the operator's:
    one configured as a symlink is followed.

Thread-safety: a :class:`KeyStore` is immutable after construction; ``check`` may be called from any
thread.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from retrieval.errors import FailedPrecondition, InvalidArgument, PermissionDenied

logger = logging.getLogger(__name__)

ENV_KEYS = "RETRIEVAL_API_KEYS"
ENV_READ_ONLY_KEYS = "RETRIEVAL_READ_ONLY_API_KEYS"
MIN_KEY_LEN = 16
MAX_KEY_LEN = 256

#: Methods that never change state, by full service name. Services added later declare theirs with
#: :func:`register_read_methods` in their ``start``, or with NO_SIDE_EFFECTS in the proto.
READ_METHODS: dict[str, frozenset[str]] = {
    "retrieval.v1.Collections": frozenset({"List", "Describe", "ListPayloadIndexes"}),
    "retrieval.v1.Points": frozenset({"Get", "Count", "Scroll"}),
    "retrieval.v1.Search": frozenset({"Search", "SearchBatch", "SearchStream"}),
    "retrieval.v1.Jobs": frozenset({"Get", "List", "Watch", "Kinds"}),
    # A draft session only reads the datastores (its output joins the shared history, which is the
    # service's purpose for every decoding client): read-only keys may decode.
    "retrieval.v1.Drafts": frozenset({"Session", "Draft", "DraftBatch", "ListDatastores", "DescribeDatastore"}),
    "retrieval.v1.Graphs": frozenset({"ListGraphs", "DescribeGraph", "Neighbors", "SimilarNodes", "ScoreLinks",
                                      "PredictLinks"}),
    "retrieval.v1.CrossEncoder": frozenset({"ListIndexes", "Describe", "Search", "SearchBatch"}),
    "grpc.health.v1.Health": frozenset({"Check", "Watch"}),
    "grpc.reflection.v1alpha.ServerReflection": frozenset({"ServerReflectionInfo"}),
    "grpc.reflection.v1.ServerReflection": frozenset({"ServerReflectionInfo"}),
}

#: Methods open without a key (standard health checking, so orchestrators can probe the server).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def split_method(full: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``."""
    service, _, method = full.lstrip("/").partition("/")
    return service, method


_read_cache: dict[str, bool] = {}


def register_read_methods(service: str, methods: Iterable[str]) -> None:
    """Declare ``methods`` of ``service`` (full name) as reads (allowed for read-only keys)."""
    READ_METHODS[service] = READ_METHODS.get(service, frozenset()) | frozenset(methods)
    _read_cache.clear()


def _no_side_effects(service: str, method: str) -> bool:
    """True when the proto marks the method ``idempotency_level = NO_SIDE_EFFECTS``."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool

        sd = descriptor_pool.Default().FindServiceByName(service)
        md = sd.methods_by_name.get(method)
        if md is None:
            return False
        return md.GetOptions().idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    except (KeyError, ImportError):
        return False


def is_read_method(full_method: str) -> bool:
    """Whether ``/pkg.Service/Method`` only reads (see the module docstring)."""
    hit = _read_cache.get(full_method)
    if hit is None:
        service, method = split_method(full_method)
        hit = method in READ_METHODS.get(service, ()) or _no_side_effects(service, method)
        _read_cache[full_method] = hit
    return hit


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------
def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _check_key(key: str, where: str) -> str:
    if not MIN_KEY_LEN <= len(key) <= MAX_KEY_LEN:
        raise InvalidArgument(f"an API key in {where} is {len(key)} characters long; keys must have "
                              f"{MIN_KEY_LEN}..{MAX_KEY_LEN} characters (e.g. `python -c \"import secrets; "
                              "print(secrets.token_urlsafe(32))\"`)")
    if not all(33 <= ord(c) < 127 for c in key):
        raise InvalidArgument(f"an API key in {where} has characters outside printable ASCII (or spaces)")
    return key


def parse_keys(text: str, where: str) -> list[str]:
    """Keys from a file's text (one per line, ``#`` comments) or an environment value (also comma-separated)."""
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for part in line.replace(",", " ").split():
            keys.append(_check_key(part, where))
    return keys


def read_key_file(path: Path) -> list[str]:
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FailedPrecondition(f"cannot read API key file {path}: {e.strerror or e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("API key file %s is readable by other users (mode %o); chmod 600 it",
                       path, stat.S_IMODE(st.st_mode))
    keys = parse_keys(text, str(path))
    if not keys:
        raise FailedPrecondition(f"API key file {path} holds no key")
    return keys


class KeyStore:
    """Configured API keys (read-write and read-only), kept as SHA-256 digests."""

    def __init__(self, read_write: Iterable[str] = (), read_only: Iterable[str] = ()) -> None:
        self._entries: tuple[tuple[bytes, bool], ...] = tuple(
            [(_digest(k), False) for k in read_write] + [(_digest(k), True) for k in read_only])

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, presented: str | None) -> str | None:
        """``"rw"``, ``"ro"`` or ``None`` (unknown key). Constant time in the presented key: every
        configured key is compared (SHA-256 digests, :func:`hmac.compare_digest`), no early exit."""
        if presented is None:
            return None
        d = _digest(presented)
        found_rw = found_ro = False
        for digest, ro in self._entries:
            same = hmac.compare_digest(d, digest)
            found_ro |= same and ro
            found_rw |= same and not ro
        return "rw" if found_rw else ("ro" if found_ro else None)

    @classmethod
    def from_settings(cls, security, environ: Mapping[str, str] | None = None) -> "KeyStore":
        env = os.environ if environ is None else environ
        rw: list[str] = []
        ro: list[str] = []
        if security.api_keys_file is not None:
            rw += read_key_file(security.api_keys_file)
        if security.read_only_keys_file is not None:
            ro += read_key_file(security.read_only_keys_file)
        if env.get(ENV_KEYS):
            rw += parse_keys(env[ENV_KEYS], f"${ENV_KEYS}")
        if env.get(ENV_READ_ONLY_KEYS):
            ro += parse_keys(env[ENV_READ_ONLY_KEYS], f"${ENV_READ_ONLY_KEYS}")
        if ro and not rw:
            logger.warning("only read-only API keys are configured: no client can write")
        return cls(rw, ro)


def key_from_metadata(metadata) -> str | None:
    """The API key a call carries (``authorization: Bearer <key>`` or ``x-api-key``), else None."""
    for key, value in metadata or ():
        if key == "authorization":
            v = value if isinstance(value, str) else value.decode("latin-1")
            scheme, _, token = v.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
        elif key == "x-api-key":
            return (value if isinstance(value, str) else value.decode("latin-1")).strip()
    return None


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one call: ``code`` None when allowed."""

    code: grpc.StatusCode | None
    message: str = ""


ALLOWED = Verdict(None)


class Authenticator:
    """Decides per call: open method, valid key, read-only key on a read."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return self.keys.enabled

    def check(self, method: str, metadata) -> Verdict:
        if not self.keys.enabled or method.startswith(OPEN_PREFIXES):
            return ALLOWED
        presented = key_from_metadata(metadata)
        if presented is None:
            return Verdict(grpc.StatusCode.UNAUTHENTICATED,
                           "this server requires an API key: send metadata 'authorization: Bearer <key>' "
                           "(Python client: Client(..., api_key=...) or $RETRIEVAL_API_KEY)")
        role = self.keys.check(presented)
        if role is None:
            return Verdict(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid for this server")
        if role == "ro" and not is_read_method(method):
            return Verdict(grpc.StatusCode.PERMISSION_DENIED,
                           f"{method} changes data; the API key is read-only")
        return ALLOWED


# ------------------------------------------------------------------------------------------------
# Listening address and start-up checks
# ------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    h = host.strip().strip("[]").lower()
    if h in ("localhost", "ip6-localhost"):
        return True
    if h.startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name, "0.0.0.0", "::" or "": reachable from outside


def check_startup(settings, keys: KeyStore) -> None:
    """Refuse to start when the server would be reachable without a key (raises FailedPrecondition)."""
    sec = settings.security
    loopback = is_loopback(settings.host)
    if not loopback and sec.require_api_key is False:
        raise FailedPrecondition(
            f"security.require_api_key is false but the server listens on {settings.host}, which other "
            "machines can reach; API keys cannot be turned off there")
    required = (not loopback) if sec.require_api_key is None else sec.require_api_key
    if required and not keys.enabled:
        where = f"listens on {settings.host}, which other machines can reach" if not loopback else \
            "has security.require_api_key set"
        raise FailedPrecondition(
            f"refusing to start: the server {where}, and no API key is configured. Put keys in a file "
            f"(one per line, chmod 600) and pass --api-keys-file FILE (or security.api_keys_file in the "
            f"config), or set ${ENV_KEYS}; or listen on 127.0.0.1. Keys are never taken from flags.")
    if (sec.tls_cert_file is None) != (sec.tls_key_file is None):
        raise FailedPrecondition("TLS needs both security.tls_cert_file and security.tls_key_file")
    if sec.tls_client_ca_file is not None and sec.tls_cert_file is None:
        raise FailedPrecondition("mutual TLS (security.tls_client_ca_file) needs the server's own "
                                 "certificate too (security.tls_cert_file and security.tls_key_file)")
    if not loopback and sec.tls_cert_file is None:
        logger.warning("listening on %s without TLS: API keys and data cross the network in clear text; "
                       "set security.tls_cert_file and security.tls_key_file", settings.host)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FailedPrecondition(f"cannot read {what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise FailedPrecondition(f"{what} {path} is not a PEM file")
    return data


def server_credentials(security) -> grpc.ServerCredentials | None:
    """TLS credentials of the listening port, or None for plaintext."""
    if security.tls_cert_file is None:
        return None
    cert = _read_pem(security.tls_cert_file, "TLS certificate")
    key = _read_pem(security.tls_key_file, "TLS private key")
    ca = _read_pem(security.tls_client_ca_file, "client CA bundle") if security.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


# ------------------------------------------------------------------------------------------------
# Files named by clients
# ------------------------------------------------------------------------------------------------
def allowed_client_dirs(settings, data_dir: Path) -> list[Path]:
    """The folders clients may name files in, real paths (an allowed folder that is a symlink is the
    operator's choice and is resolved)."""
    dirs = list(settings.security.client_file_dirs) or [Path(data_dir) / "imports"]
    return [Path(d).resolve() for d in dirs]


def _refuse_hard_link(path: Path, what: str, dirs: list[Path]) -> None:
    try:
        st = path.stat()
    except OSError:  # missing: the caller says NotFound
        return
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        raise PermissionDenied(f"{what} {str(path)!r} has {st.st_nlink} hard links; a hard link may point at a file "
                               f"outside the folders clients may read from ({', '.join(map(str, dirs))}): copy "
                               "the file instead of linking it")


def resolve_client_file(path: str, settings, data_dir: Path, what: str = "input file") -> Path:
    """A path a client sent, resolved (symlinks included) and checked to lie inside an allowed folder
    (``security.client_file_dirs``, default ``<data_dir>/imports``). Raises InvalidArgument for
    malformed paths and PermissionDenied for paths outside, and for a regular file with more than one
    hard link (it may be a link to a file outside). Read the file through :mod:`retrieval.server.sandbox`
    (this check alone leaves a gap until the file is opened)."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{what} must be a non-empty path")
    if "\x00" in path or len(path) > 4096:
        raise InvalidArgument(f"{what} is not a valid path (NUL byte or longer than 4096 characters)")
    dirs = allowed_client_dirs(settings, data_dir)
    p = Path(path)
    candidates = [p.resolve()] if p.is_absolute() else [(d / p).resolve() for d in dirs]
    for c in candidates:
        for d in dirs:
            if c == d or d in c.parents:
                _refuse_hard_link(c, what, dirs)
                return c
    shown = path.encode("unicode_escape").decode("ascii")[:200]
    raise PermissionDenied(f"{what} {shown!r} is outside the folders clients may read from "
                           f"({', '.join(map(str, dirs))}); set security.client_file_dirs to allow more")
