"""A worker killed mid-request loses nothing: another worker claims the job and resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from shared import names
from shared.redis_server import RedisServer, free_port
from worker import LLM, SamplingParams

API_KEY = "sk-recovery-test"
PROMPT = "Recovery after a crash"
NUM_TOKENS = 300


def _start(cli: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session, so the kill below takes the worker's engine-core child with it, as a crashed
    # machine or pod would.
    return subprocess.Popen([sys.executable, "-m", "infra.cli", *cli], env=env,
                            start_new_session=True)


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_worker_request_resumes_on_another(tmp_path: Path, tiny_model_dir: Path) -> None:
    expected = LLM(str(tiny_model_dir), device="cpu", kv_cache_memory_bytes=2**24).generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    server = RedisServer(data_dir=tmp_path / "redis", appendonly=False).start()
    port = free_port()
    env = {**os.environ, "SLUICE_REDIS_URL": server.url, "SLUICE_API_KEYS": API_KEY,
           "SLUICE_HEARTBEAT_S": "0.2", "SLUICE_HEARTBEAT_TTL_S": "1",
           "SLUICE_CLAIM_IDLE_MS": "1500"}
    worker_cmd = ["worker", "--model", str(tiny_model_dir), "--served-model-name", "tiny",
                  "--device", "cpu"]
    procs = {"gateway": _start(["gateway", "--port", str(port)], env),
             "a": _start([*worker_cmd, "--worker-id", "worker-a"], env)}
    r = redis.Redis.from_url(server.url)
    try:
        _wait(lambda: r.exists(names.worker_heartbeat("worker-a")), 120, "worker a")
        chunks: list[str] = []
        done = threading.Event()
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                with httpx.stream(
                        "POST", f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": "tiny", "prompt": PROMPT, "max_tokens": NUM_TOKENS,
                              "temperature": 0.0, "ignore_eos": True, "stream": True}) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            body = json.loads(line[6:])
                            if "error" in body:
                                raise RuntimeError(body["error"])
                            chunks.extend(c["text"] for c in body["choices"])
            except BaseException as e:
                errors.append(e)
            finally:
                done.set()

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        _wait(lambda: len(chunks) >= 40, 60, "the first tokens")
        os.killpg(procs["a"].pid, signal.SIGKILL)
        procs["a"].wait()
        killed_at = len(chunks)
        procs["b"] = _start([*worker_cmd, "--worker-id", "worker-b"], env)
        assert done.wait(120), "the stream never finished after the worker died"
        assert not errors, errors
        assert killed_at < NUM_TOKENS, "the request finished before the kill; nothing tested"
        assert "".join(chunks) == expected  # nothing lost, nothing repeated, same tokens
        # The record is written just after the last event is published: wait for it.
        pattern = names.request_record("tiny", "*").replace("{", "\\{").replace("}", "\\}")
        _wait(lambda: r.keys(pattern), 10, "the request record")
        record = json.loads(r.get(r.keys(pattern)[0]))
        assert record["usage"]["completion_tokens"] == NUM_TOKENS
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        server.stop()
