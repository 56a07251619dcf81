"""A scripted scaler run drawn as one PNG: queue depth, workers and KV-cache usage over time.

    python -m infra.scaler.trace --out scaler.png

Runs everything here on the CPU with the tiny model: a private Redis, a gateway, and the scaler
with the local backend (0 to --max-workers workers, short windows so the run takes about two
minutes). The load, sent with the `openai` client: quiet, a burst of --burst requests, quiet,
a steady trickle of --rate requests per second for --steady seconds, then nothing until the
fleet is back at zero. Workers get a small KV cache (--kv-cache-mb), so their KV usage shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import redis

from infra.scaler.local import LocalBackend
from infra.scaler.loop import ScalerLoop
from infra.scaler.observe import Snapshot
from infra.scaler.policy import Decision, PolicyConfig
from shared.redis_server import RedisServer, free_port

log = logging.getLogger("sluice.scaler.trace")
API_KEY = "sk-trace"


@dataclass
class Point:
    t: float  # seconds since the run started
    backlog: int
    desired: int
    current: int
    ready: int
    kv_usage: float  # mean over ready workers, 0-1
    reason: str


@dataclass
class Phase:
    start: float
    end: float
    label: str


class Recorder:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.points: list[Point] = []
        self.phases: list[Phase] = []
        self.failures = 0
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def on_step(self, snap: Snapshot, d: Decision) -> None:
        with self.lock:
            self.points.append(Point(self.now(), snap.obs.backlog, d.desired, d.current,
                                     snap.obs.num_ready, snap.mean_kv_usage, d.reason.value))


async def _request(client: openai.AsyncOpenAI, i: int, max_tokens: int, rec: Recorder) -> None:
    try:
        await client.completions.create(model="tiny", prompt=f"Trace request {i}",
                                        max_tokens=max_tokens, temperature=0.8,
                                        extra_body={"ignore_eos": True})
    except openai.OpenAIError as e:
        rec.failures += 1
        log.warning("request %d failed: %s", i, e)


async def _load(args: argparse.Namespace, base_url: str, rec: Recorder) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                                timeout=600)
    async with client:
        await asyncio.sleep(args.quiet)
        start = rec.now()
        await asyncio.gather(*(_request(client, i, args.max_tokens, rec)
                               for i in range(args.burst)))
        rec.phases.append(Phase(start, rec.now(), f"burst of {args.burst}"))
        await asyncio.sleep(args.quiet)
        start, tasks = rec.now(), []
        for i in range(int(args.steady * args.rate)):
            tasks.append(asyncio.create_task(_request(client, 1000 + i, args.max_tokens, rec)))
            await asyncio.sleep(1 / args.rate)
        await asyncio.gather(*tasks)
        rec.phases.append(Phase(start, rec.now(), f"{args.rate:g} req/s"))


def draw(rec: Recorder, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = rec.points
    t = [x.t for x in p]
    fig, (ax_q, ax_w, ax_kv) = plt.subplots(3, 1, sharex=True, figsize=(11, 8),
                                            gridspec_kw={"height_ratios": [1, 1.2, 0.8]})
    ax_q.plot(t, [x.backlog for x in p], color="tab:blue", drawstyle="steps-post")
    ax_q.set_ylabel("queue depth\n(jobs queued or running)")
    ax_w.plot(t, [x.desired for x in p], label="desired", color="tab:orange", lw=2.2,
              drawstyle="steps-post")
    ax_w.plot(t, [x.current for x in p], label="started (not draining)", color="tab:gray",
              ls="--", drawstyle="steps-post")
    ax_w.plot(t, [x.ready for x in p], label="ready", color="tab:green", lw=1.6,
              drawstyle="steps-post")
    ax_w.set_ylabel("workers")
    ax_w.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_w.legend(loc="upper right")
    ax_kv.plot(t, [100 * x.kv_usage for x in p], color="tab:purple", drawstyle="steps-post")
    ax_kv.set_ylabel("KV-cache usage (%)\nmean of ready workers")
    ax_kv.set_ylim(0, 105)
    ax_kv.set_xlabel("time since start (s)")
    for ax in (ax_q, ax_w, ax_kv):
        ax.grid(alpha=0.3)
        for ph in rec.phases:
            ax.axvspan(ph.start, ph.end, color="tab:blue", alpha=0.07)
    for ph in rec.phases:
        ax_q.annotate(ph.label, xy=(ph.start, 1.0), xycoords=("data", "axes fraction"),
                      xytext=(3, -12), textcoords="offset points", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.scaler.trace",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("scaler.png"), help="PNG to write")
    parser.add_argument("--max-workers", type=int, default=3)
    parser.add_argument("--burst", type=int, default=40, help="requests in the burst")
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s of the trickle")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of the trickle")
    parser.add_argument("--quiet", type=float, default=6.0, help="seconds of quiet around them")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per request")
    parser.add_argument("--idle-timeout", type=float, default=8.0, help="seconds")
    parser.add_argument("--stabilization", type=float, default=4.0, help="seconds")
    parser.add_argument("--target-per-worker", type=int, default=8, help="jobs per worker")
    parser.add_argument("--kv-cache-mb", type=float, default=4.0, help="KV cache per worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):  # one access-log line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)

    config = PolicyConfig(min_workers=0, max_workers=args.max_workers, max_surge=2,
                          target_per_worker=args.target_per_worker,
                          stabilization_s=args.stabilization, idle_timeout_s=args.idle_timeout)
    rec = Recorder()
    worker_env = {"SLUICE_KV_CACHE_MEMORY_BYTES": str(int(args.kv_cache_mb * 2**20))}
    with local_stack(config, worker_env=worker_env, on_step=rec.on_step) as stack:
        rec.t0 = time.monotonic()
        stack.start()
        asyncio.run(_load(args, stack.base_url, rec))
        stack.wait_for_zero(args.idle_timeout + args.stabilization + 60)
        time.sleep(2)  # a little flat line at zero
    loop = stack.loop
    cold = loop.cold_starts
    cold_text = (f"; cold start {cold[0].ready_at - cold[0].queued_at:.1f} s to a ready worker"
                 if cold and cold[0].ready_at else "")
    draw(rec, args.out, f"Sluice scaler, local backend, tiny model on the CPU: 0 to "
                        f"{args.max_workers} workers,\nidle timeout {args.idle_timeout:g} s, "
                        f"stabilization {args.stabilization:g} s{cold_text}")
    print(f"wrote {args.out} ({len(rec.points)} decisions, {rec.failures} failed requests)")
    return 1 if rec.failures else 0


@dataclass
class Stack:
    """A private Redis, a gateway and a scaler loop (not yet running) with local workers."""

    base_url: str
    loop: ScalerLoop
    backend: LocalBackend
    stop: threading.Event
    thread: threading.Thread

    def start(self) -> None:
        self.thread.start()

    def wait_for_zero(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.backend.replicas() and not self.loop.draining:
                return True
            time.sleep(0.2)
        return False


@contextlib.contextmanager
def local_stack(config: PolicyConfig, *, worker_env: dict[str, str] | None = None,
                interval_s: float = 0.5,
                on_step: Callable[[Snapshot, Decision], None] | None = None) -> Iterator[Stack]:
    """Everything on this machine, the tiny model on the CPU; stopped in order on the way out."""
    with tempfile.TemporaryDirectory(prefix="sluice-scaler-") as tmp:
        server = RedisServer(data_dir=Path(tmp) / "redis", appendonly=False).start()
        port = free_port()
        env = {**os.environ, "SLUICE_REDIS_URL": server.local_url, "SLUICE_API_KEYS": API_KEY,
               "SLUICE_HEARTBEAT_S": "0.25", "SLUICE_HEARTBEAT_TTL_S": "2", **(worker_env or {})}
        gateway = subprocess.Popen([sys.executable, "-m", "infra.cli", "gateway", "--port",
                                    str(port)], env=env, start_new_session=True)
        client = redis.Redis.from_url(server.local_url)
        backend = LocalBackend(server.local_url, "tiny", "tiny", device="cpu", env=env,
                               log_dir=Path(tmp) / "workers")
        loop = ScalerLoop(client, "tiny", backend, config, interval_s=interval_s,
                          on_step=on_step)
        stop = threading.Event()
        stack = Stack(f"http://127.0.0.1:{port}", loop, backend, stop,
                      threading.Thread(target=loop.run, args=(stop,), daemon=True))
        try:
            _wait_http(f"{stack.base_url}/health")
            yield stack
        finally:
            stop.set()
            if stack.thread.is_alive():
                stack.thread.join(timeout=10)
            loop.close()
            backend.close()
            gateway.terminate()
            gateway.wait(timeout=30)
            client.close()
            server.stop()


def _wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
