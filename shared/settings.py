"""Settings of each process kind, read from `SLUICE_*` environment variables and checked at start.

One class per process: `GatewaySettings`, `WorkerSettings`, `UpSettings` (the `sluice up`
launcher), `ScalerSettings`. Every field can be set as `SLUICE_<FIELD>` (case-insensitive) or as
a keyword argument; keyword arguments win. List fields take a comma-separated string
(`SLUICE_API_KEYS=k1,k2`) or a JSON list. `load_settings(cls)` turns a validation failure into one
readable `InvalidSettingsError` that names the environment variables, which is what an entry point
should print before exiting.

Nothing here imports torch or the engine: the valid dtypes and load formats are repeated below,
and the engine checks them again when it loads the model.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "SLUICE_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_SCHEMES = ("redis", "rediss", "unix")

# Ids end up inside Redis key and channel names (shared/names.py): keep them to plain characters.
_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# Model names end up inside the `{model}` hash tag: a brace would change which part Redis Cluster
# hashes, and whitespace or control characters have no business in a name clients type.
_BAD_MODEL_NAME = re.compile(r"[{}\s\x00-\x1f\x7f]")
# API keys travel in `Authorization: Bearer <key>` and, for `sluice up`, in the comma-separated
# SLUICE_API_KEYS of the gateway it starts.
_BAD_API_KEY = re.compile(r"[,\s\x00-\x1f\x7f]")

Dtype = Literal["auto", "float32", "fp32", "float", "float16", "fp16", "half", "bfloat16", "bf16"]
LoadFormat = Literal["auto", "safetensors", "dummy"]
# "auto": CUDA when available, else the CPU. The engine accepts any torch device string, but a
# worker serves on one of these.
_DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"

# A list field read from the environment as a comma-separated string: NoDecode keeps
# pydantic-settings from parsing it as JSON first, and `_split_list` does the parsing.
StrList = Annotated[list[str], NoDecode]


class InvalidSettingsError(ValueError):
    """Settings failed validation; the message lists every problem by environment variable."""


def _split_list(value: Any) -> Any:
    """`"a, b,,c"` -> `["a", "b", "c"]`; a JSON list string is parsed; duplicates dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"looks like a JSON list but is not valid JSON: {e}") from e
        else:
            value = text.split(",")
    if isinstance(value, list | tuple):
        items = [item.strip() if isinstance(item, str) else item for item in value]
        return list(dict.fromkeys(item for item in items if item != ""))
    return value  # anything else: let pydantic reject it with its own message


def _check_model_name(name: str) -> str:
    if not name:
        raise ValueError("a model name cannot be empty")
    if _BAD_MODEL_NAME.search(name):
        raise ValueError(f"model name {name!r} may not contain braces, whitespace or control "
                         "characters (it is part of Redis key names)")
    return name


def _check_api_key(key: str) -> str:
    if _BAD_API_KEY.search(key):
        raise ValueError("an API key may not contain commas, whitespace or control characters")
    return key


def _check_redis_url(url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"redis_url must start with {', '.join(s + '://' for s in REDIS_SCHEMES)}"
                         f" (got {url!r})")
    return url


def new_api_key() -> str:
    """A random API key, for `sluice up` when none is given."""
    return "sk-sluice-" + secrets.token_urlsafe(24)


def _default_gateway_id() -> str:
    return secrets.token_hex(4)


def _default_worker_id() -> str:
    # Hostname and pid tell an operator where a worker runs; the random part keeps a restarted
    # process (same pid in a fresh container) from inheriting the old one's pending jobs by name.
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/sluice`, else `~/.local/share/sluice`."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "sluice"


class _Settings(BaseSettings):
    # extra="forbid": a misspelled keyword argument is an error, not a silently ignored option.
    # Unknown SLUICE_* variables are ignored, since one environment can serve every process kind.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid",
                                      validate_default=True)


class GatewaySettings(_Settings):
    redis_url: str = DEFAULT_REDIS_URL
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: StrList = Field(default_factory=list, repr=False)
    # An open gateway only when asked for: with no key and this False, validation fails.
    allow_unauthenticated: bool = False
    models: StrList = Field(default_factory=list)  # empty: discovered from worker heartbeats
    queue_cap: int = Field(default=1024, ge=1)  # queued jobs per model before 429
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    record_ttl_s: int = Field(default=3600, ge=1)
    idempotency_ttl_s: int = Field(default=86400, ge=1)
    gateway_id: str = Field(default_factory=_default_gateway_id, pattern=_ID_PATTERN)
    keepalive_s: float = Field(default=10.0, gt=0)  # SSE comment interval while a request waits
    # Keep polling this long after each request or reply instead of sleeping (shared/busy_poll.py):
    # lower latency for a core's worth of CPU while traffic flows. None: 20 ms where the gateway
    # may use 8 or more CPUs (affinity capped by a cgroup quota), else 0 (off).
    busy_poll_ms: float | None = Field(default=None, ge=0, le=1000)

    @field_validator("api_keys", "models", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return _check_redis_url(v)

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: list[str]) -> list[str]:
        return [_check_api_key(k) for k in v]

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        return [_check_model_name(m) for m in v]

    @model_validator(mode="after")
    def _refuse_open_gateway(self) -> GatewaySettings:
        if not self.api_keys and not self.allow_unauthenticated:
            raise ValueError(
                "no API key configured and the gateway refuses to run open: set "
                f"{ENV_PREFIX}API_KEYS=key1,key2 (comma-separated), or set "
                f"{ENV_PREFIX}ALLOW_UNAUTHENTICATED=true to accept requests without a key")
        return self


class WorkerSettings(_Settings):
    redis_url: str = DEFAULT_REDIS_URL
    # "tiny", a shipped config name (e.g. "qwen3-0.6b"), a model folder or a hub id.
    model: str = Field(default="tiny", min_length=1)
    # The name clients use. Filled in by validation when not given: the basename of `model`
    # ("tiny" for the tiny model, "Qwen3-0.6B" for "Qwen/Qwen3-0.6B" or ".../Qwen3-0.6B/").
    served_model_name: str | None = None
    worker_id: str = Field(default_factory=_default_worker_id, pattern=_ID_PATTERN)
    device: str = Field(default="auto", pattern=_DEVICE_PATTERN)
    dtype: Dtype = "auto"
    load_format: LoadFormat = "auto"
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)
    # Pull jobs only while the engine's waiting queue is below max_waiting and at least this
    # share of KV blocks is free: what stays queued in Redis can go to a less busy worker.
    max_waiting: int = Field(default=8, ge=1)
    min_free_blocks_frac: float = Field(default=0.05, ge=0, lt=1)
    heartbeat_s: float = Field(default=1.0, gt=0)
    heartbeat_ttl_s: float = Field(default=5.0, gt=0)
    # A job delivered but not acknowledged for this long may be claimed by another worker.
    claim_idle_ms: int = Field(default=15000, ge=1)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # Prometheus; None: off
    max_deliveries: int = Field(default=3, ge=1)  # after this many, a job goes to the dead letters
    record_ttl_s: int = Field(default=3600, ge=1)
    read_batch: int = Field(default=16, ge=1)
    # The front and the engine core keep polling this long after each job or step instead of
    # sleeping (shared/busy_poll.py): lower latency for a core each. None: 20 ms where the engine
    # runs on a GPU (a GPU host has cores to spare), 0 (off) on the CPU.
    busy_poll_ms: float | None = Field(default=None, ge=0, le=1000)
    # The engine core's own window (None: as busy_poll_ms). A core woken from sleep also steps
    # slower to a first token than one that kept polling.
    core_busy_poll_ms: float | None = Field(default=None, ge=0, le=1000)
    # Where requests without a seed draw from; None: a random seed per worker process, so
    # replicas (and restarts) do not repeat each other's "random" tokens.
    seed: int | None = Field(default=None, ge=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return _check_redis_url(v)

    @field_validator("served_model_name")
    @classmethod
    def _served_name(cls, v: str | None) -> str | None:
        return None if v is None else _check_model_name(v)

    @model_validator(mode="after")
    def _derive_and_cross_check(self) -> WorkerSettings:
        if self.served_model_name is None:
            self.served_model_name = _check_model_name(Path(self.model.rstrip("/")).name
                                                       or self.model)
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            # Otherwise the heartbeat key expires between two beats and the worker flickers
            # out of the fleet the gateway and scaler see.
            raise ValueError(f"heartbeat_ttl_s ({self.heartbeat_ttl_s:g}) must be larger than "
                             f"heartbeat_s ({self.heartbeat_s:g})")
        return self


class UpSettings(_Settings):
    """`sluice up`: an embedded Redis (unless redis_url is given), one worker and the gateway."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    model: str = Field(default="tiny", min_length=1)
    # None: the launcher generates one (new_api_key) and prints it.
    api_key: str | None = Field(default=None, repr=False)
    redis_url: str | None = None  # None: start an embedded redis-server with its AOF in data_dir
    data_dir: Path = Field(default_factory=default_data_dir)
    device: str = Field(default="auto", pattern=_DEVICE_PATTERN)
    # The scaler sizes the local worker fleet within these bounds; 1 and 1 is one steady worker,
    # min_workers 0 scales to zero after idle_timeout_s with nothing queued or running.
    min_workers: int = Field(default=1, ge=0)
    max_workers: int = Field(default=1, ge=1)
    idle_timeout_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> UpSettings:
        _check_bounds(self.min_workers, self.max_workers)
        return self

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v:
            raise ValueError("api_key cannot be empty (leave it unset to generate one)")
        return _check_api_key(v)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        return None if v is None else _check_redis_url(v)

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, v: Path) -> Path:
        return v.expanduser()


def _check_bounds(min_workers: int, max_workers: int) -> None:
    if min_workers > max_workers:
        raise ValueError(f"min_workers ({min_workers}) must not exceed max_workers ({max_workers})")


class ScalerSettings(_Settings):
    """`sluice scaler` (and the scaler inside `sluice up`): sizes one model's worker fleet."""

    redis_url: str = DEFAULT_REDIS_URL
    model: str = Field(default="tiny", min_length=1)  # what a started worker loads
    served_model_name: str | None = None  # the queue it serves; default: basename of model
    backend: Literal["local", "kubernetes"] = "local"
    min_workers: int = Field(default=0, ge=0)
    max_workers: int = Field(default=4, ge=1)
    # Scale to zero only after this long with nothing queued or running.
    idle_timeout_s: float = Field(default=300.0, gt=0)
    # Scale down only after the desired count stayed lower for this long (no flapping).
    stabilization_s: float = Field(default=60.0, ge=0)
    max_surge: int = Field(default=4, ge=1)  # most workers started by one decision
    # Queued or running jobs one worker is expected to hold; the queue-based target is
    # backlog / target_per_worker.
    target_per_worker: int = Field(default=16, ge=1)
    kv_high: float = Field(default=0.85, gt=0, le=1)  # ready workers above this KV usage: +1
    interval_s: float = Field(default=1.0, gt=0)  # between two decisions
    drain_timeout_s: float = Field(default=300.0, gt=0)  # then the backend removes it anyway
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    device: str = Field(default="auto", pattern=_DEVICE_PATTERN)  # of local workers
    worker_args: StrList = Field(default_factory=list)  # extra `sluice worker` flags (local)
    # Kubernetes backend: the worker Deployment to scale.
    namespace: str | None = None  # None: the scaler pod's own namespace, else "default"
    deployment: str = "sluice-worker"

    @field_validator("worker_args", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return _check_redis_url(v)

    @model_validator(mode="after")
    def _derive_and_cross_check(self) -> ScalerSettings:
        if self.served_model_name is None:
            self.served_model_name = _check_model_name(Path(self.model.rstrip("/")).name
                                                       or self.model)
        _check_bounds(self.min_workers, self.max_workers)
        return self


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build `cls` from the environment and `overrides`; InvalidSettingsError lists every problem.

    Overrides set to None are dropped, so CLI options that were not given fall through to the
    environment and the defaults.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as e:
        raise InvalidSettingsError(_describe(cls, e, set(given))) from e


def _describe(cls: type[BaseSettings], error: ValidationError, given: set[str]) -> str:
    lines = [f"invalid {cls.__name__}:"]
    for err in error.errors():
        message = str(err["msg"]).removeprefix("Value error, ")
        field = str(err["loc"][0]) if err["loc"] else ""
        if not field:
            lines.append(f"  {message}")
            continue
        where = field if field in given else f"{ENV_PREFIX}{field.upper()}"
        shown = "" if field in ("api_keys", "api_key") else f" (got {err.get('input')!r})"
        lines.append(f"  {where}: {message}{shown}")
    return "\n".join(lines)
