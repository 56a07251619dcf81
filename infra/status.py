"""`sluice status`: the fleet (models, queue depths, workers, KV usage, desired count).

Read through a gateway (`GET /v1/fleet`, which needs an API key) or straight from Redis; both
give the same view, built by `shared.fleet.fleet_view`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import redis

from shared import names
from shared.fleet import fleet_view, live_workers, model_names, registry


class StatusError(RuntimeError):
    """The fleet could not be read; the message says from where and why."""


def from_redis(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        beats = client.hgetall(names.WORKERS)
        models = client.hgetall(names.MODELS)
        now = time.time()
        listed = model_names(live_workers(beats, now), registry(models, now))
        depths = {m: int(client.xlen(names.queue(m))) for m in listed}
    except redis.RedisError as e:
        raise StatusError(f"cannot read the fleet from Redis at {url}: {e}") from e
    finally:
        client.close()
    return fleet_view(beats, models, depths, now)


def from_gateway(url: str, api_key: str | None) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one request: no access log
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{base}/v1/fleet", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise StatusError(f"cannot reach the gateway at {base}: {e}") from e
    if resp.status_code == 401:
        raise StatusError(f"the gateway at {base} refused the API key (give --api-key or "
                          "SLUICE_API_KEY)")
    if resp.status_code != 200:
        raise StatusError(f"the gateway at {base} answered {resp.status_code}: {resp.text[:200]}")
    view: dict[str, Any] = resp.json()
    return view


def render(view: dict[str, Any]) -> str:
    """The view as two small tables, for people."""
    lines = [f"{'MODEL':<24} {'STATE':<8} {'QUEUED':>6} {'DESIRED':>7} {'WORKERS':>7} "
             f"{'READY':>5}"]
    for m in view["models"]:
        desired = "-" if m.get("desired") is None else str(m["desired"])
        lines.append(f"{m['id']:<24} {m['state']:<8} {m['queue_depth']:>6} {desired:>7} "
                     f"{m['workers']:>7} {m['ready']:>5}")
    if not view["models"]:
        lines.append("(no models: no worker is alive and no scaler manages one)")
    lines += ["", f"{'WORKER':<36} {'MODEL':<16} {'STATE':<9} {'KV USE':>6} {'RUNNING':>7} "
                  f"{'WAITING':>7}"]
    for w in view["workers"]:
        lines.append(f"{w['worker_id']:<36} {w['model']:<16} {w['state']:<9} "
                     f"{w['kv_usage']:>6.0%} {w['running']:>7} {w['waiting']:>7}")
    if not view["workers"]:
        lines.append("(no workers)")
    return "\n".join(lines)
