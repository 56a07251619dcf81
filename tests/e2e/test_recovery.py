"""A worker killed mid-request loses nothing: another worker claims the job and resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class Crash:
    """A gateway and worker "a" on a Redis of their own; `kill_a_then_start_b` is the crash."""

    port: int
    redis: redis.Redis
    env: dict[str, str]
    worker_cmd: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def kill_a_then_start_b(self) -> None:
        os.killpg(self.procs["a"].pid, signal.SIGKILL)
        self.procs["a"].wait()
        self.procs["b"] = _start([*self.worker_cmd, "--worker-id", "worker-b"], self.env)

    def record(self, req_id: str) -> dict[str, Any]:
        # The record is written just after the last event is published: wait for it.
        key = names.request_record("tiny", req_id)
        _wait(lambda: self.redis.exists(key), 10, "the request record")
        return json.loads(self.redis.get(key))  # type: ignore[arg-type]


@contextmanager
def _crash_site(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Crash]:
    server = RedisServer(data_dir=tmp_path / "redis", appendonly=False).start()
    env = {**os.environ, "SLUICE_REDIS_URL": server.url, "SLUICE_API_KEYS": API_KEY,
           "SLUICE_HEARTBEAT_S": "0.2", "SLUICE_HEARTBEAT_TTL_S": "1",
           "SLUICE_CLAIM_IDLE_MS": "1500"}
    worker_cmd = ["worker", "--model", str(tiny_model_dir), "--served-model-name", "tiny",
                  "--device", "cpu"]
    crash = Crash(free_port(), redis.Redis.from_url(server.url), env, worker_cmd)
    crash.procs["gateway"] = _start(["gateway", "--port", str(crash.port)], env)
    crash.procs["a"] = _start([*worker_cmd, "--worker-id", "worker-a"], env)
    try:
        _wait(lambda: crash.redis.exists(names.worker_heartbeat("worker-a")), 120, "worker a")
        yield crash
    finally:
        for proc in crash.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in crash.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        server.stop()


class Stream:
    """A streaming completion read on a thread: the text of each choice, as the client got it."""

    def __init__(self, port: int, body: dict[str, Any]) -> None:
        self.chunks: dict[int, list[str]] = {}
        self.errors: list[BaseException] = []
        self.request_id = ""
        self.usage: dict[str, int] | None = None  # with stream_options.include_usage
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(port, body), daemon=True)
        self._thread.start()

    def num_chunks(self) -> int:
        return sum(len(c) for c in self.chunks.values())

    def text(self, index: int) -> str:
        return "".join(self.chunks.get(index, []))

    def _read(self, port: int, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                              headers={"Authorization": f"Bearer {API_KEY}"},
                              json={**body, "stream": True}) as resp:
                self.request_id = resp.headers["x-request-id"]
                for line in resp.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(event["error"])
                        self.usage = event.get("usage") or self.usage
                        for c in event["choices"]:
                            self.chunks.setdefault(c["index"], []).append(c["text"])
        except BaseException as e:
            self.errors.append(e)
        finally:
            self.done.set()


def _greedy_text(tiny_model_dir: Path) -> str:
    """What the offline engine generates for PROMPT, greedily: a resumed stream must match it."""
    return LLM(str(tiny_model_dir), device="cpu", kv_cache_memory_bytes=2**24).generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text


def _greedy_stream_under_way(crash: Crash) -> Stream:
    """A greedy NUM_TOKENS stream of PROMPT on worker "a", once its first tokens are in."""
    stream = Stream(crash.port, {"model": "tiny", "prompt": PROMPT, "max_tokens": NUM_TOKENS,
                                 "temperature": 0.0, "ignore_eos": True})
    _wait(lambda: stream.num_chunks() >= 40, 60, "the first tokens")
    return stream


@pytest.mark.slow
def test_killed_worker_request_resumes_on_another(tmp_path: Path, tiny_model_dir: Path) -> None:
    expected = _greedy_text(tiny_model_dir)
    with _crash_site(tmp_path, tiny_model_dir) as crash:
        stream = _greedy_stream_under_way(crash)
        crash.kill_a_then_start_b()
        killed_at = stream.num_chunks()
        assert stream.done.wait(120), "the stream never finished after the worker died"
        assert not stream.errors, stream.errors
        assert killed_at < NUM_TOKENS, "the request finished before the kill; nothing tested"
        assert stream.text(0) == expected  # nothing lost, nothing repeated, same tokens
        assert crash.record(stream.request_id)["usage"]["completion_tokens"] == NUM_TOKENS


@pytest.mark.slow
def test_killed_worker_sampled_n2_resumes_each_completion(tmp_path: Path,
                                                          tiny_model_dir: Path) -> None:
    """Random sampling, no seed: a rerun would differ, so only a resume from each completion's
    own tokens gives the client one generation per choice rather than two spliced together."""
    with _crash_site(tmp_path, tiny_model_dir) as crash:
        # Every engine seeds its random stream alike at start: a request sampled on worker "a"
        # first moves its stream away from the one "b" starts with, as real traffic would.
        warm_up = httpx.post(f"http://127.0.0.1:{crash.port}/v1/completions", timeout=60,
                             headers={"Authorization": f"Bearer {API_KEY}"},
                             json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8})
        assert warm_up.status_code == 200, warm_up.text
        stream = Stream(crash.port, {"model": "tiny", "prompt": PROMPT, "n": 2,
                                     "max_tokens": NUM_TOKENS, "temperature": 1.0,
                                     "ignore_eos": True,
                                     "stream_options": {"include_usage": True}})
        _wait(lambda: min(len(stream.chunks.get(i, [])) for i in (0, 1)) >= 40, 60,
              "the first tokens of both completions")
        crash.kill_a_then_start_b()
        killed_at = stream.num_chunks()
        assert stream.done.wait(120), "the stream never finished after the worker died"
        assert not stream.errors, stream.errors
        assert killed_at < 2 * NUM_TOKENS, "the request finished before the kill; nothing tested"
        record = crash.record(stream.request_id)
        assert record["status"] == "completed"
        for c in record["completions"]:
            assert len(c["token_ids"]) == NUM_TOKENS
            assert stream.text(c["index"]) == c["text"]  # the client's text is one generation
        assert sorted(c["index"] for c in record["completions"]) == [0, 1]
        assert record["usage"]["completion_tokens"] == 2 * NUM_TOKENS
        assert stream.usage is not None and stream.usage["completion_tokens"] == 2 * NUM_TOKENS


def _engine_core(front_pid: int) -> int:
    """The engine core process: the one child the worker front spawned."""
    children = Path(f"/proc/{front_pid}/task/{front_pid}/children").read_text().split()
    (core,) = [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    return core


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the core through /proc")
def test_killed_engine_core_takes_its_front_down_and_the_request_resumes(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """A front whose engine core died must not stay up: its heartbeat would keep its jobs
    from being claimed, and they would never finish."""
    expected = _greedy_text(tiny_model_dir)
    with _crash_site(tmp_path, tiny_model_dir) as crash:
        front = crash.procs["a"]
        stream = _greedy_stream_under_way(crash)
        core = _engine_core(front.pid)
        os.kill(core, signal.SIGKILL)
        killed_at = stream.num_chunks()
        assert front.wait(timeout=15) != 0, "the front outlived its engine core"
        crash.procs["b"] = _start([*crash.worker_cmd, "--worker-id", "worker-b"], crash.env)
        assert stream.done.wait(120), "the stream never finished after the core died"
        assert not stream.errors, stream.errors
        assert killed_at < NUM_TOKENS, "the request finished before the kill; nothing tested"
        assert stream.text(0) == expected


@pytest.mark.slow
def test_sigterm_to_the_worker_group_drains_the_stream_then_exits_cleanly(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """SIGTERM to the worker's whole process group (as a service manager may send it) reaches
    the engine core too: the core must keep stepping until the front, draining, has finished
    the request and tells it to stop."""
    expected = _greedy_text(tiny_model_dir)
    with _crash_site(tmp_path, tiny_model_dir) as crash:
        front = crash.procs["a"]
        stream = _greedy_stream_under_way(crash)
        core = _engine_core(front.pid)
        os.killpg(front.pid, signal.SIGTERM)
        drained_from = stream.num_chunks()
        assert stream.done.wait(60), "the stream never finished"
        assert not stream.errors, stream.errors
        assert drained_from < NUM_TOKENS, "the request finished before the SIGTERM"
        assert stream.text(0) == expected
        assert front.wait(timeout=30) == 0
        assert not Path(f"/proc/{core}").exists() or \
            Path(f"/proc/{core}/stat").read_text().split(")")[1].split()[0] == "Z"
