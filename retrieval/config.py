"""Server settings: defaults < YAML config file < environment (RETRIEVAL_*) < command-line flags.

Example ``retrieval.yaml``::

    host: 127.0.0.1
    port: 50051
    data_dir: ./data
    limits: {max_k: 1024, max_batch: 10000}
    durability: FULL

Environment: ``RETRIEVAL_PORT=6000``, ``RETRIEVAL_LIMITS__MAX_K=100`` (nested with ``__``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource


class LimitsSettings(BaseModel):
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest gRPC message, both ways")
    max_k: int = Field(1024, ge=1)
    max_batch: int = Field(10_000, ge=1, description="queries per search; points per upsert, get or delete")
    max_payload_bytes: int = Field(65_536, ge=2)
    max_ef: int = Field(100_000, ge=1)
    max_scroll: int = Field(10_000, ge=1)


class IndexingSettings(BaseModel):
    threads: int = Field(0, ge=0, description="threads for index builds and batch searches; 0 = all cores")
    snapshot_every: int = Field(50_000, ge=1, description="points written between index snapshots")
    snapshot_interval_s: float = Field(60.0, gt=0)
    filter_exact_threshold: int = Field(2048, ge=0, description="filters matching at most this many points "
                                        "are searched exactly")
    slice_ms: float = Field(20.0, gt=0, description="longest the indexer holds the event loop per chunk")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    data_dir: Path = Path("./data")
    durability: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: an acknowledged write survives a power cut; NORMAL: survives kill -9 only")
    grace_s: float = Field(5.0, ge=0, description="seconds in-flight calls get on shutdown")
    max_concurrent_jobs: int = Field(1, ge=1, description="jobs running at the same time")
    log_level: str = "INFO"
    access_log: bool = Field(False, description="log every request (otherwise only errors and slow calls)")
    limits: LimitsSettings = LimitsSettings()
    indexing: IndexingSettings = IndexingSettings()

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
