"""Fixtures of the infra tests: a real gateway process over a given Redis."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest


@contextlib.contextmanager
def _gateway(redis_url: str, api_key: str, log_path: Path | None = None) -> Iterator[str]:
    """A `sluice gateway` on a free port, ready (its /health answers); yields its base URL."""
    from shared.redis_server import free_port

    port = free_port()
    env = {**os.environ, "SLUICE_REDIS_URL": redis_url, "SLUICE_API_KEYS": api_key}
    with contextlib.ExitStack() as files:
        out = (files.enter_context(log_path.open("wb")) if log_path is not None
               else subprocess.DEVNULL)
        proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "gateway", "--port",
                                 str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail("the gateway exited during start-up"
                            + (f":\n{log_path.read_text()}" if log_path else ""))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the gateway did not answer /health in 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def gateway_process() -> Callable[..., contextlib.AbstractContextManager[str]]:
    """`with gateway_process(redis_url, api_key[, log_path]) as url:` runs a gateway."""
    return _gateway
