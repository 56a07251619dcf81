"""The scaler end to end: a real Redis, a real gateway, real worker processes started and drained
by the local backend, and the `openai` client. Windows and timeouts are a few seconds long."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from infra.scaler.local import LocalBackend
from infra.scaler.loop import ScalerLoop
from infra.scaler.observe import Snapshot
from infra.scaler.policy import Decision, PolicyConfig, Reason
from shared.redis_server import RedisServer

API_KEY = "sk-scaler-test"
FAST_HEARTBEATS = {"SLUICE_HEARTBEAT_S": "0.2", "SLUICE_HEARTBEAT_TTL_S": "2"}


@dataclass
class Env:
    base_url: str
    redis_url: str
    model_dir: Path
    log_dir: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0)

    def model_state(self) -> str | None:
        resp = httpx.get(f"{self.base_url}/v1/models",
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
        return next((m["state"] for m in resp.json()["data"] if m["id"] == "tiny"), None)

    def worker_logs(self) -> str:
        return "".join(p.read_text(errors="replace")[-3000:]
                       for p in sorted(self.log_dir.glob("worker-*.log")))


@dataclass
class Scaler:
    loop: ScalerLoop
    backend: LocalBackend
    steps: list[tuple[Snapshot, Decision]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def desired(self) -> list[int]:
        return [d.desired for _, d in self.steps]

    def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; decisions: "
                    f"{[(d.desired, d.reason.value) for _, d in self.steps[-20:]]}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
        gateway_process: Callable[..., Any]) -> Iterator[Env]:
    data = tmp_path_factory.mktemp("scaler")
    server = RedisServer(data_dir=data / "redis", appendonly=False).start()
    try:
        with gateway_process(server.url, API_KEY, data / "gateway.log") as url:
            yield Env(url, server.url, tiny_model_dir, data / "workers")
    finally:
        server.stop()


@contextlib.contextmanager
def scaler(env: Env, config: PolicyConfig, extra_env: dict[str, str] | None = None,
           worker_args: tuple[str, ...] = ()) -> Iterator[Scaler]:
    client = redis.Redis.from_url(env.redis_url)
    client.flushall()
    backend = LocalBackend(env.redis_url, str(env.model_dir), "tiny", device="cpu",
                           worker_args=worker_args, log_dir=env.log_dir,
                           env={**os.environ, **FAST_HEARTBEATS, **(extra_env or {})})
    s = Scaler(ScalerLoop(client, "tiny", backend, config, interval_s=0.25), backend)
    s.loop.on_step = lambda snap, d: s.steps.append((snap, d))
    thread = threading.Thread(target=s.loop.run, args=(s.stop,), daemon=True)
    thread.start()
    try:
        yield s
    except BaseException:
        print(env.worker_logs())
        raise
    finally:
        s.stop.set()
        thread.join(timeout=10)
        s.loop.close()
        backend.close()
        client.close()


async def _burst(env: Env, count: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{env.base_url}/v1", api_key=API_KEY, max_retries=0,
                                timeout=120)
    async with client:
        replies = await asyncio.gather(*(
            client.completions.create(model="tiny", prompt=f"Request {i}", max_tokens=16,
                                      temperature=0, extra_body={"ignore_eos": True})
            for i in range(count)))
    return [r.choices[0].finish_reason for r in replies]


@pytest.mark.slow
def test_burst_on_an_idle_fleet_scales_from_zero_and_back(env: Env) -> None:
    config = PolicyConfig(min_workers=0, max_workers=3, max_surge=1, target_per_worker=8,
                          stabilization_s=2.0, idle_timeout_s=3.0)
    with scaler(env, config) as s:
        s.wait(lambda: len(s.steps) >= 4, 10, "the first decisions")
        assert s.backend.replicas() == 0
        assert env.model_state() == "cold"  # listed at zero workers, from the registry
        burst = threading.Thread(target=lambda: results.extend(asyncio.run(_burst(env, 40))))
        results: list[str | None] = []
        t0 = time.monotonic()
        burst.start()
        s.wait(lambda: env.model_state() == "warming", 10, "the model to warm up")
        burst.join(timeout=120)
        burst_s = time.monotonic() - t0
        assert results == ["length"] * 40, env.worker_logs()
        desired = s.desired()
        assert [d for d in desired if d][:1] == [1]  # 0 -> 1 first ...
        assert 2 <= max(desired) <= 3  # ... then more, within the bounds
        assert all(0 <= d <= 3 for d in desired)
        cold = s.loop.cold_starts[0]
        assert cold.ready_at is not None and cold.first_token_at is not None
        assert 0 < cold.ready_at - cold.queued_at <= cold.first_token_at - cold.queued_at
        print(f"burst of 40 from zero: {burst_s:.1f} s; cold start: ready after "
              f"{cold.ready_at - cold.queued_at:.1f} s, first token after "
              f"{cold.first_token_at - cold.queued_at:.1f} s")

        s.wait(lambda: s.backend.replicas() == 0 and not s.backend.stopping, 40,
               "the fleet to return to zero")
        reasons = [d.reason for _, d in s.steps if d.delta < 0]
        assert reasons[-1] is Reason.IDLE_TIMEOUT
        assert env.model_state() == "cold"
        assert s.backend.num_failed == 0


@pytest.mark.slow
def test_a_worker_drained_with_requests_in_flight_finishes_them(env: Env) -> None:
    # At most 1 running and 1 waiting per worker, so 4 requests go 2 and 2 and keep both busy
    # long enough (2 x 250 tokens each) for the drain to find them at work.
    config = PolicyConfig(min_workers=2, max_workers=2, target_per_worker=4,
                          stabilization_s=1.0, idle_timeout_s=60.0)
    with scaler(env, config, extra_env={"SLUICE_MAX_WAITING": "1"},
                worker_args=("--max-num-seqs", "1")) as s:
        s.wait(lambda: bool(s.steps) and s.steps[-1][0].obs.num_ready == 2, 60,
               "two ready workers")
        results: list[tuple[str | None, int]] = []

        def stream(i: int) -> None:
            chunks = env.client().completions.create(
                model="tiny", prompt=f"Long request {i}", max_tokens=250, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            texts, reason = 0, None
            for chunk in chunks:
                texts += 1
                reason = chunk.choices[0].finish_reason or reason
            results.append((reason, texts))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)

        def both_busy() -> bool:
            workers = s.steps[-1][0].obs.workers
            return len(workers) == 2 and all(w.active for w in workers)

        s.wait(both_busy, 30, "both workers to run requests")
        # The load now asks for one worker: after the 1 s window the policy drains one.
        s.loop.config = replace(config, min_workers=1, target_per_worker=100)
        s.wait(lambda: bool(s.loop.draining), 10, "a drain")
        drained = next(iter(s.loop.draining))
        at_drain = next(w for snap, d in s.steps if d.reason is Reason.SCALE_DOWN
                        for w in snap.obs.workers if w.worker_id == drained)
        assert at_drain.load > 0  # it held requests when asked to drain
        for t in threads:
            t.join(timeout=120)
        assert [r for r, _ in results] == ["length"] * 4, env.worker_logs()
        s.wait(lambda: s.backend.replicas() == 1 and not s.loop.draining, 20,
               "the drained worker to be removed")
        assert drained not in s.backend.procs
        assert s.backend.num_failed == 0
