"""The lean Redis connection (shared/resp.py) against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

from shared import resp
from shared.redis_server import RedisServer


def _run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout=20))


@pytest.mark.parametrize("data, value", [
    (b"+OK\r\n", b"OK"),
    (b":-42\r\n", -42),
    (b"$5\r\nhe\r\no\r\n", b"he\r\no"),  # bulk strings may hold CRLF
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*2\r\n*2\r\n$1\r\na\r\n:1\r\n$0\r\n\r\n", [[b"a", 1], b""]),
])
def test_parse_reads_each_reply_type(data: bytes, value: Any) -> None:
    assert resp.parse(data, 0) == (value, len(data))
    for cut in range(1, len(data)):  # every prefix is incomplete, never a wrong value
        with pytest.raises(resp._Incomplete):
            resp.parse(data[:cut], 0)


def test_parse_maps_errors_to_the_client_library_classes() -> None:
    err, _ = resp.parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(err, redis.exceptions.NoScriptError)
    err, _ = resp.parse(b"-WRONGPASS invalid username-password pair\r\n", 0)
    assert isinstance(err, AuthenticationError)
    err, _ = resp.parse(b"-ERR unknown command 'NOPE'\r\n", 0)
    assert type(err) is ResponseError and str(err) == "unknown command 'NOPE'"


def test_pipelined_commands_from_many_callers_get_their_own_replies(redis_url: str) -> None:
    async def main() -> None:
        client = resp.RespClient(redis_url)
        results = await asyncio.gather(*(client.execute("INCRBY", "n", i) for i in range(1, 201)))
        # Each INCRBY's reply is the running total after it: one per caller, in send order.
        assert results == [i * (i + 1) // 2 for i in range(1, 201)]
        big = b"x" * 300_000  # a reply that arrives over many reads
        assert await client.execute("SET", "big", big) == b"OK"
        assert await client.execute("GET", "big") == big
        with pytest.raises(ResponseError):
            await client.execute("NOPE")
        assert await client.execute("PING") == b"PONG"  # an error leaves the connection usable
        await client.aclose()
    _run(main)


def test_a_pipeline_is_one_write_and_raises_its_first_error_after_all_ran(
        redis_url: str) -> None:
    async def main() -> None:
        client = resp.RespClient(redis_url)
        conn = await client.connection()
        writes: list[bytes] = []
        transport = conn._transport
        assert transport is not None
        real_write = transport.write
        conn._transport = type("Spy", (), {"write": lambda self, b: (writes.append(b),
                                                                      real_write(b))})()
        assert await client.pipeline([("SET", "a", 1), ("INCR", "a")]) == [b"OK", 2]
        with pytest.raises(ResponseError):
            await client.pipeline([("INCR", "a"), ("LPUSH", "a", "x"), ("INCR", "a")])
        assert len(writes) == 2  # one per pipeline: a process killed mid-way sent all or none
        conn._transport = transport
        assert await client.execute("GET", "a") == b"4"  # the command after the error ran
        await client.aclose()
    _run(main)


def test_scripts_load_themselves_on_a_server_that_lacks_them(redis_url: str) -> None:
    script = resp.Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")

    async def main() -> None:
        client = resp.RespClient(redis_url)
        await client.execute("SCRIPT", "FLUSH")
        assert await client.run_script(script, ["k"], [5]) == 5  # NOSCRIPT, then EVAL
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await client.run_script(script, ["k"], [2]) == 7  # EVALSHA
        await client.aclose()
    _run(main)


def test_pubsub_messages_reach_the_callback(redis_url: str) -> None:
    async def main() -> None:
        got: list[tuple[bytes, bytes]] = []
        arrived = asyncio.Event()

        def on_message(channel: bytes, data: bytes) -> None:
            got.append((channel, data))
            if len(got) == 3:
                arrived.set()
            if data == b"bad":
                raise ValueError("a handler's error must not close the connection")
        conn = await resp.connect(redis_url, on_message=on_message)
        assert await conn.execute("SUBSCRIBE", "ch") == [b"subscribe", b"ch", 1]
        pub = resp.RespClient(redis_url)
        for data in (b"one", b"bad", b"three"):
            assert await pub.execute("PUBLISH", "ch", data) == 1
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == [(b"ch", b"one"), (b"ch", b"bad"), (b"ch", b"three")]
        assert not conn.is_closed
        conn.close()
        await conn.wait_closed()
        await pub.aclose()
    _run(main)


def test_a_lost_connection_fails_waiting_commands_and_the_client_reconnects(
        redis_url: str) -> None:
    async def main() -> None:
        client = resp.RespClient(redis_url)
        conn = await client.connection()
        blocked = conn.send("BLPOP", "never", 0)
        killer = redis.Redis.from_url(redis_url)
        assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
        with pytest.raises(ConnectionError):
            await blocked
        await conn.wait_closed()
        with pytest.raises(ConnectionError):
            conn.send("PING")
        assert await client.execute("PING") == b"PONG"  # a new connection
        await client.aclose()
    _run(main)


def test_a_pipeline_with_retries_waits_out_a_lost_connection(redis_url: str) -> None:
    async def main() -> None:
        client = resp.RespClient(redis_url)
        killer = redis.Redis.from_url(redis_url)
        await client.connection()
        killer.client_kill_filter(_type="normal", skipme=True)  # unseen by the client as yet
        with pytest.raises(ConnectionError):
            await client.pipeline([("INCR", "x")])
        await client.connection()
        killer.client_kill_filter(_type="normal", skipme=True)
        assert await client.pipeline([("INCR", "x")], retry_delays_s=(0.05,)) == [1]
        await client.aclose()
    _run(main)


def test_auth_and_database_come_from_the_url(tmp_path: Any) -> None:
    server = RedisServer(data_dir=tmp_path, appendonly=False)
    server.start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("requirepass", "s3cret")
        admin = redis.Redis.from_url(server.url, password="s3cret")
        redis.Redis(host=server.host, port=server.port, db=3, password="s3cret").set("k", "3")
        base = f"redis://:s3cret@{server.host}:{server.port}"

        async def main() -> None:
            client = resp.RespClient(base + "/3")
            assert await client.execute("GET", "k") == b"3"
            await client.aclose()
            with pytest.raises(AuthenticationError):
                await resp.connect(f"redis://:wrong@{server.host}:{server.port}/0")
            if server.socket_path is not None:  # the Unix socket, with the same password
                unix = resp.RespClient(f"unix://:s3cret@{server.socket_path}?db=3")
                assert await unix.execute("GET", "k") == b"3"
                await unix.aclose()
        _run(main)
        admin.config_set("requirepass", "")
    finally:
        server.stop()
