"""`sluice status` and the gateway's model states, over a fleet written into a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from gateway.app import create_app
from shared import names
from shared.redis_server import free_port
from shared.settings import GatewaySettings

API_KEY = "sk-status-test"


def _beat(worker_id: str, model: str, state: str, kv: float, running: int, ttl_s: float) -> str:
    now = time.time()
    return json.dumps({"worker_id": worker_id, "model": model, "state": state, "kv_usage": kv,
                       "running": running, "waiting": 1, "active": running + 1, "ts": now,
                       "expires": now + ttl_s})


@pytest.fixture
def fleet(redis_url: str) -> str:
    r = redis.Redis.from_url(redis_url)
    r.hset(names.WORKERS, mapping={
        "w-ready": _beat("w-ready", "tiny", "ready", 0.25, 3, 60),
        "w-draining": _beat("w-draining", "tiny", "draining", 0.5, 1, 60),
        "w-gone": _beat("w-gone", "tiny", "ready", 0.1, 0, -1),  # expired: a dead worker
    })
    r.hset(names.MODELS, mapping={
        "tiny": json.dumps({"state": "ready", "desired": 1}),
        "big": json.dumps({"state": "warming", "desired": 2}),
        "sleepy": json.dumps({"state": "cold", "desired": 0}),
        # Its scaler stopped a minute ago without clearing the entry: no worker is coming.
        "orphan": json.dumps({"state": "warming", "desired": 1, "updated": time.time() - 60}),
    })
    for i in range(3):
        r.xadd(names.queue("tiny"), {names.JOB_FIELD: json.dumps({"n": i})})
    r.xadd(names.queue("big"), {names.JOB_FIELD: "{}"})
    r.close()
    return redis_url


def _sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SLUICE_API_KEY": API_KEY})


def _check(view: dict) -> None:
    models = {m["id"]: m for m in view["models"]}
    assert set(models) == {"big", "orphan", "sleepy", "tiny"}
    assert (models["orphan"]["state"], models["orphan"]["desired"]) == ("cold", 0)
    assert models["tiny"] == {"id": "tiny", "state": "ready", "queue_depth": 3, "desired": 1,
                              "workers": 2, "ready": 1}
    assert (models["big"]["state"], models["big"]["queue_depth"]) == ("warming", 1)
    assert (models["sleepy"]["state"], models["sleepy"]["workers"]) == ("cold", 0)
    workers = {w["worker_id"]: w for w in view["workers"]}
    assert set(workers) == {"w-ready", "w-draining"}
    assert workers["w-draining"]["state"] == "draining"
    assert (workers["w-ready"]["kv_usage"], workers["w-ready"]["running"]) == (0.25, 3)


def test_status_json_from_redis(fleet: str) -> None:
    proc = _sluice("status", "--redis-url", fleet, "--json")
    assert proc.returncode == 0, proc.stderr
    _check(json.loads(proc.stdout))
    table = _sluice("status", "--redis-url", fleet)
    assert table.returncode == 0, table.stderr
    assert "w-draining" in table.stdout and "warming" in table.stdout
    assert "w-gone" not in table.stdout


def test_status_json_through_a_gateway(fleet: str, gateway_process: Callable[..., Any]) -> None:
    with gateway_process(fleet, API_KEY) as url:
        proc = _sluice("status", "--url", url, "--json")
        assert proc.returncode == 0, proc.stderr
        _check(json.loads(proc.stdout))
        refused = _sluice("status", "--url", url, "--api-key", "sk-wrong")
    assert refused.returncode == 1 and "refused the API key" in refused.stderr


def test_status_says_when_redis_is_unreachable() -> None:
    proc = _sluice("status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert proc.returncode == 1 and "cannot read the fleet from Redis" in proc.stderr


def test_models_list_each_state_even_at_zero_workers(fleet: str) -> None:
    settings = GatewaySettings(redis_url=fleet, api_keys=[API_KEY])
    with TestClient(create_app(settings)) as client:
        data = client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        states = {m["id"]: m["state"] for m in data["data"]}
        assert states == {"big": "warming", "orphan": "cold", "sleepy": "cold", "tiny": "ready"}
        # A model the scaler keeps at zero still accepts requests: they wait in its queue.
        r = client.post("/v1/jobs", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"endpoint": "/v1/completions",
                              "body": {"model": "sleepy", "prompt": "x", "max_tokens": 2}})
        assert r.status_code == 202
