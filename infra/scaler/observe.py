"""Reads one model's queue and workers from Redis into an `Observation` for the policy.

Redis 6.2 (the bundled server) reports no consumer-group `lag`. Workers delete the entries they
acknowledge, so the stream holds exactly the unfinished jobs, and lag = length - pending. Redis 7
reports `lag` itself, which is used when present. The arrival rate counts entries newer than the
last generated id seen before; a job queued and finished between two reads is gone from the
stream, so that count is a lower bound, raised to one whenever the last generated id moved.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from infra.scaler.policy import Observation, WorkerView
from shared import names
from shared.fleet import live_workers


@dataclass(frozen=True)
class Snapshot:
    obs: Observation
    oldest_job_at: float | None  # epoch seconds the oldest unfinished job was queued at
    mean_kv_usage: float  # over ready workers, 0 when none


def _decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _id_ms(entry_id: Any) -> int:
    return int(str(_decode(entry_id)).split("-", 1)[0])


class Observer:
    def __init__(self, client: redis.Redis, model: str,
                 clock: Callable[[], float] = time.monotonic, rate_window_s: float = 10.0) -> None:
        self.client = client
        self.model = model
        self.stream = names.queue(model)
        self.clock = clock
        self.rate_window_s = rate_window_s
        self._last_id: str | None = None
        self._arrivals: deque[tuple[float, int]] = deque()

    def observe(self, replicas: int) -> Snapshot:
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.stream)
        pipe.xinfo_groups(self.stream)
        pipe.xpending(self.stream, names.WORKER_GROUP)
        pipe.xinfo_stream(self.stream)
        pipe.xrange(self.stream, count=1)
        pipe.hgetall(names.WORKERS)
        depth, groups, pending, info, oldest, beats = pipe.execute(raise_on_error=False)
        now, wall = self.clock(), time.time()
        depth = 0 if isinstance(depth, Exception) else int(depth)
        num_pending = 0 if isinstance(pending, Exception) else int(pending.get("pending", 0))
        lag = max(0, depth - num_pending)
        if not isinstance(groups, Exception):  # an error: no stream yet
            for g in groups:
                if _decode(g.get("name")) == names.WORKER_GROUP and g.get("lag") is not None:
                    lag = int(g["lag"])
        rate = self._arrival_rate(now, None if isinstance(info, Exception) else info)
        oldest_at = None
        if not isinstance(oldest, Exception) and oldest:
            oldest_at = _id_ms(oldest[0][0]) / 1000
        workers = tuple(
            WorkerView(worker_id=str(b.get("worker_id", "?")), state=str(b.get("state", "?")),
                       kv_usage=float(b.get("kv_usage", 0.0)), running=int(b.get("running", 0)),
                       waiting=int(b.get("waiting", 0)), active=int(b.get("active", 0)))
            for b in live_workers({} if isinstance(beats, Exception) else beats, wall)
            if b["model"] == self.model)
        ready = [w for w in workers if w.state == "ready"]
        obs = Observation(now=now, replicas=replicas, queue_depth=depth, lag=lag,
                          pending=num_pending, arrival_rate=rate, workers=workers)
        return Snapshot(obs, oldest_at,
                        sum(w.kv_usage for w in ready) / len(ready) if ready else 0.0)

    def _arrival_rate(self, now: float, info: dict[str, Any] | None) -> float:
        last_id = None if info is None else _decode(info.get("last-generated-id"))
        if last_id is not None and self._last_id is not None and last_id != self._last_id:
            newer: Any = self.client.xrange(self.stream, min=f"({self._last_id}", count=10_000)
            self._arrivals.append((now, max(1, len(newer or []))))
        if last_id is not None:
            self._last_id = last_id
        while self._arrivals and self._arrivals[0][0] <= now - self.rate_window_s:
            self._arrivals.popleft()
        return sum(n for _, n in self._arrivals) / self.rate_window_s
