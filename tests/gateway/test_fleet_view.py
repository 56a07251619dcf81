"""The gateway's view of which models are served: kept fresh in the background, read again
for a model it does not know, and a model whose workers went away leaves it. Real Redis."""

from __future__ import annotations

import json
import time
import uuid

import redis
from fastapi.testclient import TestClient

from gateway.app import create_app
from shared import names
from shared.settings import GatewaySettings

KEY = "sk-fleet"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _beat(r: redis.Redis, worker: str, model: str, ttl_s: float) -> None:
    now = time.time()
    r.hset(names.WORKERS, worker, json.dumps({"worker_id": worker, "model": model,
                                              "state": "ready", "ts": now,
                                              "expires": now + ttl_s}))


def _listed(client: TestClient) -> list[str]:
    return [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]


def test_a_model_that_just_came_up_is_served_at_once_and_leaves_with_its_worker(
        redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    model, worker = f"m-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    settings = GatewaySettings(redis_url=redis_url, api_keys=[KEY], request_timeout_s=0.3,
                               keepalive_s=0.1)
    body = {"model": model, "prompt": "x", "max_tokens": 2}
    try:
        with TestClient(create_app(settings)) as client:
            assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 404
            _beat(r, worker, model, ttl_s=60)
            # At once, before the background view has it: read again for it, queued, then
            # timed out (no worker runs it).
            assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 408
            assert model in _listed(client)
            r.hdel(names.WORKERS, worker)
            deadline = time.monotonic() + 2.0
            while model in _listed(client) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert model not in _listed(client)
            assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 404
    finally:
        r.hdel(names.WORKERS, worker)
        r.close()
