"""Settings: SLUICE_* parsing, the closed-by-default gateway, bounds."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.settings import (
    GatewaySettings,
    InvalidSettingsError,
    UpSettings,
    WorkerSettings,
    default_data_dir,
    load_settings,
    new_api_key,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the SLUICE_* variables they set themselves."""
    for name in list(os.environ):
        if name.upper().startswith("SLUICE_"):
            monkeypatch.delenv(name)


# -- gateway ---------------------------------------------------------------------------------


def test_comma_separated_api_keys_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_API_KEYS", " key-a, key-b,,key-a ")
    assert GatewaySettings().api_keys == ["key-a", "key-b"]


def test_single_api_key_and_json_list_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_API_KEYS", "only")
    assert GatewaySettings().api_keys == ["only"]
    monkeypatch.setenv("SLUICE_API_KEYS", '["k1", "k2"]')
    assert GatewaySettings().api_keys == ["k1", "k2"]


def test_models_and_scalars_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_API_KEYS", "k")
    monkeypatch.setenv("SLUICE_MODELS", "tiny,Qwen/Qwen3-0.6B")
    monkeypatch.setenv("SLUICE_PORT", "9000")
    monkeypatch.setenv("sluice_queue_cap", "5")  # names are case-insensitive
    monkeypatch.setenv("SLUICE_REQUEST_TIMEOUT_S", "1.5")
    monkeypatch.setenv("SLUICE_REDIS_URL", "redis://redis.internal:6380/2")
    s = GatewaySettings()
    assert s.models == ["tiny", "Qwen/Qwen3-0.6B"]
    assert (s.port, s.queue_cap, s.request_timeout_s) == (9000, 5, 1.5)
    assert s.redis_url == "redis://redis.internal:6380/2"


def test_keyword_arguments_accept_strings_and_lists() -> None:
    as_string: dict[str, Any] = {"api_keys": "a,b"}  # what a CLI flag passes through
    assert GatewaySettings(**as_string).api_keys == ["a", "b"]
    assert GatewaySettings(api_keys=["a", " b "]).api_keys == ["a", "b"]


def test_gateway_defaults() -> None:
    s = GatewaySettings(api_keys=["k"])
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.allow_unauthenticated is False and s.models == []
    assert (s.queue_cap, s.request_timeout_s, s.max_body_bytes) == (1024, 600, 4 * 1024 * 1024)
    assert (s.record_ttl_s, s.idempotency_ttl_s, s.keepalive_s) == (3600, 86400, 10)
    assert re.fullmatch(r"[0-9a-f]{8}", s.gateway_id)
    assert GatewaySettings(api_keys=["k"]).gateway_id != s.gateway_id


def test_api_keys_stay_out_of_repr() -> None:
    s = GatewaySettings(api_keys=["secret-key"])
    assert "secret-key" not in repr(s) and "secret-key" not in str(s)
    assert "secret-key" not in repr(UpSettings(api_key="secret-key"))


def test_open_gateway_is_refused_by_default() -> None:
    with pytest.raises(ValidationError) as info:
        GatewaySettings()
    message = str(info.value)
    assert "SLUICE_API_KEYS" in message and "SLUICE_ALLOW_UNAUTHENTICATED" in message


def test_open_gateway_is_refused_through_load_settings_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_API_KEYS", " , ")  # only blanks: no key at all
    with pytest.raises(InvalidSettingsError, match="SLUICE_API_KEYS=key1,key2") as info:
        load_settings(GatewaySettings)
    assert "SLUICE_ALLOW_UNAUTHENTICATED=true" in str(info.value)
    assert "Value error" not in str(info.value)


def test_open_gateway_allowed_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings(allow_unauthenticated=True).api_keys == []
    monkeypatch.setenv("SLUICE_ALLOW_UNAUTHENTICATED", "true")
    s = GatewaySettings()
    assert s.allow_unauthenticated and s.api_keys == []


@pytest.mark.parametrize("field, value", [
    ("port", 0), ("port", 65536), ("queue_cap", 0), ("request_timeout_s", 0),
    ("max_body_bytes", 0), ("record_ttl_s", 0), ("idempotency_ttl_s", 0), ("keepalive_s", 0),
    ("keepalive_s", -1), ("gateway_id", ""), ("gateway_id", "a:b"), ("gateway_id", "x" * 200),
    ("redis_url", "http://127.0.0.1:6379"), ("redis_url", "127.0.0.1:6379"),
    ("models", ["{tiny}"]), ("models", ["has space"]), ("api_keys", ["with space"]),
    ("api_keys", '["a,b"]'),
])
def test_gateway_rejects(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"api_keys": ["k"], field: value}
    with pytest.raises(ValidationError):
        GatewaySettings(**kwargs)


def test_load_settings_names_the_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_API_KEYS", "k")
    monkeypatch.setenv("SLUICE_PORT", "70000")
    with pytest.raises(InvalidSettingsError, match=r"SLUICE_PORT: .*65535 \(got '70000'\)"):
        load_settings(GatewaySettings)


def test_load_settings_names_overrides_by_field_and_hides_keys() -> None:
    with pytest.raises(InvalidSettingsError) as info:
        load_settings(GatewaySettings, api_keys=["bad key"], queue_cap=0, port=None)
    message = str(info.value)
    assert "queue_cap:" in message and "SLUICE_QUEUE_CAP" not in message
    assert "api_keys:" in message and "bad key" not in message
    assert "port" not in message  # None overrides fall through to the default


def test_unknown_keyword_is_an_error() -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(api_keys=["k"], queue_capp=3)  # type: ignore[call-arg]


def test_unknown_sluice_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_HEARTBEAT_S", "2")  # a worker setting, in a shared environment
    assert GatewaySettings(api_keys=["k"]).port == 8000


# -- worker ----------------------------------------------------------------------------------


def test_worker_defaults() -> None:
    s = WorkerSettings()
    assert (s.model, s.served_model_name, s.device, s.dtype, s.load_format) == (
        "tiny", "tiny", "auto", "auto", "auto")
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.max_model_len) == (64, 2048, None)
    assert (s.max_waiting, s.min_free_blocks_frac) == (8, 0.05)
    assert (s.heartbeat_s, s.heartbeat_ttl_s, s.claim_idle_ms) == (1.0, 5.0, 15000)
    assert (s.max_deliveries, s.record_ttl_s, s.read_batch) == (3, 3600, 16)
    assert re.fullmatch(rf".+-{os.getpid()}-[0-9a-f]{{6}}", s.worker_id)
    assert WorkerSettings().worker_id != s.worker_id


@pytest.mark.parametrize("model, served", [
    ("tiny", "tiny"), ("/models/Llama-3.1-8B/", "Llama-3.1-8B"), ("Qwen/Qwen3-0.6B", "Qwen3-0.6B"),
    ("qwen3-0.6b", "qwen3-0.6b"),
])
def test_served_model_name_defaults_to_the_basename(model: str, served: str) -> None:
    assert WorkerSettings(model=model).served_model_name == served
    assert WorkerSettings(model=model, served_model_name="custom").served_model_name == "custom"


def test_worker_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_MODEL", "/m/qwen")
    monkeypatch.setenv("SLUICE_DEVICE", "cuda:1")
    monkeypatch.setenv("SLUICE_DTYPE", "bf16")
    monkeypatch.setenv("SLUICE_MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("SLUICE_KV_CACHE_MEMORY_BYTES", str(2 * 1024**3))
    s = WorkerSettings()
    assert (s.served_model_name, s.device, s.dtype) == ("qwen", "cuda:1", "bf16")
    assert (s.max_model_len, s.kv_cache_memory_bytes) == (4096, 2 * 1024**3)


@pytest.mark.parametrize("field, value", [
    ("max_num_seqs", 0), ("max_num_batched_tokens", 0), ("max_model_len", 0),
    ("kv_cache_memory_bytes", 0), ("max_waiting", 0), ("min_free_blocks_frac", -0.1),
    ("min_free_blocks_frac", 1.0), ("heartbeat_s", 0), ("heartbeat_ttl_s", 0),
    ("claim_idle_ms", 0), ("max_deliveries", 0), ("record_ttl_s", 0), ("read_batch", 0),
    ("device", "gpu"), ("device", "cuda:x"), ("dtype", "int8"), ("load_format", "pt"),
    ("model", ""), ("served_model_name", "a{b}"), ("worker_id", "a b"),
    ("redis_url", "localhost"),
])
def test_worker_rejects(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        WorkerSettings(**{field: value})


def test_heartbeat_ttl_must_outlast_the_interval() -> None:
    with pytest.raises(ValidationError, match="heartbeat_ttl_s"):
        WorkerSettings(heartbeat_s=2.0, heartbeat_ttl_s=2.0)
    assert WorkerSettings(heartbeat_s=2.0, heartbeat_ttl_s=6.0).heartbeat_ttl_s == 6.0


# -- sluice up -------------------------------------------------------------------------------


def test_up_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    s = UpSettings()
    assert (s.host, s.port, s.model, s.device) == ("127.0.0.1", 8000, "tiny", "auto")
    assert s.api_key is None and s.redis_url is None
    assert s.data_dir == Path.home() / ".local" / "share" / "sluice"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert UpSettings().data_dir == default_data_dir() == tmp_path / "sluice"


def test_up_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_API_KEY", "sk-given")
    monkeypatch.setenv("SLUICE_REDIS_URL", "redis://127.0.0.1:7000/0")
    monkeypatch.setenv("SLUICE_DATA_DIR", "~/sluice-data")
    s = UpSettings()
    assert (s.api_key, s.redis_url) == ("sk-given", "redis://127.0.0.1:7000/0")
    assert s.data_dir == Path.home() / "sluice-data"


@pytest.mark.parametrize("field, value", [
    ("port", 0), ("port", 65536), ("api_key", ""), ("api_key", "a,b"), ("device", "tpu"),
    ("redis_url", "http://x"), ("model", ""),
])
def test_up_rejects(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        UpSettings(**{field: value})


def test_new_api_key_is_random_and_usable_by_the_gateway() -> None:
    a, b = new_api_key(), new_api_key()
    assert a != b and a.startswith("sk-sluice-") and len(a) > 30
    env_style: dict[str, Any] = {"api_keys": f"{a},{b}"}
    assert GatewaySettings(**env_style).api_keys == [a, b]
