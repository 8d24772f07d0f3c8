"""Server settings: defaults < YAML config file < environment (RETRIEVAL_*) < command-line flags.

Example ``retrieval.yaml``::

    host: 127.0.0.1
    port: 50051
    data_dir: ./data
    limits: {max_k: 1024, max_batch: 10000}
    durability: FULL

Environment: ``RETRIEVAL_PORT=6000``, ``RETRIEVAL_LIMITS__MAX_K=100`` (nested with ``__``).

API keys are never settings values (so they never appear on a command line or in a dump of the
settings): they come from the files named by ``security.api_keys_file`` /
``security.read_only_keys_file`` or from the environment variables ``RETRIEVAL_API_KEYS`` /
``RETRIEVAL_READ_ONLY_API_KEYS`` (see :mod:`retrieval.server.auth`). docs/operations.md has the
production set-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource


class LimitsSettings(BaseModel):
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest gRPC message, both ways")
    max_k: int = Field(1024, ge=1, description="neighbours per query, in every engine")
    max_batch: int = Field(10_000, ge=1, description="queries per search; points per upsert, get or delete")
    max_payload_bytes: int = Field(65_536, ge=2)
    max_ef: int = Field(100_000, ge=1)
    max_scroll: int = Field(10_000, ge=1)
    max_ce_batch: int = Field(256, ge=1, description="queries per cross-encoder SearchBatch")
    max_ce_budget: int = Field(100_000, ge=1, description="cross-encoder calls one query may spend")
    # Backpressure: past these the server answers RESOURCE_EXHAUSTED with a retry-after hint
    # (trailing metadata ``retry-after-ms``) instead of queueing without bound. 0 disables a limit.
    max_points_per_collection: int = Field(0, ge=0, description="stored points per collection; 0 = no limit")
    max_pending_bytes: int = Field(1 << 30, ge=0, description="vector bytes acknowledged but not yet indexed, "
                                   "per collection; writes wait for the indexer past it; 0 = no limit")
    max_inflight_requests: int = Field(512, ge=0, description="unary calls being served at once")
    max_streams: int = Field(256, ge=0, description="streaming calls open at once (sessions included)")
    max_sessions: int = Field(128, ge=0, description="session streams (e.g. draft sessions) open at once")
    max_inflight_write_bytes: int = Field(256 * 1024 * 1024, ge=0,
                                          description="bytes of write requests being served at once")
    retry_after_ms: int = Field(100, ge=1, description="base retry-after hint when saturated")
    max_memory_bytes: int = Field(0, ge=0, description="cap on the server's heap (RLIMIT_DATA); a request that "
                                  "would pass it fails with RESOURCE_EXHAUSTED instead of the kernel killing the "
                                  "server; 0 = no cap")
    max_json_depth: int = Field(64, ge=1, le=10_000, description="deepest nesting of arrays / objects in "
                                "JSON a client sends (params_json, config_json, payload_json, ...); deeper "
                                "is INVALID_ARGUMENT")
    search_chunk: int = Field(1024, ge=1, description="queries per slice of a batch search; the call checks "
                              "its deadline and yields the event loop between slices")


class SecuritySettings(BaseModel):
    """API keys and TLS. Keys are read from files or the environment only (never flags)."""

    api_keys_file: Path | None = Field(None, description="file with one API key per line (read-write)")
    read_only_keys_file: Path | None = Field(None, description="file with one read-only API key per line")
    require_api_key: bool | None = Field(None, description="None: required exactly when listening on a "
                                         "non-loopback address; True: always; False is refused off loopback")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain of the server")
    tls_key_file: Path | None = Field(None, description="PEM private key of the server")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA bundle; when set, clients must present "
                                            "a certificate it signed (mutual TLS)")
    client_file_dirs: list[Path] = Field(default_factory=list, description="folders whose files a client may "
                                         "name as inputs (e.g. corpus files); empty: the data folder's "
                                         "'imports' folder only")


class IndexingSettings(BaseModel):
    threads: int = Field(0, ge=0, description="threads for index builds and batch searches; 0 = all cores")
    snapshot_every: int = Field(50_000, ge=1, description="points written between index snapshots")
    snapshot_interval_s: float = Field(60.0, gt=0)
    filter_exact_threshold: int = Field(2048, ge=0, description="filters matching at most this many points "
                                        "are searched exactly")
    slice_ms: float = Field(20.0, gt=0, description="longest the indexer holds the event loop per chunk")
    filter_exact_in_memory: int = Field(32768, ge=0, description="filters answered by payload indexes "
                                        "(which hold the vectors in memory) matching at most this many points "
                                        "are searched exactly")
    search_threads: int = Field(0, ge=0, description="threads of the search pool that runs native searches "
                                "off the event loop; 0 = all cores")
    coalesce_max_queries: int = Field(256, ge=1, description="most concurrent small queries of one collection "
                                      "answered by one native search call; 1 turns coalescing off")


class RaySettings(BaseModel):
    """Shards as Ray actors (used when ``ray_address`` is set); see :mod:`retrieval.vectors.ray_shards`."""

    shard_cpus: float = Field(0.0, ge=0, description="CPUs each shard actor reserves in Ray's scheduler")
    max_restarts: int = Field(-1, ge=-1, description="restarts of a shard actor after its process dies; -1 = no limit")
    max_task_retries: int = Field(3, ge=-1, description="retries of a call in flight when its actor died")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance started for "
                                 "ray_address 'local' (default: all)")


class DraftsSettings(BaseModel):
    idle_timeout_s: float = Field(300.0, gt=0, description="draft sessions idle this long are evicted")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    data_dir: Path = Path("./data")
    durability: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: an acknowledged write survives a power cut; NORMAL: survives kill -9 only")
    grace_s: float = Field(5.0, ge=0, description="seconds in-flight calls get on shutdown")

    @field_validator("durability", mode="before")
    @classmethod
    def _durability_any_case(cls, v):
        return v.upper() if isinstance(v, str) else v  # --durability full, NORMAL, Normal...
    max_concurrent_jobs: int = Field(1, ge=1, description="jobs running at the same time")
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line, with "
                                                "the request id of the call that logged it")
    access_log: bool = Field(False, description="log every request (otherwise only errors and slow calls)")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus metrics over HTTP on this "
                                     "port (0 picks a free one); None = off")
    metrics_host: str = Field("127.0.0.1", description="address of the metrics endpoint")
    http_port: int | None = Field(None, ge=0, le=65535, description="HTTP/JSON API and web dashboard on this "
                                  "port, on ``host`` (0 picks a free one); None = off (docs/http.md)")
    limits: LimitsSettings = LimitsSettings()
    indexing: IndexingSettings = IndexingSettings()
    security: SecuritySettings = SecuritySettings()
    drafts: DraftsSettings = DraftsSettings()
    ray_address: str | None = Field(None, description="place collection shards as actors on this Ray cluster "
                                    "(host:port, ray://host:port, 'auto', or 'local' for a local instance); "
                                    "None = shards live in the server process")
    ray: RaySettings = RaySettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _CONFIG_FILE is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=_CONFIG_FILE))
        return tuple(sources)


_CONFIG_FILE: Path | None = None


def load_settings(config_file: Path | None = None, **overrides) -> Settings:
    """Settings from ``config_file`` (YAML), the environment and ``overrides`` (flags), in rising priority."""
    global _CONFIG_FILE
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    _CONFIG_FILE = Path(config_file) if config_file is not None else None
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _CONFIG_FILE = None
