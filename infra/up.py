"""`sluice up`: the whole service on one machine, on embedded defaults.

Starts a private Redis (AOF on, in the data directory) unless a Redis URL is given, the scaler
with the local-process backend (in a thread here), which keeps between --min-workers and
--max-workers workers of the chosen model, and the gateway; waits until the gateway and, when
min_workers > 0, a worker are ready; prints how to reach them; stops everything on Ctrl-C, the
workers by draining.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import redis

from infra.scaler.backend import Backend
from infra.scaler.loop import ScalerLoop
from infra.scaler.service import build_loop, make_backend
from shared import names
from shared.fleet import live_workers
from shared.redis_server import RedisServer
from shared.settings import ScalerSettings, UpSettings, load_settings, new_api_key

log = logging.getLogger("sluice.up")


class Launcher:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.api_key = settings.api_key or new_api_key()
        self.redis_server: RedisServer | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.backend: Backend | None = None
        self.scaler: ScalerLoop | None = None
        self._scaler_thread: threading.Thread | None = None
        self._stop_scaler = threading.Event()
        self._client: redis.Redis | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
        return f"http://{host}:{self.settings.port}"

    def start(self) -> None:
        s = self.settings
        data_dir = Path(s.data_dir).expanduser()
        data_dir.mkdir(parents=True, exist_ok=True)
        redis_url = s.redis_url
        if redis_url is None:
            self.redis_server = RedisServer(data_dir=data_dir / "redis", appendonly=True)
            self.redis_server.start()
            # This host's processes use the Unix socket; other hosts' workers would use `url`.
            redis_url = self.redis_server.local_url
            log.info("started Redis at %s and %s (data in %s)", self.redis_server.url, redis_url,
                     data_dir / "redis")
        env = {**os.environ, "SLUICE_REDIS_URL": redis_url}
        cli = [sys.executable, "-m", "infra.cli"]
        # Other scaler settings (SLUICE_STABILIZATION_S, ...) come from the environment.
        scaler_settings = load_settings(
            ScalerSettings, redis_url=redis_url, model=s.model, device=s.device, backend="local",
            min_workers=s.min_workers, max_workers=s.max_workers, idle_timeout_s=s.idle_timeout_s)
        self.model_name = scaler_settings.served_model_name or s.model
        self.backend = make_backend(scaler_settings)
        self._client = redis.Redis.from_url(redis_url)
        self.scaler = build_loop(scaler_settings, self.backend, self._client)
        self._scaler_thread = threading.Thread(target=self.scaler.run, args=(self._stop_scaler,),
                                               name="sluice-scaler", daemon=True)
        self._scaler_thread.start()
        self.procs["gateway"] = subprocess.Popen(
            [*cli, "gateway", "--host", s.host, "--port", str(s.port)],
            env={**env, "SLUICE_API_KEYS": self.api_key}, start_new_session=True)
        self._wait_ready(redis_url)

    def _wait_ready(self, redis_url: str, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(redis_url)
        gateway_up = False
        # With min_workers 0 the fleet starts empty: the first request wakes a worker.
        worker_up = self.settings.min_workers == 0
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited with code {proc.returncode} during start")
            if getattr(self.backend, "num_failed", 0):
                raise RuntimeError("a worker exited during start; its log is above")
            if not gateway_up:
                with contextlib.suppress(httpx.HTTPError):
                    gateway_up = httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200
            if not worker_up:
                worker_up = any(b["model"] == self.model_name and b.get("state") == "ready"
                                for b in live_workers(client.hgetall(names.WORKERS), time.time()))
            if gateway_up and worker_up:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the service was not ready after {timeout_s:.0f} s")

    def banner(self) -> str:
        model = Path(self.settings.model).name  # the worker's default served name
        s = self.settings
        fleet = (f"{s.min_workers} worker" + ("s" if s.min_workers != 1 else "")
                 if s.min_workers == s.max_workers else
                 f"{s.min_workers} to {s.max_workers} workers, sized by the scaler")
        if s.min_workers == 0:
            fleet += f"; none after {s.idle_timeout_s:g} s idle, the next request wakes one"
        return (
            f"\nSluice is up at {self.base_url}/v1  (model: {model}; {fleet})\n"
            f"API key: {self.api_key}\n\n"
            f"  curl {self.base_url}/v1/chat/completions \\\n"
            f"    -H 'Authorization: Bearer {self.api_key}' -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
            f"\"content\": \"Hello\"}}], \"max_tokens\": 16}}'\n\n"
            f"Press Ctrl-C to stop.\n")

    def wait(self) -> int:
        """Blocks until Ctrl-C or until a part dies; returns the exit code."""
        try:
            while True:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        log.error("the %s exited with code %s; stopping", name, proc.returncode)
                        return 1
                if self._scaler_thread is not None and not self._scaler_thread.is_alive():
                    log.error("the scaler stopped; stopping")
                    return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0

    def stop(self) -> None:
        gateway = self.procs.get("gateway")
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
        self._stop_scaler.set()
        if self._scaler_thread is not None:
            self._scaler_thread.join(timeout=30)
        if self.scaler is not None:
            self.scaler.close()
        if self.backend is not None:
            self.backend.close()  # drains: each worker finishes what it runs, then exits
        if self._client is not None:
            self._client.close()
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("the %s did not stop in 30 s; killing it", name)
                proc.kill()
        if self.redis_server is not None:
            self.redis_server.stop()
        log.info("stopped")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_up(settings: UpSettings) -> int:
    # SIGTERM (a service manager, `kill`) stops the same orderly way as Ctrl-C; the children run
    # in sessions of their own and would otherwise outlive the launcher.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    launcher = Launcher(settings)
    # Children run in their own sessions, so Ctrl-C reaches only this process, which stops
    # them in order: gateway first, then the scaler and the workers by draining, then Redis.
    try:
        launcher.start()
        print(launcher.banner(), flush=True)
        return launcher.wait()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launcher.stop()
