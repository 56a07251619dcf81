"""The worker readiness probe against a real Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import redis

from infra.probe import main
from shared import names

WORKER = "sluice-worker-7d9f8-abcde"  # a pod name, as the manifest makes the worker id


def beat(redis_url: str, state: str, ttl_ms: int = 5000) -> None:
    client = redis.Redis.from_url(redis_url)
    body = {"worker_id": WORKER, "model": "tiny", "state": state, "kv_usage": 0.25,
            "running": 2, "waiting": 0}
    client.set(names.worker_heartbeat(WORKER), json.dumps(body), px=ttl_ms)
    client.close()


def probe(redis_url: str, *extra: str) -> int:
    return main(["--redis-url", redis_url, "--worker-id", WORKER, *extra])


def test_ready_worker_passes(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    beat(redis_url, "ready")
    assert probe(redis_url) == 0
    assert "ready" in capsys.readouterr().out


@pytest.mark.parametrize("state", ["starting", "draining", "drained"])
def test_worker_not_ready_fails(redis_url: str, state: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    beat(redis_url, state)
    assert probe(redis_url) == 1
    assert f"is {state}" in capsys.readouterr().out


def test_missing_or_broken_heartbeat_fails(redis_url: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert probe(redis_url) == 1
    assert "no heartbeat" in capsys.readouterr().out
    redis.Redis.from_url(redis_url).set(names.worker_heartbeat(WORKER), b"not json")
    assert probe(redis_url) == 1
    assert "unreadable" in capsys.readouterr().out


def test_unreachable_redis_fails() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert probe(f"redis://127.0.0.1:{port}/0", "--timeout-s", "0.5") == 1


def test_no_worker_id_is_a_configuration_error(redis_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_WORKER_ID", raising=False)
    assert main(["--redis-url", redis_url]) == 2


def test_runs_as_a_module_from_the_environment(redis_url: str) -> None:
    """As the pod runs it: `python -m infra.probe`, settings from SLUICE_* variables."""
    beat(redis_url, "ready")
    env = {**os.environ, "SLUICE_REDIS_URL": redis_url, "SLUICE_WORKER_ID": WORKER}
    done = subprocess.run([sys.executable, "-m", "infra.probe"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    beat(redis_url, "draining")
    done = subprocess.run([sys.executable, "-m", "infra.probe"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1


@pytest.mark.parametrize("state", ["starting", "ready", "draining", "drained"])
def test_alive_passes_on_any_heartbeat(redis_url: str, state: str) -> None:
    beat(redis_url, state)
    assert probe(redis_url, "--alive") == 0


def test_alive_fails_without_a_heartbeat(redis_url: str) -> None:
    assert probe(redis_url, "--alive") == 1
    assert probe(redis_url, "--alive", "--redis-down-ok") == 1


def test_liveness_passes_when_redis_is_down() -> None:
    """A Redis outage silences every worker; restarting them all would not help."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    assert probe(url, "--alive", "--timeout-s", "0.5") == 1  # startup: not yet
    assert probe(url, "--alive", "--redis-down-ok", "--timeout-s", "0.5") == 0
