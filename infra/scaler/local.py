"""Workers as local processes: `sluice worker` children, each in a session of its own.

A session of its own keeps a terminal's Ctrl-C away from the workers, so the launcher decides the
order things stop in, and lets `close` end a worker's whole process group (its engine core too).
Removing a worker is SIGTERM, which drains it (no new jobs, finish the running ones, exit); the
scaler removes only workers that already drained, so they exit at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("sluice.scaler.local")

# A worker told to stop that is still alive after this long is killed with its process group.
STOP_GRACE_S = 30.0
# A worker that dies within this long of its start counts as a failed start; each one in a row
# doubles the pause before the next start (up to MAX_BACKOFF_S), so a worker that cannot start
# (a bad model path, no memory) is not restarted in a tight loop.
FAILED_START_S = 60.0
MAX_BACKOFF_S = 60.0


class LocalBackend:
    name = "local"

    def __init__(self, redis_url: str, model: str, served_model_name: str, *,
                 device: str = "auto", worker_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, log_dir: Path | None = None) -> None:
        self.redis_url = redis_url
        self.model = model
        self.served_model_name = served_model_name
        self.device = device
        self.worker_args = list(worker_args)
        self.env = dict(env if env is not None else os.environ)
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # counted workers
        self.stopping: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
        self._prefix = re.sub(r"[^A-Za-z0-9_.-]", "-", served_model_name)[:48]
        self._started = 0
        self.num_failed = 0  # workers that exited without being asked to
        self._started_at: dict[str, float] = {}
        self._failed_starts = 0  # in a row
        self._not_before = 0.0  # monotonic time before which no worker starts

    def replicas(self) -> int:
        self._reap()
        return len(self.procs)

    def scale_up(self, count: int) -> None:
        if time.monotonic() < self._not_before:
            return  # backing off after failed starts; the scaler asks again next step
        for _ in range(count):
            self._started += 1
            worker_id = f"{self._prefix}-{self._started}-{secrets.token_hex(3)}"
            cmd = [sys.executable, "-m", "infra.cli", "worker", "--model", self.model,
                   "--served-model-name", self.served_model_name, "--device", self.device,
                   "--worker-id", worker_id, *self.worker_args]
            env = {**self.env, "SLUICE_REDIS_URL": self.redis_url}
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                with (self.log_dir / f"worker-{worker_id}.log").open("wb") as out:
                    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            else:
                proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            self.procs[worker_id] = proc
            self._started_at[worker_id] = time.monotonic()
            log.info("started worker %s (pid %d)", worker_id, proc.pid)

    def remove(self, worker_ids: list[str]) -> None:
        for worker_id in worker_ids:
            proc = self.procs.pop(worker_id, None)
            self._started_at.pop(worker_id, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                self.stopping[worker_id] = (proc, time.monotonic())
        self._reap()

    def close(self) -> None:
        """Drains every worker (SIGTERM) and waits for them, killing stragglers after a grace."""
        for worker_id in list(self.procs):
            self.remove([worker_id])
        deadline = time.monotonic() + STOP_GRACE_S
        for worker_id, (proc, _) in list(self.stopping.items()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in %.0f s; killing it", worker_id,
                            STOP_GRACE_S)
            _kill_group(proc)
        self.stopping.clear()

    def _reap(self) -> None:
        for worker_id, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.num_failed += 1
                del self.procs[worker_id]
                lived_s = time.monotonic() - self._started_at.pop(worker_id, 0.0)
                self._failed_starts = self._failed_starts + 1 if lived_s < FAILED_START_S else 0
                backoff_s = (min(MAX_BACKOFF_S, 2.0 ** self._failed_starts)
                             if self._failed_starts else 0.0)
                self._not_before = time.monotonic() + backoff_s
                log.warning("worker %s exited with code %s after %.0f s%s", worker_id,
                            proc.returncode, lived_s,
                            f"; next start in {backoff_s:.0f} s" if backoff_s else "")
                _kill_group(proc)
        now = time.monotonic()
        for worker_id, (proc, since) in list(self.stopping.items()):
            if proc.poll() is not None or now - since > STOP_GRACE_S:
                _kill_group(proc)
                del self.stopping[worker_id]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Ends what is left of a worker's session: an engine core outlives a worker killed hard."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
