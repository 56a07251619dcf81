"""The floor under the service's added latency on this machine: its process hops, with no work.

A first token crosses the same processes and channels in the service whatever Sluice does at
each of them: client -> gateway (HTTP) -> Redis (XADD) -> worker front (blocked XREADGROUP) ->
engine core (pipe) -> worker front (pipe) -> Redis (PUBLISH) -> gateway (pub/sub) -> client
(chunked SSE). This script builds that chain from bare parts on the service's own stack
(asyncio on uvloop, the lean Redis connection of `shared/resp.py`, a private redis-server with
the same append-only file), none of
which does any work beyond passing a few bytes on, and times a request's first SSE event at the
client exactly as `loadtest.gateway_overhead --mode latency` does (the same minimal HTTP client).

The figure bounds what any gateway/worker on this design can reach here: `gateway_overhead`'s
ΔTTFT is this floor plus what Sluice does at each hop (HTTP parsing and validation, the job,
tokenizing, detokenizing, the SSE chunk). A machine whose processes wake slowly (a VM, a
sandboxed kernel, a busy host) has a high floor; bare metal has a low one.

One request at a time; --gap-ms sets the pause before each next request: a short one keeps
every process warm, as a busy service is, and a long one lets them sleep, as an idle one does.

    python -m loadtest.hop_floor
    python -m loadtest.hop_floor --gap-ms 2,20,50 --requests 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.gateway_overhead import RawConnection, parse_ms_list, summarize
from shared import resp
from shared.busy_poll import run_loop

STREAM, GROUP, CHANNEL = "floor:q", "floor", "floor:reply"
# One SSE event shaped like a completion chunk, so the latency mode's client reads it as one.
EVENT = b'data: {"choices":[{"index":0,"text":"x","finish_reason":"length"}]}\n\n'
DONE = b"data: [DONE]\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- the bare engine core and worker front ------------------------------------------------------


def _core(commands: int, results: int) -> None:
    """Sleeps in select on its command pipe, as the engine core does when idle; echoes."""
    while True:
        select.select([commands], [], [])
        data = os.read(commands, 4096)
        if not data:
            return
        os.write(results, data)


async def _front(redis_url: str, to_core: int, from_core: int) -> None:
    lane, reader = resp.RespClient(redis_url), resp.RespClient(redis_url)
    loop = asyncio.get_running_loop()
    results: asyncio.Queue[bytes] = asyncio.Queue()
    loop.add_reader(from_core, lambda: results.put_nowait(os.read(from_core, 4096)))

    async def publish() -> None:
        while True:
            data = await results.get()
            for rid in data.split(b"\n"):
                if rid:
                    await lane.execute("PUBLISH", CHANNEL, rid)

    task = asyncio.create_task(publish())
    while True:
        reply = await reader.execute("XREADGROUP", "GROUP", GROUP, "front", "COUNT", 8,
                                     "BLOCK", 200, "STREAMS", STREAM, ">")
        entries = resp.stream_entries(reply)
        if entries:
            os.write(to_core, b"".join(fields[b"id"] + b"\n" for _, fields in entries))
    task.cancel()


def run_front(redis_url: str) -> None:
    commands_r, commands_w = os.pipe()
    results_r, results_w = os.pipe()
    if os.fork() == 0:  # the core: a process of its own, as in the worker
        os.close(commands_w)
        os.close(results_r)
        _core(commands_r, results_w)
        os._exit(0)
    os.close(commands_r)
    os.close(results_w)
    run_loop(_front(redis_url, commands_w, results_r))


# -- the bare gateway -------------------------------------------------------------------------


async def _gateway(redis_url: str, port: int) -> None:
    lane = resp.RespClient(redis_url)
    waiting: dict[bytes, asyncio.Future[None]] = {}

    def route(channel: bytes, data: bytes) -> None:
        fut = waiting.pop(data, None)
        if fut is not None:
            fut.set_result(None)

    ids = iter(range(1 << 62))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the client closed its connection
                writer.close()
                return
            size = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(size)
            rid = b"%d" % next(ids)
            fut = asyncio.get_running_loop().create_future()
            waiting[rid] = fut
            await lane.execute("XADD", STREAM, "*", "id", rid)
            await fut
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: text/event-stream\r\n\r\n"
                         + _chunk(EVENT) + _chunk(DONE) + b"0\r\n\r\n")

    subscription = await resp.connect(redis_url, on_message=route)
    await subscription.execute("SUBSCRIBE", CHANNEL)
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# -- the run ----------------------------------------------------------------------------------


async def _client(port: int, requests: int, gap_s: float, warmup: int) -> list[float]:
    conn = RawConnection("127.0.0.1", port)
    ttft: list[float] = []
    try:
        for i in range(warmup + requests):
            s = await asyncio.wait_for(  # a broken chain fails the run instead of hanging it
                conn.stream("/v1/completions", {"prompt": [1, 2, 3]}, parse=False), 30)
            if i >= warmup:
                ttft.append(s.ttft)
            await asyncio.sleep(gap_s)
    finally:
        conn.close()
    return ttft


def measure(gaps_ms: list[float], requests: int, warmup: int, aof: bool) -> dict[str, Any]:
    import redis

    from shared.redis_server import RedisServer, free_port

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sluice-floor-") as tmp:
        server = RedisServer(data_dir=Path(tmp) / "redis", appendonly=aof)
        server.start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            redis.Redis.from_url(server.local_url).xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            port = free_port()
            for role in (["front"], ["gateway", "--port", str(port)]):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "loadtest.hop_floor", "--role", *role,
                     "--redis-url", server.local_url], stdin=subprocess.DEVNULL))
            _wait_listening(port, procs)
            for gap in gaps_ms:
                ttft = asyncio.run(_client(port, requests, gap / 1e3, warmup))
                out[f"gap_{gap:g}ms"] = summarize(ttft)
                s = out[f"gap_{gap:g}ms"]
                print(f"gap {gap:g} ms: first event p50 {s['p50']:.3f} ms, p90 {s['p90']:.3f}, "
                      f"p99 {s['p99']:.3f} ({s['n']} requests)")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=10)
            server.stop()
    return out


def _wait_listening(port: int, procs: list[subprocess.Popen[bytes]]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a floor process exited during start-up")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("the floor's gateway did not start listening within 30 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.hop_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gap-ms", type=parse_ms_list, default=[2.0, 50.0], metavar="LIST",
                   help="pause before each next request, ms, comma-separated; one run each "
                        "(default 2,50)")
    p.add_argument("--requests", type=int, default=300, help="timed requests per gap (300)")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests first (20)")
    p.add_argument("--redis-aof", action=argparse.BooleanOptionalAction, default=True,
                   help="Redis append-only file on, as the service runs it (default: on)")
    p.add_argument("--output-json", default="results/hop_floor.json")
    p.add_argument("--role", choices=["front", "gateway"], help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "front":
        run_front(args.redis_url)
        return 0
    if args.role == "gateway":
        run_loop(_gateway(args.redis_url, args.port))
        return 0
    from loadtest.gateway_overhead import _git_state
    from loadtest.offline import _write_json

    print(f"bare hop chain, one request at a time, {args.requests} requests per gap")
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("role", "redis_url",
                                                                           "port")},
              "first_event_ms": measure(args.gap_ms, args.requests, args.warmup, args.redis_aof),
              "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()),
              "git": _git_state()}
    _write_json(args.output_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
