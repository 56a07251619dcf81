"""The scaler's observer against a real Redis: lag and pending without Redis 7's `lag` field,
arrivals from stream ids, and only this model's live heartbeats."""

from __future__ import annotations

import json
import time

import redis

from infra.scaler.observe import Observer
from shared import names


def _beat(model: str, state: str, expires_in_s: float) -> str:
    return json.dumps({"worker_id": f"{model}-{state}", "model": model, "state": state,
                       "kv_usage": 0.5, "running": 2, "waiting": 1, "active": 3,
                       "expires": time.time() + expires_in_s})


def test_observer_reads_backlog_arrivals_and_heartbeats(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    stream = names.queue("tiny")
    clock = [100.0]
    observer = Observer(r, "tiny", clock=lambda: clock[0], rate_window_s=10)
    empty = observer.observe(replicas=0)  # no stream, no group yet: nothing, no error
    assert (empty.obs.backlog, empty.obs.lag, empty.obs.workers) == (0, 0, ())

    r.xgroup_create(stream, names.WORKER_GROUP, id="0", mkstream=True)
    for i in range(5):
        r.xadd(stream, {names.JOB_FIELD: str(i)})
    r.xreadgroup(names.WORKER_GROUP, "w1", {stream: ">"}, count=2)
    r.hset(names.WORKERS, mapping={"a": _beat("tiny", "ready", 5),
                                   "b": _beat("tiny", "draining", 5),
                                   "c": _beat("tiny", "ready", -1),  # expired
                                   "d": _beat("other", "ready", 5)})
    clock[0] += 1
    snap = observer.observe(replicas=3)
    obs = snap.obs
    assert (obs.queue_depth, obs.pending, obs.lag, obs.backlog) == (5, 2, 3, 5)
    assert sorted(w.state for w in obs.workers) == ["draining", "ready"]
    assert (obs.num_active, obs.num_ready) == (2, 1)
    assert obs.workers[0].load == 3
    assert snap.mean_kv_usage == 0.5
    assert snap.oldest_job_at is not None and abs(snap.oldest_job_at - time.time()) < 60

    for i in range(4):  # 4 new jobs, one of them finished (deleted) before the next look
        last = r.xadd(stream, {names.JOB_FIELD: f"new{i}"})
    r.xdel(stream, last)
    clock[0] += 1
    assert observer.observe(replicas=3).obs.arrival_rate == 3 / 10
    clock[0] += 11  # the window has passed
    assert observer.observe(replicas=3).obs.arrival_rate == 0
    r.close()
