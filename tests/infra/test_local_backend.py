"""The local backend's processes: a worker that cannot start is not restarted in a tight loop."""

from __future__ import annotations

import time

from infra.scaler.local import LocalBackend


def _wait_gone(backend: LocalBackend, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while backend.replicas() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.replicas() == 0


def test_failed_starts_back_off(redis_url: str) -> None:
    # An unknown flag: the worker command exits at once, as a worker that cannot start would.
    backend = LocalBackend(redis_url, "tiny", "tiny", worker_args=["--no-such-flag"])
    try:
        backend.scale_up(1)
        assert backend.replicas() == 1
        _wait_gone(backend)
        assert backend.num_failed == 1
        backend.scale_up(1)
        assert backend.replicas() == 0  # backing off 2 s after the first failed start
        time.sleep(2.1)
        backend.scale_up(1)
        assert backend.replicas() == 1
        _wait_gone(backend)
        assert backend.num_failed == 2
        time.sleep(2.1)
        backend.scale_up(1)
        assert backend.replicas() == 0  # 4 s after the second in a row
    finally:
        backend.close()
