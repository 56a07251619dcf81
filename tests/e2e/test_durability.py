"""Jobs outlive the processes that handle them: dead letters, and a gateway restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from shared import names
from shared.messages import Job
from shared.redis_server import RedisServer, free_port
from worker import LLM, SamplingParams

API_KEY = "sk-durability"


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "infra.cli", *args], env=env,
                            start_new_session=True)


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _env(server: RedisServer, **extra: str) -> dict[str, str]:
    return {**os.environ, "SLUICE_REDIS_URL": server.url, "SLUICE_API_KEYS": API_KEY,
            "SLUICE_HEARTBEAT_S": "0.1", "SLUICE_HEARTBEAT_TTL_S": "1", **extra}


def _worker_args(model_dir: Path) -> list[str]:
    return ["worker", "--model", str(model_dir), "--served-model-name", "tiny", "--device", "cpu"]


def test_job_failing_every_delivery_goes_to_dead_letters(tmp_path: Path,
                                                         tiny_model_dir: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis", appendonly=False).start()
    r = redis.Redis.from_url(server.url)
    stream = names.queue("tiny")
    r.xgroup_create(stream, names.WORKER_GROUP, id="0", mkstream=True)
    job = Job(id="poison-1", model="tiny", kind="completion", prompt="x",
              sampling={"max_tokens": 4}, reply_channel="test:replies")
    r.xadd(stream, {names.JOB_FIELD: job.model_dump_json()})
    # Two workers took it and died without acknowledging: two deliveries already.
    entry_id = r.xreadgroup(names.WORKER_GROUP, "ghost-1", {stream: ">"}, count=1)[0][1][0][0]
    r.xclaim(stream, names.WORKER_GROUP, "ghost-2", 0, [entry_id])
    pubsub = r.pubsub()
    pubsub.subscribe("test:replies")
    worker = _start([*_worker_args(tiny_model_dir)],
                    _env(server, SLUICE_CLAIM_IDLE_MS="200", SLUICE_MAX_DELIVERIES="2"))
    try:
        _wait(lambda: r.xlen(names.dead_letters("tiny")) == 1, 120, "the dead letter")
        # The dead letter is written first, the failed record just after it.
        _wait(lambda: r.exists(names.request_record("tiny", "poison-1")), 10, "the record")
        record = json.loads(r.get(names.request_record("tiny", "poison-1")))
        assert record["status"] == "failed" and "set aside" in record["error"]
        assert r.xpending(stream, names.WORKER_GROUP)["pending"] == 0
        messages = []
        _wait(lambda: messages.append(pubsub.get_message(timeout=0.1)) or any(
            m and m["type"] == "message" for m in messages), 10, "the error event")
        event = json.loads(next(m for m in messages if m and m["type"] == "message")["data"])
        assert event["events"][0]["finish_reason"] == "error"
    finally:
        _stop(worker)
        server.stop()


def test_background_job_survives_a_gateway_restart(tmp_path: Path, tiny_model_dir: Path) -> None:
    expected = LLM(str(tiny_model_dir), device="cpu", kv_cache_memory_bytes=2**24).generate(
        "survive", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    server = RedisServer(data_dir=tmp_path / "redis", appendonly=False).start()
    env = _env(server)
    ports = [free_port(), free_port()]
    worker = _start(_worker_args(tiny_model_dir), env)
    gateway = _start(["gateway", "--port", str(ports[0])], env)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    second: subprocess.Popen[bytes] | None = None
    try:
        def up(port: int) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers,
                                 timeout=1).json()["data"] != []
            except (httpx.HTTPError, KeyError, ValueError):
                return False

        _wait(lambda: up(ports[0]), 120, "the first gateway")
        created = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/jobs", headers=headers, json={
            "endpoint": "/v1/completions",
            "body": {"model": "tiny", "prompt": "survive", "max_tokens": 200,
                     "temperature": 0.0, "ignore_eos": True}})
        assert created.status_code == 202
        job_id = created.json()["id"]
        os.killpg(gateway.pid, signal.SIGKILL)
        second = _start(["gateway", "--port", str(ports[1])], env)
        _wait(lambda: up(ports[1]), 60, "the second gateway")
        view: dict = {}

        def completed() -> bool:
            view.update(httpx.get(f"http://127.0.0.1:{ports[1]}/v1/jobs/{job_id}",
                                  headers=headers).json())
            return view.get("status") == "completed"

        _wait(completed, 60, "the job to complete")
        assert view["result"]["choices"][0]["text"] == expected
    finally:
        _stop(*(p for p in (worker, gateway, second) if p is not None))
        server.stop()


def test_jobs_and_streams_survive_redis_restarts(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A job queued before a hard Redis crash is served after it (AOF), and the gateway and
    worker that lived through two crashes still serve a stream."""
    expected = LLM(str(tiny_model_dir), device="cpu", kv_cache_memory_bytes=2**24).generate(
        "outlive redis", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    data_dir, port = tmp_path / "redis", free_port()
    servers = [RedisServer(port=port, data_dir=data_dir, appendonly=True).start()]
    env = _env(servers[0], SLUICE_MODELS="tiny")
    gw_port = free_port()
    gateway = _start(["gateway", "--port", str(gw_port)], env)
    worker: subprocess.Popen[bytes] | None = None
    base, headers = f"http://127.0.0.1:{gw_port}", {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "prompt": "outlive redis", "max_tokens": 24, "temperature": 0.0,
            "ignore_eos": True}

    def crash_and_restart() -> None:
        time.sleep(1.5)  # the AOF is fsynced once a second
        os.kill(servers[-1].pid or 0, signal.SIGKILL)
        servers[-1].stop()
        servers.append(RedisServer(port=port, data_dir=data_dir, appendonly=True).start())

    try:
        def gateway_up() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(gateway_up, 60, "the gateway")
        # No worker yet: the job waits in the stream, and in the AOF.
        created = httpx.post(f"{base}/v1/jobs", headers=headers,
                             json={"endpoint": "/v1/completions", "body": body})
        assert created.status_code == 202
        job_id = created.json()["id"]
        crash_and_restart()
        worker = _start(_worker_args(tiny_model_dir), env)
        view: dict = {}

        def completed() -> bool:
            try:
                view.update(httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers).json())
            except (httpx.HTTPError, ValueError):
                return False
            return view.get("status") == "completed"

        _wait(completed, 120, "the queued job to complete after the crash")
        assert view["result"]["choices"][0]["text"] == expected
        crash_and_restart()

        def streamed() -> str | None:
            text, give_up = "", time.monotonic() + 30  # keep-alives would outlast a timeout
            try:
                with httpx.stream("POST", f"{base}/v1/completions", headers=headers,
                                  json={**body, "stream": True}, timeout=30) as r:
                    if r.status_code != 200:
                        return None
                    for line in r.iter_lines():
                        if time.monotonic() > give_up:
                            return None  # a lost stream: counted as a failed try
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
            except httpx.HTTPError:
                return None
            return text

        # The gateway's reply channel and the worker's loops come back on their own.
        result: list[str | None] = []
        _wait(lambda: result.append(streamed()) or result[-1] == expected, 90,
              "a stream through the gateway and worker that outlived the crash")
    finally:
        _stop(*(p for p in (worker, gateway) if p is not None))
        for server in servers:
            server.stop()
