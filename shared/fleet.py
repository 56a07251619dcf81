"""The fleet as the gateway and `sluice status` show it, from raw Redis reads.

Pure functions over what HGETALL of `names.WORKERS` and `names.MODELS` return, so the async
gateway and the synchronous command line read the same things the same way.

A model's state: "ready" when a live worker of it is ready, "warming" when workers are starting
or the scaler wants some (`desired` > 0), "cold" when it has none and none is coming. The scaler
rewrites its entry every interval; an entry older than REGISTRY_STALE_S (the scaler stopped
without clearing it) still lists the model but wants no worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

ModelState = Literal["cold", "warming", "ready"]
REGISTRY_STALE_S = 30.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def live_workers(beats: Mapping[Any, Any], now: float) -> list[dict[str, Any]]:
    """Heartbeats that have not expired, sorted by model and worker id."""
    out = []
    for raw in beats.values():
        try:
            beat = json.loads(raw)
        except ValueError:
            continue
        if isinstance(beat, dict) and beat.get("expires", 0) > now and "model" in beat:
            out.append(beat)
    return sorted(out, key=lambda b: (b["model"], b.get("worker_id", "")))


def registry(models: Mapping[Any, Any], now: float) -> dict[str, dict[str, Any]]:
    """The scaler's model registry: model -> {state, desired, updated, ...}."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in models.items():
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = {}
        entry = entry if isinstance(entry, dict) else {}
        if now - float(entry.get("updated", now)) > REGISTRY_STALE_S:
            entry = {**entry, "state": "cold", "desired": 0, "stale": True}
        out[_text(name)] = entry
    return out


def model_names(workers: list[dict[str, Any]], known: Mapping[str, Any]) -> list[str]:
    return sorted({w["model"] for w in workers} | set(known))


def model_state(model: str, workers: list[dict[str, Any]],
                entry: Mapping[str, Any] | None) -> ModelState:
    mine = [w for w in workers if w["model"] == model]
    if any(w.get("state") == "ready" for w in mine):
        return "ready"
    if any(w.get("state") == "starting" for w in mine) or (entry or {}).get("desired", 0) > 0:
        return "warming"
    return "cold"


def fleet_view(beats: Mapping[Any, Any], models: Mapping[Any, Any], depths: Mapping[str, int],
               now: float) -> dict[str, Any]:
    """{"models": [...], "workers": [...]}: what `sluice status --json` prints."""
    workers = live_workers(beats, now)
    known = registry(models, now)
    view_models = []
    for name in model_names(workers, known):
        entry = known.get(name, {})
        mine = [w for w in workers if w["model"] == name]
        view_models.append({
            "id": name, "state": model_state(name, workers, entry),
            "queue_depth": depths.get(name, 0), "desired": entry.get("desired"),
            "workers": len(mine), "ready": sum(w.get("state") == "ready" for w in mine)})
    view_workers = [{
        "worker_id": w.get("worker_id", "?"), "model": w["model"], "state": w.get("state", "?"),
        "kv_usage": float(w.get("kv_usage", 0.0)), "running": int(w.get("running", 0)),
        "waiting": int(w.get("waiting", 0)), "age_s": round(now - float(w.get("ts", now)), 1)}
        for w in workers]
    return {"models": view_models, "workers": view_workers}
