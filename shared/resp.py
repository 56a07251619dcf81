"""A lean Redis connection for the few commands on every request's path.

redis-py is the client for everything else. On a first token's path its general machinery (a
connection taken from and given back to a pool, retry and health-check set-up, a reader task
per pub/sub connection) costs more than the round trip itself on a fast machine: about 230 us
of client work per PING where this costs about 130 us on a small VM. Here one connection carries
every caller's commands pipelined (replies come back in order, so a FIFO of futures matches
them up), replies are parsed as they arrive in the event loop's read callback, and pub/sub
messages are handed to a callback there, with no task to wake in between.

Speaks RESP2 over TCP (`redis://`, `rediss://`) or a Unix socket (`unix://`), with AUTH and
SELECT from the URL; errors are redis-py's exception classes, so callers handle both alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
)

log = logging.getLogger(__name__)

Reply = Any  # bytes | int | None | list[Reply] | RedisError (an error reply, as a value)
OnMessage = Callable[[bytes, bytes], None]  # (channel, data) of a pub/sub message


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


_INCOMPLETE = _Incomplete()


def encode(args: Sequence[bytes | str | int | float]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _error(message: str) -> RedisError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(("NOAUTH", "WRONGPASS")):
        return AuthenticationError(message)
    return ResponseError(message.removeprefix("ERR "))


def parse(buf: bytes | bytearray, pos: int) -> tuple[Reply, int]:
    """The reply that starts at `pos` and where the next one starts; raises _Incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _INCOMPLETE
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            raise _INCOMPLETE
        return bytes(buf[end + 2:stop]), stop + 2
    if kind == 42:  # * array
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        items = []
        at = end + 2
        for _ in range(n):
            item, at = parse(buf, at)
            items.append(item)
        return items, at
    if kind == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 43:  # + simple string
        return bytes(buf[pos + 1:end]), end + 2
    if kind == 45:  # - error
        return _error(bytes(buf[pos + 1:end]).decode(errors="replace")), end + 2
    raise ConnectionError(f"unexpected byte {kind!r} in a Redis reply")


class RespConnection(asyncio.Protocol):
    """One connection; `send` pipelines a command and returns the future of its reply.

    With `on_message`, pub/sub messages (arrays starting with b"message") go to it as they are
    read, in the read callback; every other reply answers the oldest command still waiting.
    """

    def __init__(self, on_message: OnMessage | None = None) -> None:
        self._on_message = on_message
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiters: deque[asyncio.Future[Reply]] = deque()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = parse(buf, pos)
                self._deliver(reply)
        except _Incomplete:
            pass
        except ConnectionError as e:  # a protocol error: nothing after it can be trusted
            log.error("closing a Redis connection: %s", e)
            self._fail(e)
            if self._transport is not None:
                self._transport.abort()
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"Redis connection lost: {exc}" if exc
                                   else "Redis closed the connection"))

    # -- use -----------------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    def send(self, *args: bytes | str | int | float) -> asyncio.Future[Reply]:
        """Writes the command now; the future gets its reply (an error reply as a value)."""
        return self.send_many((args,))[0]

    def send_many(self, commands: Sequence[Sequence[bytes | str | int | float]]
                  ) -> list[asyncio.Future[Reply]]:
        """Writes the commands in one write, so a process killed meanwhile has sent all of them
        or none: a checkpoint never reaches Redis without the PUBLISH that follows it."""
        if self._closed.done() or self._transport is None:
            raise ConnectionError("the Redis connection is closed")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiters.extend(futures)
        self._transport.write(b"".join(encode(c) for c in commands))
        return futures

    async def execute(self, *args: bytes | str | int | float) -> Reply:
        """The command's reply; a Redis error is raised."""
        reply = await self.send(*args)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- inside --------------------------------------------------------------------------------

    def _deliver(self, reply: Reply) -> None:
        if self._on_message is not None and type(reply) is list and len(reply) == 3 \
                and reply[0] == b"message":
            try:
                self._on_message(reply[1], reply[2])
            except Exception:  # one bad message must not take the connection down
                log.exception("a pub/sub message handler failed")
            return
        if not self._waiters:
            raise ConnectionError("a Redis reply came with no command waiting for it")
        fut = self._waiters.popleft()
        if not fut.done():  # its caller may have been cancelled
            fut.set_result(reply)

    def _fail(self, exc: Exception) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if not self._closed.done():
            self._closed.set_result(None)


def _ssl_context(opts: Mapping[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
    reqs = opts.get("ssl_cert_reqs")
    if reqs in ("none", ssl.CERT_NONE):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif reqs in ("optional", ssl.CERT_OPTIONAL):
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


async def connect(url: str, on_message: OnMessage | None = None,
                  timeout_s: float = 5.0) -> RespConnection:
    """A connection to the Redis at `url`, authenticated and on the URL's database."""
    opts = parse_url(url)
    loop = asyncio.get_running_loop()

    def factory() -> RespConnection:
        return RespConnection(on_message)

    async def open_() -> RespConnection:
        if "path" in opts:
            _, conn = await loop.create_unix_connection(factory, opts["path"])
        else:
            ctx = _ssl_context(opts) if opts.get("connection_class") is SSLConnection else None
            _, conn = await loop.create_connection(factory, opts.get("host", "localhost"),
                                                   int(opts.get("port", 6379)), ssl=ctx)
        try:
            if opts.get("password") is not None:
                user = opts.get("username")
                await conn.execute("AUTH", *([user] if user else []), opts["password"])
            if opts.get("db"):
                await conn.execute("SELECT", int(opts["db"]))
        except BaseException:
            conn.close()
            raise
        return conn

    return await asyncio.wait_for(open_(), timeout_s)


def stream_entries(reply: Reply) -> list[tuple[str, dict[bytes, bytes]]]:
    """XREADGROUP's reply (nil when it timed out) as (entry id, fields) pairs."""
    out = []
    for _, entries in reply or ():
        for entry_id, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
            out.append((entry_id.decode(), fields))
    return out


class Script:
    """A Lua script run by its SHA1, loaded (by EVAL) only where the server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class RespClient:
    """A lazily (re)connected RespConnection shared by every caller of a process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: RespConnection | None = None
        self._lock = asyncio.Lock()

    async def connection(self) -> RespConnection:
        conn = self._conn
        if conn is not None and not conn.is_closed:
            return conn
        async with self._lock:  # one reconnect for every caller that found it closed
            if self._conn is None or self._conn.is_closed:
                self._conn = await connect(self.url)
            return self._conn

    async def execute(self, *args: bytes | str | int | float) -> Reply:
        return await (await self.connection()).execute(*args)

    async def pipeline(self, commands: Sequence[Sequence[bytes | str | int | float]],
                       retry_delays_s: Sequence[float] = ()) -> list[Reply]:
        """Sends every command in one write and returns their replies; like redis-py's
        pipeline, raises the first error reply once all are in (the commands after it ran).

        With `retry_delays_s`, a lost connection is waited out: after each delay the commands
        go again on a new connection. Only for commands that may run twice (the connection
        may have dropped after Redis ran them), as redis-py's own retries do.
        """
        for delay_s in (*retry_delays_s, None):
            try:
                futures = (await self.connection()).send_many(commands)
                replies = [await f for f in futures]
                break
            except (ConnectionError, OSError, asyncio.TimeoutError):
                if delay_s is None:
                    raise
                log.warning("Redis connection lost; sending %d commands again in %.2f s",
                            len(commands), delay_s)
                await asyncio.sleep(delay_s)
        for r in replies:
            if isinstance(r, RedisError):
                raise r
        return replies

    async def run_script(self, script: Script, keys: Sequence[str],
                         args: Sequence[bytes | str | int | float]) -> Reply:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # a new or restarted server: EVAL runs it and caches it
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None
