"""Shards as Ray actors: ``retrieval serve --ray ADDRESS``.

Each shard of each collection becomes one async Ray actor (:class:`ShardActor`) that owns an ordinary
:class:`retrieval.vectors.shard.Shard` on its folder (the same folder an in-process shard would use:
``<data_dir>/collections/<name>/shard-<i>``, so the actor must be able to reach that path: one machine,
or a data folder on storage every Ray node mounts at the same path). The server keeps a
:class:`RayShard` handle per shard and calls the actor's methods; a collection fans searches out to
all its shards with ``asyncio.gather`` and merges the top-k, exactly as for in-process shards.

Failure handling is Ray's: actors are created with ``max_restarts`` (restarted when their process or
node dies) and ``max_task_retries`` (calls in flight are retried on the restarted actor). A restarted
actor opens its shard again on its first call, from the newest snapshot plus the writes after it in the
point store, which is the same recovery as an in-process shard after a crash; acknowledged writes are
in the point store before the call returns, so none is lost. Actors are not detached: they share the
server process's fate (Ray removes them when the server stops or dies).

No cluster manager and no RPC of our own: placement, restarts and transport are Ray's.

Thread-safety: a RayShard is used from the server's event-loop thread; a ShardActor runs all its
methods on the actor's own event loop, the one thread the Shard requires.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from retrieval.errors import FailedPrecondition, InvalidArgument, RetrievalError, Unavailable
from retrieval.indexes import registry
from retrieval.indexes.base import IndexSpec, QueryParams
from retrieval.vectors.results import prepare_vectors
from retrieval.vectors.shard import ShardSettings

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Connecting to Ray
# ------------------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray
    except ImportError:
        raise FailedPrecondition("Ray is not installed; install it with: pip install 'ray>=2.9'") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of ``host:port`` / ``ray://host:port`` (None for "auto")."""
    a = address.strip()
    if a == "auto":
        return None
    if "://" in a:
        scheme, a = a.split("://", 1)
        if scheme not in ("ray",):
            raise InvalidArgument(f"Ray address {address!r} has scheme {scheme!r}; use host:port or ray://host:port")
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"Ray address {address!r} is not host:port, ray://host:port, 'auto' or 'local'")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`Unavailable` unless something accepts TCP connections at the Ray address
    (``ray.init`` itself would retry for minutes)."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        raise Unavailable(f"no Ray cluster answers at {address!r} ({hp[0]}:{hp[1]}: {e.strerror or e}); "
                          "start one with `ray start --head` or pass the address it printed") from None


def connect(address: str | None = None, num_cpus: int | None = None, timeout_s: float = 5.0) -> str:
    """Connect this process to Ray (idempotent) and return the cluster's GCS address.

    ``address``: ``host:port`` (a cluster's GCS), ``ray://host:port`` (Ray Client), ``"auto"`` (the
    cluster this machine belongs to), or ``None`` / ``""`` / ``"local"`` to start a local instance
    (with ``num_cpus`` CPUs, default all). An address nobody answers at raises :class:`Unavailable`
    naming it. Must be called from the main thread (Ray's requirement).
    """
    ray = _import_ray()
    if address not in (None, "", "local"):
        check_reachable(address, timeout_s)  # even when connected: a wrong address is still an error
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    if address in (None, "", "local"):
        if num_cpus is not None:
            kw["num_cpus"] = num_cpus
        ray.init(**kw)
    else:
        try:
            ray.init(address=address, **kw)
        except ConnectionError as e:
            raise Unavailable(f"could not connect to the Ray cluster at {address!r}: {e}") from None
    gcs = ray.get_runtime_context().gcs_address
    logger.info("connected to Ray at %s (%s)", gcs, address or "local instance")
    return gcs


def unwrap_error(e: BaseException) -> BaseException:
    """The error a Ray call raised inside the actor / task, when it is one of ours."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, RetrievalError):
        return cause
    return e


# ------------------------------------------------------------------------------------------------
# The actor
# ------------------------------------------------------------------------------------------------
class ShardActor:
    """Owns one Shard inside a Ray actor process. Opens it lazily on the first call, so a restarted
    actor (Ray re-runs ``__init__``) recovers from its snapshot and point store by itself."""

    def __init__(self, folder: str, d: int, metric: str, spec: dict, settings: dict, name: str) -> None:
        self._args = (Path(folder), d, metric, registry.spec_from_dict(spec), ShardSettings(**settings), name)
        self._shard = None
        self._opening: asyncio.Future | None = None
        self._location = ""

    async def _get(self):
        if self._shard is not None:
            return self._shard
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opening)
        return self._shard

    async def _open(self) -> None:
        import ray

        from retrieval.vectors.shard import Shard

        folder, d, metric, spec, settings, name = self._args
        shard = Shard(folder, d, metric, spec, settings, name=name)
        try:
            await shard.open()
        except BaseException:
            self._opening = None  # the next call tries again
            await shard.close(snapshot=False)
            raise
        ctx = ray.get_runtime_context()
        self._location = f"ray:actor {ctx.get_actor_id()[:12]} on {ray.util.get_node_ip_address()} pid {os.getpid()}"
        self._shard = shard

    async def open(self) -> str:
        await self._get()
        return self._location

    async def search(self, xq: np.ndarray, k: int, params: QueryParams):
        return (await self._get()).search(xq, k, params)

    async def search_filtered(self, xq: np.ndarray, k: int, params: QueryParams, where):
        return await (await self._get()).search_filtered(xq, k, params, where)

    async def upsert(self, ids: np.ndarray, vectors: np.ndarray, payloads):
        return await (await self._get()).upsert(ids, vectors, payloads)

    async def delete(self, ids=None, where=None):
        return await (await self._get()).delete(ids=ids, where=where)

    async def read(self, fn: Callable):
        return await (await self._get()).read(fn)

    async def info(self) -> dict:
        info = (await self._get()).info()
        info["location"] = self._location
        return info

    async def wait_indexed(self, timeout: float) -> bool:
        return await (await self._get()).wait_indexed(timeout)

    async def snapshot(self) -> int:
        return await (await self._get()).snapshot()

    async def close(self, snapshot: bool = True) -> None:
        if self._shard is not None:
            await self._shard.close(snapshot)
            self._shard = None

    def pid(self) -> int:
        return os.getpid()


@dataclass(frozen=True)
class RayOptions:
    """How shard actors are placed and restarted.

    num_cpus: CPUs each shard actor reserves in Ray's scheduler (default 0: shards are placed by the
    SPREAD strategy and do not hold back CPUs from build tasks). max_restarts: restarts Ray does after
    the actor's process or node dies (-1: unlimited). max_task_retries: times a call in flight when the
    actor died is retried on the restarted actor (-1: unlimited).
    """

    num_cpus: float = 0.0
    max_restarts: int = -1
    max_task_retries: int = 3


_ACTOR_CLS = None


def actor_class():
    """``ShardActor`` as a Ray actor class (made once, on first use)."""
    global _ACTOR_CLS
    if _ACTOR_CLS is None:
        ray = _import_ray()
        _ACTOR_CLS = ray.remote(ShardActor)
    return _ACTOR_CLS


# ------------------------------------------------------------------------------------------------
# The handle the collection holds
# ------------------------------------------------------------------------------------------------
class RayShard:
    """A :class:`retrieval.vectors.handles.ShardHandle` whose shard lives in a Ray actor."""

    is_local = False

    def __init__(self, folder: Path, d: int, metric: str, spec: IndexSpec, settings: ShardSettings, name: str,
                 options: RayOptions = RayOptions()) -> None:
        self.folder = Path(folder)
        self.d = d
        self.metric = metric
        self.spec = spec
        self.settings = settings
        self.name = name
        self.options = options
        self.actor = None
        self._info: dict = {"indexed": 0, "pending": 0, "deleted_in_index": 0, "last_seq": 0, "snapshot_seq": 0,
                            "memory_bytes": 0, "state": "opening", "location": "ray"}

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return prepare_vectors(x, self.metric)

    async def _call(self, method: str, *args, **kw):
        if self.actor is None:
            raise FailedPrecondition(f"collection shard {self.name} is closed")
        try:
            return await getattr(self.actor, method).remote(*args, **kw)
        except Exception as e:
            err = unwrap_error(e)
            if err is not e:
                raise err from None
            import ray.exceptions as rex

            if isinstance(e, (rex.RayActorError, rex.ActorUnavailableError)):
                raise Unavailable(f"the Ray actor of shard {self.name} is unavailable ({type(e).__name__}); "
                                  "Ray restarts it, retry the call") from None
            raise

    async def open(self) -> None:
        opts = self.options
        self.actor = actor_class().options(
            num_cpus=opts.num_cpus, max_restarts=opts.max_restarts, max_task_retries=opts.max_task_retries,
            scheduling_strategy="SPREAD", name=None,
        ).remote(str(self.folder), self.d, self.metric, registry.spec_to_dict(self.spec), asdict(self.settings),
                 self.name)
        try:
            self._info["location"] = await self._call("open")
        except BaseException:
            await self._kill()
            raise

    async def _kill(self) -> None:
        if self.actor is not None:
            import ray

            ray.kill(self.actor, no_restart=True)
            self.actor = None

    async def close(self, snapshot: bool = True) -> None:
        if self.actor is None:
            return
        try:
            await self._call("close", snapshot)
        except Exception:
            logger.exception("closing the Ray actor of shard %s failed (its point store is intact)", self.name)
        finally:
            await self._kill()

    def search(self, xq: np.ndarray, k: int, params: QueryParams):
        raise FailedPrecondition(f"shard {self.name} lives in a Ray actor; use asearch")

    async def asearch(self, xq: np.ndarray, k: int, params: QueryParams):
        return await self._call("search", xq, k, params)

    async def search_filtered(self, xq: np.ndarray, k: int, params: QueryParams, where):
        return await self._call("search_filtered", xq, k, params, where)

    async def upsert(self, ids: np.ndarray, vectors: np.ndarray, payloads) -> int:
        return await self._call("upsert", ids, vectors, payloads)

    async def delete(self, ids: np.ndarray | None = None, where=None) -> int:
        return await self._call("delete", ids, where)

    async def read(self, fn: Callable):
        return await self._call("read", fn)

    async def ainfo(self) -> dict:
        self._info = await self._call("info")
        return dict(self._info)

    def info(self) -> dict:
        """The last info the actor reported (see :meth:`ainfo`)."""
        return dict(self._info)

    async def wait_indexed(self, timeout: float) -> bool:
        return await self._call("wait_indexed", timeout)

    async def snapshot(self) -> int:
        return await self._call("snapshot")

    async def pid(self) -> int:
        """The actor's process id (tests kill it to check restarts)."""
        return await self._call("pid")


def ray_shard_factory(options: RayOptions = RayOptions()):
    """A :data:`retrieval.vectors.handles.ShardFactory` placing every shard in a Ray actor."""

    def make(folder: Path, d: int, metric: str, spec: IndexSpec, settings: ShardSettings, name: str) -> RayShard:
        return RayShard(folder, d, metric, spec, settings, name, options)

    return make


def factory_from_settings(settings) -> Callable | None:
    """The server's shard factory: Ray actors when ``settings.ray_address`` is set (connecting now;
    :class:`Unavailable` when nobody answers there), else None (in-process shards)."""
    if not settings.ray_address:
        return None
    connect(settings.ray_address, num_cpus=settings.ray.num_cpus)
    r = settings.ray
    return ray_shard_factory(RayOptions(num_cpus=r.shard_cpus, max_restarts=r.max_restarts,
                                        max_task_retries=r.max_task_retries))
