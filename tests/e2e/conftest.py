"""The service under test, for every end-to-end module: real Redis, a real worker process and a
real gateway process, the worker running the tiny model on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from shared import names
from shared.redis_server import RedisServer, free_port

API_KEY = "sk-e2e-test"


@dataclass
class Service:
    base_url: str
    redis_url: str
    worker: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    log_dir: Path
    api_key: str = API_KEY

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0,
                             **kw)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key,
                                  max_retries=0)

    def auth(self) -> dict[str, str]:
        """The Authorization header of a valid key."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, name: str, chars: int = 6000) -> str:
        """The end of a process's output ("gateway" or "worker"), tracebacks included."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def heartbeat(self) -> dict:
        r = redis.Redis.from_url(self.redis_url)
        try:
            beats = [json.loads(r.get(k))
                     for k in r.scan_iter(match=names.WORKER_HEARTBEAT_PATTERN)]
        finally:
            r.close()
        return beats[0] if beats else {}


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then SIGKILL after 30 s; then whatever is left of each process's group (a
    worker's engine core process outlives a worker that was killed)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own group: see spawn()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    """One service per test module, stopped (every process of it) when the module is done."""
    data = tmp_path_factory.mktemp("service")
    server = RedisServer(data_dir=data / "redis", appendonly=False).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        env = {**os.environ, "SLUICE_REDIS_URL": server.url, "SLUICE_API_KEYS": API_KEY,
               "SLUICE_HEARTBEAT_S": "0.2", "SLUICE_HEARTBEAT_TTL_S": "2"}
        cli = [sys.executable, "-m", "infra.cli"]

        def spawn(name: str, *args: str) -> subprocess.Popen[bytes]:
            # Each process logs to a file of its own, which Service.log_tail reads back.
            # A session (process group) of its own, so that teardown can end its children too.
            with (data / f"{name}.log").open("wb") as log:
                proc = subprocess.Popen([*cli, name, *args], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            return proc

        worker = spawn("worker", "--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--device", "cpu")
        gateway = spawn("gateway", "--port", str(port))
        svc = Service(f"http://127.0.0.1:{port}", server.url, worker, gateway, data)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if worker.poll() is not None or gateway.poll() is not None:
                pytest.fail("a service process exited during start-up:\n"
                            + svc.log_tail("worker") + svc.log_tail("gateway"))
            if svc.heartbeat().get("state") == "ready":
                try:
                    if httpx.get(f"{svc.base_url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        else:
            pytest.fail("service did not become ready:\n"
                        + svc.log_tail("worker") + svc.log_tail("gateway"))
        yield svc
    finally:
        _stop(procs[::-1])  # the gateway first, then the worker
        server.stop()
