"""What the gateway and Redis cost, measured as a user sees it: latency added, and throughput ceiling.

--mode latency (the price per token)
    One workload, twice, with the same random token-id prompts, engine settings and warm-up:
      direct   the engine in this process (`worker.engine.engine.Engine`), driven by a closed loop
               of --concurrency requests: a token "arrives" when the `step()` that made it returns.
               TTFT = first token - add_request; inter-token latency (ITL) = the gaps between one
               request's consecutive tokens.
      service  a real redis-server, a real worker (`sluice worker`: Redis front + engine core
               process) and a real gateway (`sluice gateway`), streaming /v1/completions over HTTP
               from --concurrency clients in a closed loop; TTFT and ITL are taken at the client.
               The client is a minimal keep-alive HTTP/1.1 one (--client raw), since httpx costs
               about as much CPU per request as the gateway and would count as its time;
               --client httpx measures with httpx instead.
    Every request is greedy and generates exactly --output-len tokens (ignore_eos). After one
    untimed warm-up of --warmup-prompts other prompts on each side, the sides alternate for
    --repeats timed passes, each side going first in every other pass; the service's clients
    keep their connections from pass to pass. Each percentile's median over the passes (a
    pass that other load on the machine disturbed moves it little) is printed per side with
    its difference, and so are the pooled percentiles of every sample and the "paired"
    delta: each percentile's difference within a pass, median over passes, which a host that
    drifts between passes moves least (--concurrency 1 --num-prompts 1 pairs request by
    request). Each pass also records the CPU seconds per wall second of
    every process, "other processes" being load this run did not cause: a pass with much of it
    is not a clean measurement. On a machine with few cores the service's five processes
    (client, gateway, Redis, worker front, engine core) share them, and that contention is part
    of the difference; --torch-threads 1 keeps the engine's threads from fighting the rest.
    --trace (on by default) adds one untimed service pass with an observer process subscribed
    to the gateway's reply channel, which splits TTFT into gateway intake (client -> job built),
    worker (job -> first token published) and delivery (published -> client), and gives each
    token's delivery latency and the inter-token gaps as published, i.e. before the gateway.

--mode bus (the ceiling per worker)
    The worker front runs over a NULL engine core (`worker/null_core.py`, started by
    `loadtest/null_worker.py`): no model, one token per running request every --null-step-ms, so
    the offered load is concurrency / step tokens/s and the engine costs nothing. Two paths:
      redis    this script XADDs the jobs itself (`shared.messages.Job`) and subscribes to their
               reply channel: worker front + Redis only.
      gateway  --concurrency HTTP streams at once through the gateway (SSE, as in latency mode).
    For each step interval (a fresh null worker each) it reports tokens/s delivered to the
    client over the whole run and over the middle 80% of the tokens (no ramp-up or tail), the
    CPU seconds each process used per second of the run (1.0 = one core busy), which says what
    saturates first, and tokens per CPU second of the worker front and the gateway: the rate
    each could carry with a core to itself, which other load on the machine does not change
    (the front's threads share one GIL, so they count together). A delivered rate below the
    offered one means the path is the bottleneck.
    --profile DIR runs the bus mode with the worker front's event loop and the gateway under
    cProfile timed by thread CPU time (rates then include the profiler's overhead) and prints
    where their time goes.

Service settings are the defaults of `sluice worker` and `sluice gateway`, with two exceptions
made so that a run can finish: the gateway's queue_cap is raised above the number of requests
the run sends (nothing trims a model's stream, and on Redis 6.2, which has no consumer-group
lag, the gateway takes the stream's length for its backlog and answers 429 to everything once
1024 jobs were ever queued), and in bus mode at most --max-opening requests wait for their
response headers at once (the gateway's Redis pool holds 100 connections; ~100 requests
arriving together exhaust it and get HTTP 500).

Sizes: --num-prompts, --input-len, --output-len and --concurrency apply to every mode run; a size
not given takes the mode's default (latency: 32 prompts, 32 in, 64 out, concurrency 8; bus: 256
requests, 32 in, 512 out, all 256 at once).

    python -m loadtest.gateway_overhead --mode latency
    python -m loadtest.gateway_overhead --mode latency --num-prompts 64 --concurrency 16
    python -m loadtest.gateway_overhead --mode bus --null-step-ms 5,2,1
    python -m loadtest.gateway_overhead --mode bus --null-step-ms 1 --profile results/profile
    python -m loadtest.gateway_overhead --mode all --output-json results/gateway_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from shared import names
from shared.messages import Job
from shared.redis_server import RedisServer, free_port

API_KEY = "sk-gateway-overhead"
LATENCY_DEFAULTS = {"num_prompts": 32, "input_len": 32, "output_len": 64, "concurrency": 8}
BUS_DEFAULTS = {"num_prompts": 256, "input_len": 32, "output_len": 512, "concurrency": 256}
NULL_MODEL = "null"  # served name of the null worker, so it never mixes with a real one
PERCENTILES = (50, 90, 99)
REPLY_TIMEOUT_S = 60.0


# -- timings and their summaries -----------------------------------------------------------


@dataclass
class Stream:
    """One request as the client saw it: when it was sent, when each token arrived."""

    submit: float  # perf_counter
    token_times: list[float] = field(default_factory=list)  # perf_counter
    finish_reason: str | None = None
    usage_tokens: int | None = None  # completion_tokens reported by the server, when asked
    request_id: str = ""  # the gateway's X-Request-Id
    submit_wall: float = 0.0  # time.time() at submit, to line up with other processes' clocks

    def wall(self, t: float) -> float:
        """A perf_counter time of this stream as time.time()."""
        return self.submit_wall + (t - self.submit)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.submit

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]


def summarize(values_s: list[float]) -> dict[str, float]:
    """Milliseconds: p50, p90, p99, mean, min, max, and the sample count n."""
    if not values_s:
        return {"n": 0}
    ms = np.asarray(values_s) * 1e3
    out = {f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}
    out.update(mean=float(ms.mean()), min=float(ms.min()), max=float(ms.max()), n=len(ms))
    return out


def summarize_run(streams: list[Stream], elapsed_s: float) -> dict[str, Any]:
    tokens = sum(len(s.token_times) for s in streams)
    return {"num_requests": len(streams), "output_tokens": tokens, "elapsed_s": elapsed_s,
            "output_tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
            "ttft_ms": summarize([s.ttft for s in streams if s.token_times]),
            "itl_ms": summarize([g for s in streams for g in s.gaps])}


def delivery_rates(streams: list[Stream]) -> dict[str, float]:
    """Tokens/s from the first submit to the last token, and over the middle 80% of tokens."""
    times = np.sort(np.concatenate([np.asarray(s.token_times) for s in streams if s.token_times]))
    start = min(s.submit for s in streams)
    n = len(times)
    overall = n / (times[-1] - start) if n and times[-1] > start else 0.0
    lo, hi = int(n * 0.1), max(int(n * 0.9) - 1, 0)
    middle = (hi - lo) / (times[hi] - times[lo]) if hi > lo and times[hi] > times[lo] else 0.0
    return {"tokens": n, "elapsed_s": float(times[-1] - start) if n else 0.0,
            "tokens_per_s": float(overall), "tokens_per_s_middle_80": float(middle)}


def check_streams(streams: list[Stream], output_len: int, where: str) -> list[str]:
    """Every request must have produced exactly output_len tokens and ended on length."""
    problems = []
    for i, s in enumerate(streams):
        if len(s.token_times) != output_len:
            problems.append(f"{where} request {i}: {len(s.token_times)} tokens, "
                            f"expected {output_len}")
        if s.usage_tokens is not None and s.usage_tokens != output_len:
            problems.append(f"{where} request {i}: usage says {s.usage_tokens} tokens")
        if s.finish_reason not in (None, "length"):
            problems.append(f"{where} request {i}: finish_reason {s.finish_reason!r}")
    return problems


# -- CPU accounting from /proc ----------------------------------------------------------------


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process (Linux); None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _thread_cpu_s(pid: int) -> tuple[float, float] | None:
    """CPU seconds of a process's main thread and of all its other threads together."""
    tick = os.sysconf("SC_CLK_TCK")
    main = rest = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / tick
            if int(task.name) == pid:
                main += cpu
            else:
                rest += cpu
    except (OSError, IndexError, ValueError):
        return None
    return main, rest


def _children(pid: int) -> list[int]:
    """Direct children of a process (Linux), e.g. a worker's engine core."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _machine_busy_s() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


CLIENT = "this process"
OTHERS = "other processes"
FRONT = "worker front"
FRONT_LOOP = "worker front: event loop thread"
FRONT_OTHER = "worker front: other threads"
SHORT = {FRONT_LOOP: "front-loop", FRONT_OTHER: "front-threads", "engine core": "core",
         CLIENT: "client", OTHERS: "others"}


class CpuMeter:
    """CPU seconds per wall second between start() and stop(): of each named process, of this
    one (`client`), and of everything else on the machine (`other processes`), which is load
    this benchmark did not cause and which skews it."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {k: v for k, v in pids.items() if v is not None}
        self._t0 = 0.0
        self._c0: dict[str, float | None] = {}
        self.wall = 0.0

    def _read(self) -> dict[str, float | None]:
        now: dict[str, float | None] = {k: _cpu_s(p) for k, p in self.pids.items()}
        front = self.pids.get(FRONT)
        threads = _thread_cpu_s(front) if front is not None else None
        if threads is not None:  # the event loop, and the thread that unpickles step results
            now[FRONT_LOOP], now[FRONT_OTHER] = threads
        now[CLIENT] = time.process_time()
        now[OTHERS] = _machine_busy_s()
        return now

    def start(self) -> None:
        self._c0 = self._read()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = self.wall = time.perf_counter() - self._t0
        now = self._read()
        out = {}
        for k, c1 in now.items():
            c0 = self._c0.get(k)
            if c0 is not None and c1 is not None and wall > 0:
                out[k] = (c1 - c0) / wall
        if OTHERS in out:
            out[OTHERS] = max(0.0, out[OTHERS] - sum(
                v for k, v in out.items() if k not in (OTHERS, FRONT_LOOP, FRONT_OTHER)))
        return out


# -- the service's processes ------------------------------------------------------------------


class Service:
    """A private redis-server, a gateway and workers, each a child process; close() stops all."""

    def __init__(self, workdir: Path, aof: bool, startup_timeout_s: float,
                 process_env: dict[str, str] | None = None) -> None:
        self.process_env = process_env or {}  # for every process of the service
        self.workdir = workdir
        self.timeout_s = startup_timeout_s
        self.redis = RedisServer(data_dir=workdir / "redis", appendonly=aof)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self.gateway_id = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: Any) -> dict[str, str]:
        env = {**os.environ, **self.process_env, "SLUICE_REDIS_URL": self.redis.local_url,
               "SLUICE_API_KEYS": API_KEY}
        env.update({f"SLUICE_{k.upper()}": str(v) for k, v in extra.items() if v is not None})
        return env

    def start_redis(self) -> None:
        self.redis.start()

    def spawn(self, name: str, argv: list[str], env: dict[str, str],
              threads: int | None = None) -> subprocess.Popen[bytes]:
        if threads is not None:  # torch reads it at import, in the worker's core process too
            env = {**env, "OMP_NUM_THREADS": str(threads)}
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        # A session of its own: a Ctrl-C here reaches only this script, which stops the children
        # in order (gateway, then workers, which drain, then Redis).
        proc = subprocess.Popen([sys.executable, *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_gateway(self, total_jobs: int, profile: Path | None = None) -> None:
        """`total_jobs`: how many requests this run will send. Nothing trims a model's stream,
        and on Redis 6.2 (no consumer-group lag) the gateway takes the stream's length for the
        backlog, so past queue_cap jobs it would answer 429 to everything: the cap is raised
        above what this run sends."""
        self.port = free_port()
        self.gateway_id = f"overhead-{uuid.uuid4().hex[:8]}"
        env = self.env(queue_cap=max(1024, 2 * total_jobs), gateway_id=self.gateway_id)
        prefix = ["-m", "loadtest.cpu_profile", str(profile)] if profile else ["-m"]
        self.spawn("gateway", [*prefix, "infra.cli", "gateway", "--port", str(self.port)], env)

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, model: str, worker: str) -> None:
        """Until a heartbeat of `model` says ready and the gateway answers /health."""
        client = redis.Redis.from_url(self.redis.local_url)
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                for name in ("gateway", worker):
                    proc = self.procs.get(name)
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with code {proc.returncode}:\n"
                                           f"{self.log_tail(name)}")
                ready = False
                for key in client.scan_iter(match=names.WORKER_HEARTBEAT_PATTERN):
                    beat = client.get(key)
                    if beat and json.loads(beat).get("model") == model and \
                            json.loads(beat).get("state") == "ready":
                        ready = True
                if ready:
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                            return
                time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError(f"service not ready within {self.timeout_s:g} s; worker log:\n"
                           f"{self.log_tail(worker)}\ngateway log:\n{self.log_tail('gateway')}")

    def pids(self, worker: str) -> dict[str, int | None]:
        """The processes worth watching: gateway, worker front, its engine core, Redis."""
        w = self.procs.get(worker)
        g = self.procs.get("gateway")
        # The spawn context's resource tracker is a child of the worker too: skip it.
        core = [c for c in (_children(w.pid) if w is not None else [])
                if "resource_tracker" not in _cmdline(c)]
        return {"gateway": g.pid if g else None, FRONT: w.pid if w else None,
                "engine core": max(core) if core else None, "redis": self.redis.pid}

    def stop(self, name: str, timeout_s: float = 30.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        kids = _children(proc.pid)
        if proc.poll() is None:
            proc.terminate()  # workers drain: stop reading, finish what runs, stop the core
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in kids:  # an engine core left behind by a killed worker
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if _cpu_s(pid) is not None:
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        if "gateway" in self.procs:
            self.stop("gateway")
        for name in list(self.procs):
            self.stop(name)
        self.redis.stop()


@contextlib.contextmanager
def running_service(aof: bool, startup_timeout_s: float,
                    process_env: dict[str, str] | None = None) -> Iterator[Service]:
    with tempfile.TemporaryDirectory(prefix="sluice-overhead-") as tmp:
        svc = Service(Path(tmp), aof, startup_timeout_s, process_env)
        try:
            svc.start_redis()
            yield svc
        except BaseException:
            for name in sorted(p.stem for p in Path(tmp).glob("*.log")):
                print(f"--- last lines of the {name} log ---\n{svc.log_tail(name)}",
                      file=sys.stderr)
            raise
        finally:
            svc.close()


# -- HTTP streaming client ----------------------------------------------------------------------


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                            parse: bool, opening: asyncio.Semaphore | None = None) -> Stream:
    """POSTs one streaming completion and times every token chunk as it arrives.

    parse=True decodes every chunk (finish reason, usage); parse=False (null-engine streams)
    only counts the characters of each chunk's text, which keeps the client cheap when it must
    keep up with many streams. `opening`,
    when given, is held from sending the request until its response headers arrive.
    """
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with contextlib.AsyncExitStack() as stack:
        if opening is not None:
            await opening.acquire()
        s = Stream(submit=time.perf_counter(), submit_wall=time.time())
        try:
            response = await stack.enter_async_context(
                client.stream("POST", url, json=body, headers=headers))
        finally:
            if opening is not None:
                opening.release()
        s.request_id = response.headers.get("x-request-id", "")
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        events = _SSETimer(s, parse)
        async for data in response.aiter_raw():
            events.feed(data, time.perf_counter())
        events.close()
    return s


class _SSETimer:
    """Times one stream's SSE `data:` events as its bytes arrive, for either client.

    parse=True decodes every chunk (finish reason, usage; the request asks for usage on every
    chunk, whose completion tokens say how many tokens the chunk holds); parse=False,
    for the null engine's streams only, counts a chunk's tokens as the characters of its text,
    found without decoding the JSON (each null token is one character, and an event of a worker
    front that fell behind carries several), and reads the finish reason from the last one."""

    def __init__(self, s: Stream, parse: bool) -> None:
        self.s, self.parse = s, parse
        self._buf = b""  # a trailing event not complete yet
        self._last = b""

    def feed(self, data: bytes, now: float) -> None:
        s = self.s
        *events, self._buf = (self._buf + data).split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data: "):
                continue  # ": keep-alive" comments
            payload = ev[6:]
            if payload == b"[DONE]":
                continue
            if not self.parse:
                at = payload.find(b'"text":')
                if at >= 0:
                    start = payload.index(b'"', at + 7) + 1
                    s.token_times += [now] * (payload.index(b'"', start) - start)
                self._last = payload
                continue
            chunk = json.loads(payload)
            usage = chunk.get("usage")
            for choice in chunk.get("choices") or []:
                # The chunk's tokens: its choice's count so far less the count before.
                seen = len(s.token_times)
                s.token_times += [now] * ((usage["completion_tokens"] - seen) if usage else 1)
                s.finish_reason = choice.get("finish_reason") or s.finish_reason
            if usage:
                s.usage_tokens = usage["completion_tokens"]

    def close(self) -> None:
        if not self.parse and self._last:
            self.s.finish_reason = json.loads(self._last)["choices"][0]["finish_reason"]


def completion_body(model: str, prompt: list[int], output_len: int, usage: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": output_len,
                            "temperature": 0.0, "ignore_eos": True, "stream": True}
    if usage:
        # Usage on every chunk: a chunk can hold several tokens (a worker front that fell
        # behind publishes steps together), and its usage says how many.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client for one stream at a time, for the latency mode.

    httpx costs about as much CPU per request as the gateway itself, and the client shares the
    machine with the service: its time would count as the gateway's. This one writes the request
    in one call and reads the chunked SSE response with asyncio streams, nothing more.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def stream(self, path: str, body: dict[str, Any], parse: bool) -> Stream:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        s = Stream(submit=time.perf_counter(), submit_wall=time.time())
        writer.write(head + data)
        status = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status.decode().strip()}: {headers}")
        if "chunked" not in headers.get("transfer-encoding", ""):
            raise RuntimeError(f"expected a chunked stream, got headers {headers}")
        s.request_id = headers.get("x-request-id", "")
        events = _SSETimer(s, parse)
        while size := int((await reader.readline()).strip(), 16):
            chunk = await reader.readexactly(size + 2)  # the chunk and its CRLF
            events.feed(chunk[:-2], time.perf_counter())
        await reader.readline()  # the CRLF after the last chunk
        events.close()
        return s

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def run_http(base_url: str, model: str, prompts: list[list[int]], output_len: int,
                   concurrency: int, parse: bool, max_opening: int = 0, client: str = "httpx",
                   conns: list[RawConnection] | None = None) -> tuple[list[Stream], float]:
    """A closed loop: `concurrency` clients, each sending its next prompt when one ends.

    max_opening > 0: at most that many requests wait for their response headers at once (the
    streams themselves all run together). client: "httpx", or "raw" (`RawConnection`, one
    connection per client of the loop). `conns`: a list that keeps the raw clients'
    connections open across calls made on one event loop (missing ones are opened into it), so
    no timed request pays for a connection's opening.
    """
    opening = asyncio.Semaphore(max_opening) if max_opening > 0 else None
    todo: deque[tuple[int, list[int]]] = deque(enumerate(prompts))
    out: list[Stream | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(600.0, connect=30.0)
    url = f"{base_url}/v1/completions"
    host, port = base_url.rsplit("//", 1)[1].rsplit(":", 1)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:

        async def one_client(k: int) -> None:
            conn = None
            if client == "raw":
                if conns is not None and k < len(conns):
                    conn = conns[k]
                else:
                    conn = RawConnection(host, int(port))
                    if conns is not None:
                        conns.append(conn)
            try:
                while todo:
                    i, prompt = todo.popleft()
                    body = completion_body(model, prompt, output_len, usage=parse)
                    out[i] = await (conn.stream("/v1/completions", body, parse) if conn else
                                    stream_completion(http, url, body, parse, opening))
            finally:
                if conn is not None and conns is None:
                    conn.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(min(concurrency, len(prompts)))))
        elapsed = time.perf_counter() - t0
    return [s for s in out if s is not None], elapsed


# -- tracing the service: where a token's time goes ------------------------------------------


def observe_channel(redis_url: str, channel: str, out_path: str, ready: Any, stop: Any) -> None:
    """Process entry point: subscribes to a gateway's reply channel next to the gateway, sets
    `ready`, and writes `time.time() req_id seq num_tokens` for each event it sees until `stop`
    is set."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    while pubsub.get_message(timeout=1.0) is None:  # the subscribe confirmation
        pass
    ready.set()
    lines: list[str] = []
    while not stop.is_set():
        message = pubsub.get_message(timeout=0.2)
        if message is None:
            continue
        t = time.time()
        for ev in json.loads(message["data"])["events"]:
            lines.append(f"{t:.6f} {ev['req_id']} {ev['seq']} {len(ev['token_ids'])}\n")
    pubsub.close()
    client.close()
    Path(out_path).write_text("".join(lines))


def trace_breakdown(streams: list[Stream], published: dict[tuple[str, int], float],
                    created: dict[str, float]) -> dict[str, Any]:
    """Splits each request's client-side timings at the Redis publish of its tokens.

    ttft_gateway_in: client sends -> the gateway builds the job (HTTP, auth, validation, model
        check, admission), just before its XADD
    ttft_worker: job built -> first token published (XADD, XREADGROUP, tokenizing, the engine
        core's queue and prefill step, detokenizing, PUBLISH)
    ttft_delivery / token_delivery: published -> the client has the token (pub/sub, the
        gateway's router, SSE, HTTP, the client's read)
    itl_at_publish: gaps between one request's consecutive publishes (engine + worker front)
    """
    parts: dict[str, list[float]] = {k: [] for k in (
        "ttft_gateway_in", "ttft_worker", "ttft_delivery", "token_delivery", "itl_at_publish")}
    for s in streams:
        pub = [published.get((s.request_id, i)) for i in range(len(s.token_times))]
        if not s.token_times or any(p is None for p in pub) or s.request_id not in created:
            continue
        times = [p for p in pub if p is not None]
        parts["ttft_gateway_in"].append(created[s.request_id] - s.submit_wall)
        parts["ttft_worker"].append(times[0] - created[s.request_id])
        parts["ttft_delivery"].append(s.wall(s.token_times[0]) - times[0])
        parts["token_delivery"] += [s.wall(t) - p for t, p in zip(s.token_times, times,
                                                                  strict=True)]
        parts["itl_at_publish"] += [b - a for a, b in itertools.pairwise(times)]
    out: dict[str, Any] = {f"{k}_ms": summarize(v) for k, v in parts.items()}
    out["requests_traced"] = len(parts["ttft_worker"])
    return out


async def traced_pass(svc: Service, gateway_id: str, model: str, prompts: list[list[int]],
                      output_len: int, concurrency: int, http_client: str) -> dict[str, Any]:
    """One more service pass with an observer process subscribed next to the gateway."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    path = svc.workdir / "trace.txt"
    observer = ctx.Process(target=observe_channel, daemon=True, args=(
        svc.redis.local_url, names.gateway_channel(gateway_id), str(path), ready, stop))
    observer.start()
    try:
        if not await asyncio.to_thread(ready.wait, 60):
            raise RuntimeError("the trace observer did not subscribe within 60 s")
        streams, _ = await run_http(svc.base_url, model, prompts, output_len, concurrency,
                                    parse=True, client=http_client)
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        observer.join(timeout=30)
        if observer.is_alive():
            observer.kill()
            observer.join()
    published: dict[tuple[str, int], float] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        t, rid, seq, n = line.split()
        for i in range(int(n)):
            published[(rid, int(seq) + i)] = float(t)
    client = redis.Redis.from_url(svc.redis.local_url)
    created = {}
    try:
        for s in streams:
            raw = client.get(names.request_record(model, s.request_id))
            if raw:
                created[s.request_id] = float(json.loads(raw)["created"])
    finally:
        client.close()
    return trace_breakdown(streams, published, created)


# -- the engine in this process ------------------------------------------------------------------


def build_engine(args: argparse.Namespace, model_dir: Path) -> Any:
    """The engine exactly as the worker's core process builds it from the same settings."""
    from worker.engine.config import EngineConfig
    from worker.engine.engine import Engine

    config: dict[str, Any] = {"max_num_seqs": args.max_num_seqs,
                              "max_num_batched_tokens": args.max_num_batched_tokens,
                              "max_model_len": None}
    if args.kv_cache_memory_bytes is not None:
        config["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    return Engine(model_dir, EngineConfig(**config), device=args.device, dtype=args.dtype,
                  load_format=args.load_format)


def run_direct(engine: Any, prompts: list[list[int]], output_len: int,
               concurrency: int) -> tuple[list[Stream], float]:
    """The same closed loop as run_http, against `engine.step()`: a finished request's slot is
    refilled before the next step."""
    from worker.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    todo: deque[tuple[int, list[int]]] = deque(enumerate(prompts))
    streams: dict[str, Stream] = {}
    tag = uuid.uuid4().hex[:8]
    in_flight = 0
    t0 = time.perf_counter()
    while todo or engine.has_unfinished_requests():
        while todo and in_flight < concurrency:
            i, prompt = todo.popleft()
            rid = f"direct-{tag}-{i:06d}"
            streams[rid] = Stream(submit=time.perf_counter())
            engine.add_request(rid, prompt, params)
            in_flight += 1
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            s = streams[o.request_id]
            s.token_times += [now] * len(o.new_token_ids)
            if o.finished:
                s.finish_reason = o.finish_reason
                in_flight -= 1
    elapsed = time.perf_counter() - t0
    return [streams[k] for k in sorted(streams)], elapsed


# -- latency mode -------------------------------------------------------------------------------


def latency_mode(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, Any]:
    from loadtest.offline import make_workload
    from worker.models.config import ModelConfig
    from worker.models.registry import resolve_model

    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    model_dir = resolve_model(args.model)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    n, c, out_len = sizes["num_prompts"], sizes["concurrency"], sizes["output_len"]
    prompts, _ = make_workload(n, sizes["input_len"], out_len, 0.0, vocab, args.seed)
    n_warm = args.warmup_prompts if args.warmup_prompts is not None else c
    # Other prompts than the timed ones, so no timed prompt finds its blocks in the prefix cache.
    warm, _ = make_workload(max(n_warm, 1), sizes["input_len"], out_len, 0.0, vocab,
                            args.seed + 1_000_003)
    warm = warm[:n_warm]
    model = "tiny"
    direct: list[Stream] = []
    service: list[Stream] = []
    passes: list[dict[str, Any]] = []
    problems: list[str] = []
    print(f"latency: {n} requests, {sizes['input_len']} in / {out_len} out, concurrency {c}, "
          f"{args.repeats} pass(es) each side, model {args.model} on {args.device}")
    with running_service(args.redis_aof, args.startup_timeout, service_env(args)) as svc:
        svc.start_gateway(total_jobs=len(warm) + n * (args.repeats + 1))
        svc.spawn("worker", ["-m", "infra.cli", "worker", "--model", str(model_dir),
                             "--served-model-name", model],
                  svc.env(device=args.device, dtype=args.dtype, load_format=args.load_format,
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_memory_bytes=args.kv_cache_memory_bytes),
                  threads=args.torch_threads)
        engine = build_engine(args, model_dir)  # loads while the worker starts
        svc.wait_ready(model, "worker")
        # One event loop and one connection per client for every service pass: a pass of a
        # single request would otherwise time a connection's opening with its first token.
        loop = asyncio.new_event_loop()
        conns: list[RawConnection] = []

        def http_pass(batch: list[list[int]]) -> tuple[list[Stream], float]:
            return loop.run_until_complete(run_http(
                svc.base_url, model, batch, out_len, c, parse=True, client=args.client,
                conns=conns))

        if warm:
            run_direct(engine, warm, out_len, c)
            http_pass(warm)
        cpu: dict[str, list[dict[str, float]]] = {"direct": [], "service": []}
        meter_pids = svc.pids("worker")
        started = {k: v for k, v in meter_pids.items() if v is not None}
        for r in range(args.repeats):
            # Each side goes first in every other pass, so neither always follows the other's
            # idle gap (processes that slept wake late) or its leftovers.
            for side in ("direct", "service") if r % 2 == 0 else ("service", "direct"):
                meter = CpuMeter(meter_pids)
                meter.start()
                if side == "direct":
                    d, d_s = run_direct(engine, prompts, out_len, c)
                else:
                    s, s_s = http_pass(prompts)
                cpu[side].append(meter.stop())
            problems += check_streams(d, out_len, f"direct pass {r}")
            problems += check_streams(s, out_len, f"service pass {r}")
            direct += d
            service += s
            passes.append({"direct": summarize_run(d, d_s), "service": summarize_run(s, s_s),
                           # The gateway SCANs the whole keyspace for worker heartbeats on every
                           # request, and each finished request leaves a record key: intake
                           # slows as keys pile up.
                           "redis_keys_after": _dbsize(svc.redis.local_url)})
            pd, ps = passes[-1]["direct"], passes[-1]["service"]
            print(f"  pass {r + 1}: ITL p50 direct {pd['itl_ms']['p50']:.2f} ms, service "
                  f"{ps['itl_ms']['p50']:.2f} ms; TTFT p50 direct {pd['ttft_ms']['p50']:.2f} ms, "
                  f"service {ps['ttft_ms']['p50']:.2f} ms; other processes' CPU "
                  f"{cpu['direct'][-1].get(OTHERS, 0):.2f} / {cpu['service'][-1].get(OTHERS, 0):.2f}")
        for conn in conns:
            conn.close()
        loop.close()
        trace = None
        if args.trace:
            trace = asyncio.run(traced_pass(svc, svc.gateway_id, model, prompts, out_len, c,
                                            args.client))
            trace["redis_keys_before"] = passes[-1]["redis_keys_after"] if passes else None
    for p, cd, cs in zip(passes, cpu["direct"], cpu["service"], strict=True):
        p["direct"]["cpu_per_wall_s"], p["service"]["cpu_per_wall_s"] = cd, cs
    elapsed = {k: sum(p[k]["elapsed_s"] for p in passes) for k in ("direct", "service")}
    pooled = {"direct": summarize_run(direct, elapsed["direct"]),
              "service": summarize_run(service, elapsed["service"])}
    median: dict[str, dict[str, Any]] = {
        side: {metric: {q: float(np.median([p[side][metric][q] for p in passes]))
                        for q in ("p50", "p90", "p99", "mean", "min", "max")}
               for metric in ("ttft_ms", "itl_ms")}
        for side in ("direct", "service")}
    for side in median:
        median[side]["output_tokens_per_s"] = float(np.median(
            [p[side]["output_tokens_per_s"] for p in passes]))
    result = {
        # Headline: each percentile's median over the passes, robust to a pass that other load
        # on the machine disturbed. "pooled" takes the percentiles over every pass's samples.
        "median_of_passes": median, "pooled": pooled,
        "delta_ms": _deltas(median), "delta_ms_pooled": _deltas(pooled),
        "delta_ms_paired": _paired_deltas(passes),
        "passes": passes, "problems": problems, "pids": started, "trace": trace,
        "cpu_per_wall_s": {k: _mean_dicts(v) for k, v in cpu.items()},
        "workload": {**sizes, "warmup_prompts": len(warm), "repeats": args.repeats,
                     "torch_threads": args.torch_threads}}
    _print_latency(result)
    return result


def service_env(args: argparse.Namespace) -> dict[str, str]:
    """Settings every process of the service gets from this run's flags (its busy polling;
    the service's own defaults where a flag is not given)."""
    env = {}
    if args.busy_poll_ms is not None:
        env["SLUICE_BUSY_POLL_MS"] = str(args.busy_poll_ms)
    if args.core_busy_poll_ms is not None:
        env["SLUICE_CORE_BUSY_POLL_MS"] = str(args.core_busy_poll_ms)
    return env


def _dbsize(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.dbsize())
    finally:
        client.close()


def _deltas(r: dict[str, Any]) -> dict[str, float]:
    """Service minus direct, per metric and percentile, in ms."""
    return {f"{metric}_{q}": r["service"][f"{metric}_ms"][q] - r["direct"][f"{metric}_ms"][q]
            for metric in ("ttft", "itl") for q in ("p50", "p90", "p99", "mean")}


def _paired_deltas(passes: list[dict[str, Any]]) -> dict[str, float]:
    """Each percentile's service-minus-direct difference within a pass, median over passes.

    The two sides of a pass run back to back, so a host that speeds up or slows down between
    passes moves both alike; with passes of one request at concurrency 1 this is the median
    of per-request pairs."""
    per_pass = [_deltas(p) for p in passes]
    return {k: float(np.median([d[k] for d in per_pass])) for k in per_pass[0]} if per_pass \
        else {}


def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in ds for k in d}
    return {k: float(np.mean([d[k] for d in ds if k in d])) for k in sorted(keys)}


def _print_latency(r: dict[str, Any]) -> None:
    for key, title in (("median_of_passes", "median over passes of each percentile"),
                       ("pooled", "percentiles of all passes' samples pooled")):
        print(f"\n{title}, ms")
        print(f"{'':<18}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}"
              f"{'ITL mean':>10}{'out tok/s':>11}")
        for name, label in (("direct", "engine, direct"), ("service", "service, HTTP")):
            x = r[key][name]
            print(f"{label:<18}{x['ttft_ms']['p50']:>10.2f}{x['ttft_ms']['p99']:>10.2f}"
                  f"{x['itl_ms']['p50']:>10.2f}{x['itl_ms']['p99']:>10.2f}"
                  f"{x['itl_ms']['mean']:>10.2f}{x['output_tokens_per_s']:>11.0f}")
        rows = [("service - direct",
                 r["delta_ms" if key == "median_of_passes" else "delta_ms_pooled"])]
        if key == "median_of_passes" and r.get("delta_ms_paired"):
            rows.append(("paired, in-pass", r["delta_ms_paired"]))
        for label, d in rows:
            print(f"{label:<18}{d['ttft_p50']:>+10.2f}{d['ttft_p99']:>+10.2f}"
                  f"{d['itl_p50']:>+10.2f}{d['itl_p99']:>+10.2f}{d['itl_mean']:>+10.2f}")
    t = r.get("trace")
    if t:
        print(f"\nwhere the service's time goes (one extra pass, {t['requests_traced']} requests, "
              f"split at the Redis PUBLISH of each token; {t['redis_keys_before']} keys in Redis "
              "before it), ms")
        print(f"{'':<44}{'p50':>9}{'p99':>9}")
        for key, label in (("ttft_gateway_in", "TTFT: client -> job built at the gateway"),
                           ("ttft_worker", "TTFT: job built -> first token published"),
                           ("ttft_delivery", "TTFT: published -> client"),
                           ("token_delivery", "every token: published -> client"),
                           ("itl_at_publish", "ITL at the PUBLISH (engine + front)")):
            x = t[f"{key}_ms"]
            if x.get("n"):
                print(f"{label:<44}{x['p50']:>9.2f}{x['p99']:>9.2f}")
    for side in ("direct", "service"):
        print(f"CPU s per wall s, {side} passes (mean): " + ", ".join(
            f"{k} {v:.2f}" for k, v in r["cpu_per_wall_s"][side].items()))
    for p in r["problems"][:10]:
        print(f"PROBLEM: {p}")


# -- bus mode -------------------------------------------------------------------------------------


async def run_redis_direct(redis_url: str, model: str, prompts: list[list[int]], output_len: int,
                           concurrency: int) -> tuple[list[Stream], float]:
    """Jobs XADDed here, replies read from our own channel: the path without the gateway.

    Keeps `concurrency` requests outstanding (all at once when it is >= len(prompts)).
    """
    import redis.asyncio as aioredis

    channel = names.gateway_channel(f"overhead-{uuid.uuid4().hex[:8]}")
    r = aioredis.from_url(redis_url)
    pubsub = r.pubsub()
    await pubsub.subscribe(channel)
    streams: dict[str, Stream] = {}
    todo: deque[tuple[int, list[int]]] = deque(enumerate(prompts))
    done = 0
    sampling = {"temperature": 0.0, "max_tokens": output_len, "ignore_eos": True}
    tag = uuid.uuid4().hex[:8]

    async def submit(k: int) -> None:
        pipe = r.pipeline(transaction=False)
        for _ in range(k):
            if not todo:
                break
            i, prompt = todo.popleft()
            job = Job(id=f"bus-{tag}-{i:06d}", model=model, kind="completion",
                      prompt_token_ids=prompt, sampling=sampling, stream=True,
                      reply_channel=channel)
            streams[job.id] = Stream(submit=time.perf_counter())
            pipe.xadd(names.queue(model), {names.JOB_FIELD: job.model_dump_json()})
        await pipe.execute()

    try:
        t0 = time.perf_counter()
        await submit(min(concurrency, len(prompts)))
        last_reply = time.perf_counter()
        while done < len(prompts):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            now = time.perf_counter()
            if message is None:  # also returned for the subscribe confirmation
                if now - last_reply > REPLY_TIMEOUT_S:
                    raise RuntimeError(f"no reply for {REPLY_TIMEOUT_S:g} s ({done} of "
                                       f"{len(prompts)} requests finished)")
                continue
            last_reply = now
            finished = 0
            for ev in json.loads(message["data"])["events"]:
                s = streams.get(ev["req_id"])
                if s is None:
                    continue
                if ev.get("error"):
                    raise RuntimeError(f"worker error: {ev['error']}")
                s.token_times += [now] * len(ev["token_ids"])
                if ev.get("finish_reason"):
                    s.finish_reason = ev["finish_reason"]
                    finished += 1
            done += finished
            if finished and todo:
                await submit(finished)
        elapsed = time.perf_counter() - t0
    finally:
        await pubsub.unsubscribe(channel)
        await pubsub.aclose()
        await r.aclose()
    return [streams[k] for k in sorted(streams)], elapsed


def bus_mode(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, Any]:
    from loadtest.offline import make_workload
    from worker.models.config import ModelConfig
    from worker.models.registry import resolve_model
    from worker.null_core import DEFAULT_TOKEN_ID as NULL_TOKEN_ID
    from worker.tokenizer import Tokenizer

    model_dir = resolve_model(args.model)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    # The HTTP client counts a chunk's tokens as its text's characters (see _SSETimer).
    text = Tokenizer.load(model_dir).decode([NULL_TOKEN_ID] * 3)
    if len(text) != 3 or json.dumps(text) != f'"{text}"':
        raise SystemExit(f"bus mode needs a tokenizer that decodes token {NULL_TOKEN_ID} to one "
                         f"plain character each; {args.model!r} gives {text!r} for three")
    n, c, out_len = sizes["num_prompts"], sizes["concurrency"], sizes["output_len"]
    prompts, _ = make_workload(n, sizes["input_len"], out_len, 0.0, vocab, args.seed)
    warm, _ = make_workload(min(n, 16), sizes["input_len"], min(out_len, 16), 0.0, vocab,
                            args.seed + 1_000_003)
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        print("PROFILING: the worker front and the gateway run under cProfile; the rates below "
              "include its overhead")
    print(f"bus: {n} requests, {sizes['input_len']} in / {out_len} out, {min(c, n)} at once, "
          f"null engine steps of {', '.join(f'{x:g}' for x in args.null_step_ms)} ms")
    runs: list[dict[str, Any]] = []
    problems: list[str] = []
    profiles: dict[str, str] = {}
    started: dict[str, int] = {}
    with running_service(args.redis_aof, args.startup_timeout, service_env(args)) as svc:
        gw_prof = profile_dir / "gateway.prof" if profile_dir else None
        svc.start_gateway(total_jobs=2 * (n + len(warm)) * len(args.null_step_ms),
                          profile=gw_prof)
        for step_ms in args.null_step_ms:
            name = f"null-worker-{step_ms:g}ms"
            wk_prof = profile_dir / f"worker-front-{step_ms:g}ms.prof" if profile_dir else None
            argv = ["-m", "loadtest.null_worker", "--null-step-s", str(step_ms / 1e3)]
            if wk_prof is not None:
                argv += ["--profile", str(wk_prof)]
            svc.spawn(name, argv, svc.env(model=str(model_dir), served_model_name=NULL_MODEL,
                                          max_num_seqs=args.null_max_num_seqs))
            svc.wait_ready(NULL_MODEL, name)
            asyncio.run(run_redis_direct(svc.redis.local_url, NULL_MODEL, warm, min(out_len, 16), c))
            asyncio.run(run_http(svc.base_url, NULL_MODEL, warm, min(out_len, 16), c,
                                 parse=False, max_opening=args.max_opening))
            pids = svc.pids(name)
            started.update({f"{k}, {step_ms:g} ms": v for k, v in pids.items()
                            if v is not None and k in (FRONT, "engine core")})
            started.update({k: v for k, v in pids.items()
                            if v is not None and k in ("gateway", "redis")})
            offered = min(c, n) / (step_ms / 1e3) if step_ms > 0 else float("inf")
            for path in ("redis", "gateway"):
                meter = CpuMeter(pids if path == "gateway" else
                                 {k: v for k, v in pids.items() if k != "gateway"})
                meter.start()
                if path == "redis":
                    streams, _ = asyncio.run(run_redis_direct(svc.redis.local_url, NULL_MODEL, prompts,
                                                              out_len, c))
                else:
                    streams, _ = asyncio.run(run_http(svc.base_url, NULL_MODEL, prompts, out_len,
                                                      c, parse=False,
                                                      max_opening=args.max_opening))
                cpu = meter.stop()
                problems += check_streams(streams, out_len, f"{path} at {step_ms:g} ms")
                run = {"null_step_ms": step_ms, "path": path, "offered_tokens_per_s": offered,
                       **delivery_rates(streams),
                       "ttft_ms": summarize([s.ttft for s in streams if s.token_times]),
                       "itl_ms": summarize([g for s in streams for g in s.gaps]),
                       "cpu_per_wall_s": cpu}
                # Tokens per CPU second of each process: the rate it could carry with a core of
                # its own (the front's threads share one GIL, so all of them count together).
                # Robust to other load on the machine, unlike the delivered rate.
                run["tokens_per_cpu_s"] = {
                    k: run["tokens"] / (v * meter.wall) for k, v in cpu.items()
                    if v > 0.01 and k in ("gateway", FRONT, "redis", CLIENT)}
                runs.append(run)
                _print_bus_row(run, header=len(runs) == 1)
            svc.stop(name)
            if wk_prof is not None:
                profiles[f"worker front, {step_ms:g} ms"] = str(wk_prof)
        svc.stop("gateway")
        if gw_prof is not None:
            profiles["gateway"] = str(gw_prof)
    for p in problems[:10]:
        print(f"PROBLEM: {p}")
    best = {path: max((r["tokens_per_s_middle_80"] for r in runs if r["path"] == path),
                      default=0.0) for path in ("redis", "gateway")}
    per_cpu = {
        "worker front": max((r["tokens_per_cpu_s"].get(FRONT, 0.0) for r in runs), default=0.0),
        "gateway": max((r["tokens_per_cpu_s"].get("gateway", 0.0) for r in runs
                        if r["path"] == "gateway"), default=0.0)}
    print(f"\nmost tokens/s delivered (middle 80%): worker front + Redis {best['redis']:,.0f}, "
          f"through the gateway {best['gateway']:,.0f}")
    print(f"most tokens per CPU second (a process's ceiling with a core to itself): worker front "
          f"{per_cpu['worker front']:,.0f}, gateway {per_cpu['gateway']:,.0f}")
    for label, path in profiles.items():
        _print_profile(label, path, args.profile_top)
    return {"runs": runs, "best_tokens_per_s_middle_80": best,
            "best_tokens_per_cpu_s": per_cpu, "problems": problems,
            "profiles": profiles, "pids": started,
            "workload": {**sizes, "null_step_ms": args.null_step_ms,
                         "null_max_num_seqs": args.null_max_num_seqs}}


def _print_bus_row(r: dict[str, Any], header: bool) -> None:
    if header:
        print(f"\n{'step ms':>8}{'path':>9}{'offered/s':>11}{'tokens':>9}{'s':>7}{'tok/s':>9}"
              f"{'mid 80%':>9}{'ITL p50':>9}{'ITL p99':>9}{'front':>9}{'gateway':>9}"
              f"   CPU s per s")
        print(f"{'':>71}{'tok per CPU s':>18}")
    offered = "max" if r["offered_tokens_per_s"] == float("inf") else \
        f"{r['offered_tokens_per_s']:.0f}"
    cpu = ", ".join(f"{SHORT.get(k, k)} {v:.2f}" for k, v in r["cpu_per_wall_s"].items()
                    if k != FRONT)
    print(f"{r['null_step_ms']:>8g}{r['path']:>9}{offered:>11}{r['tokens']:>9}"
          f"{r['elapsed_s']:>7.2f}{r['tokens_per_s']:>9.0f}{r['tokens_per_s_middle_80']:>9.0f}"
          f"{r['itl_ms'].get('p50', 0):>9.2f}{r['itl_ms'].get('p99', 0):>9.2f}"
          f"{r['tokens_per_cpu_s'].get(FRONT, 0):>9.0f}{r['tokens_per_cpu_s'].get('gateway', 0):>9.0f}"
          f"   {cpu}")


def _print_profile(label: str, path: str, top: int) -> None:
    try:
        stats = pstats.Stats(path)
    except (OSError, TypeError, EOFError) as e:
        print(f"\n{label}: no profile at {path} ({e})")
        return
    print(f"\n--- {label}: top {top} by own time ({path}) ---")
    stats.sort_stats("tottime").print_stats(top)


# -- command line ---------------------------------------------------------------------------------


def parse_ms_list(text: str) -> list[float]:
    """'5,2,1' -> [5.0, 2.0, 1.0] milliseconds."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 5,2,1, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"milliseconds must be >= 0, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.gateway_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["latency", "bus", "all"], default="all",
                   help="latency: direct engine vs the service; bus: the null-engine throughput "
                        "ceiling; all: both (default)")
    p.add_argument("--num-prompts", type=_positive,
                   help="requests per pass (default: latency 32, bus 256)")
    p.add_argument("--input-len", type=_positive, help="prompt tokens (default 32)")
    p.add_argument("--output-len", type=_positive,
                   help="generated tokens per request (default: latency 64, bus 512)")
    p.add_argument("--concurrency", type=_positive,
                   help="requests in flight at once (default: latency 8, bus all of them)")
    p.add_argument("--model", default="tiny", help="latency mode's model; bus mode's tokenizer")
    p.add_argument("--device", default="auto", help="engine device, both sides (auto, cpu, cuda)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--max-num-seqs", type=_positive, default=64,
                   help="engine sequence cap, both sides (default 64, the worker's default)")
    p.add_argument("--max-num-batched-tokens", type=_positive, default=2048)
    p.add_argument("--kv-cache-memory-bytes", type=_positive,
                   help="engine KV budget, both sides (default: the engine's own)")
    p.add_argument("--torch-threads", type=_positive,
                   help="latency: torch threads of the engine, both sides (this process's "
                        "torch.set_num_threads and the worker's OMP_NUM_THREADS; default: "
                        "torch's own, one per core)")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="latency: the service side's HTTP client: raw (a minimal keep-alive "
                        "HTTP/1.1 client, so the figure is the service's and not a client "
                        "library's; default) or httpx")
    p.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True,
                   help="latency: one more service pass with an observer subscribed to the "
                        "gateway's reply channel, splitting TTFT and per-token latency at the "
                        "Redis PUBLISH (default: on; not part of the headline figures)")
    p.add_argument("--warmup-prompts", type=int,
                   help="latency: untimed requests per side first (default: --concurrency)")
    p.add_argument("--repeats", type=_positive, default=5,
                   help="latency: timed passes per side, alternating (default 5)")
    p.add_argument("--null-step-ms", type=parse_ms_list, default=[5.0, 2.0, 1.0], metavar="LIST",
                   help="bus: null engine step intervals to run, ms, comma-separated "
                        "(default 5,2,1; 0 = as fast as the core loop turns)")
    p.add_argument("--max-opening", type=int, default=32,
                   help="bus, gateway path: at most this many requests awaiting their response "
                        "headers at once (default 32; 0 = no limit). The gateway's Redis client "
                        "pool holds 100 connections, and ~100 requests arriving at once exhaust "
                        "it (HTTP 500, 'Too many connections' in its log)")
    p.add_argument("--null-max-num-seqs", type=_positive, default=4096,
                   help="bus: the null engine's sequence cap (default 4096)")
    p.add_argument("--profile", metavar="DIR",
                   help="bus: run the worker front and gateway under cProfile, stats to DIR")
    p.add_argument("--profile-top", type=int, default=25, help="functions shown per profile")
    p.add_argument("--busy-poll-ms", type=float, default=None,
                   help="the service's busy polling, gateway and worker (their busy_poll_ms; "
                        "default: theirs: on the gateway 20 with 8 or more CPUs; on the worker "
                        "20 with a GPU engine; else off)")
    p.add_argument("--core-busy-poll-ms", type=float, default=None,
                   help="the worker's engine core alone (its core_busy_poll_ms; default: as "
                        "the worker's busy polling)")
    p.add_argument("--redis-aof", action=argparse.BooleanOptionalAction, default=True,
                   help="Redis append-only file on, as `sluice up` runs it (default: on)")
    p.add_argument("--startup-timeout", type=float, default=180.0,
                   help="seconds to wait for the service to come up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default="results/gateway_overhead.json")
    return p


def resolve_sizes(args: argparse.Namespace, defaults: dict[str, int]) -> dict[str, int]:
    return {k: getattr(args, k) if getattr(args, k) is not None else v
            for k, v in defaults.items()}


def _stack_versions() -> dict[str, str]:
    from loadtest.offline import _versions

    out = _versions()
    for module in ("redis", "httpx", "fastapi", "uvicorn", "pydantic", "hiredis", "orjson",
                   "uvloop"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    # torch comes in with loadtest.offline: imported here, not at the top, so the processes this
    # module spawns (the trace observer) start fast.
    from loadtest.offline import _device_name, _write_json

    args = _parser().parse_args(argv)
    if args.warmup_prompts is not None and args.warmup_prompts < 0:
        raise SystemExit("--warmup-prompts must be >= 0")
    # SIGTERM unwinds like Ctrl-C, so every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report: dict[str, Any] = {
        "config": vars(args), "versions": _stack_versions(), "device": _device_name(),
        "cpu_count": os.cpu_count(), "loadavg_at_start": list(os.getloadavg()),
        "platform": platform.platform()}
    if args.mode in ("latency", "all"):
        report["latency"] = latency_mode(args, resolve_sizes(args, LATENCY_DEFAULTS))
    if args.mode in ("bus", "all"):
        print()
        report["bus"] = bus_mode(args, resolve_sizes(args, BUS_DEFAULTS))
    report["loadavg_at_end"] = list(os.getloadavg())
    report["git"] = _git_state()
    with contextlib.suppress(Exception):
        report["versions"]["redis_server"] = _redis_server_version()
    _write_json(args.output_json, report)
    return 0


def _git_state() -> dict[str, Any]:
    """The commit measured, and whether the tree had changes (others' included)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "modified_files": dirty.split()[1::2]}


def _redis_server_version() -> str:
    from shared.redis_server import find_redis_server

    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True,
                         timeout=10)
    return out.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
