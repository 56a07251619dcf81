"""The event loop of Sluice's own processes: `run_loop`, which prefers uvloop, and busy
polling, an event loop that keeps polling, instead of sleeping in the kernel, for a short window
after each piece of work.

A process asleep in epoll wakes late on a virtual machine or a sandboxed kernel, and a first
token crosses five such processes. On the H200 host the bare chain of the service's hops
(`loadtest/hop_floor.py`) took 0.93-0.98 ms p50 with its processes sleeping between events and
0.57-0.79 ms with them polling. Polling holds a core per process for as long as it lasts, so it
is off unless asked for (`busy_poll_ms` of the gateway and the worker): worth it where cores are
plenty, as on a GPU host; harmful on a machine with fewer cores than busy processes, where the
pollers take the CPU from the processes doing the work. So, unless told otherwise, a worker whose
engine runs on a GPU polls (its front and its engine core, for GPU_BUSY_POLL_S), and a gateway
polls for as long where it may use GATEWAY_POLL_MIN_CPUS or more CPUs (its affinity, capped by a
cgroup CPU quota): a GPU host running `sluice up`, not a small VM or a pod with a CPU limit.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

# A worker's polling window when none is set and its engine runs on a GPU: such a host has cores
# to spare, and the front and the engine core are its only busy processes.
GPU_BUSY_POLL_S = 0.02


def worker_window_s(given_s: float | None, device_type: str) -> float:
    """A worker process's polling window: the one given, else GPU_BUSY_POLL_S where its engine
    runs on a GPU and none on the CPU, where a poller takes a core from the model."""
    if given_s is not None:
        return given_s
    return GPU_BUSY_POLL_S if device_type == "cuda" else 0.0


# A gateway polls by default only where it may use this many CPUs: with the worker's front and
# engine core polling on the same host, and Redis and the model's own threads besides.
GATEWAY_POLL_MIN_CPUS = 8


def gateway_window_s(given_s: float | None, cpus: float | None = None) -> float:
    """The gateway's polling window: the one given, else GPU_BUSY_POLL_S where it may use
    GATEWAY_POLL_MIN_CPUS or more CPUs (`cpus`, default usable_cpus()), else none."""
    if given_s is not None:
        return given_s
    return GPU_BUSY_POLL_S if (usable_cpus() if cpus is None else cpus) >= GATEWAY_POLL_MIN_CPUS \
        else 0.0


def usable_cpus() -> float:
    """The CPUs this process may run on: its affinity, capped by a cgroup CPU quota (a container's
    CPU limit), which the affinity does not show."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cpus = float(os.cpu_count() or 1)
    quota = _cgroup_quota()
    return cpus if quota is None else min(cpus, quota)


def _cgroup_quota() -> float | None:
    root = Path("/sys/fs/cgroup")
    try:
        return quota_cpus((root / "cpu.max").read_text())  # cgroup v2
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: quota and period in two files
        return quota_cpus((root / "cpu" / "cpu.cfs_quota_us").read_text() + " "
                          + (root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def quota_cpus(text: str) -> float | None:
    """The CPUs a quota given as "QUOTA PERIOD" allows (cgroup v2's cpu.max, or v1's two files
    joined); None for no quota ("max", or v1's -1)."""
    quota, period = text.split()[:2]
    if quota == "max" or int(quota) < 0 or int(period) <= 0:
        return None
    return int(quota) / int(period)


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Runs `main` to its end on uvloop where it is installed (a faster event loop), else on
    asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class LoopPoller:
    """`kick()` after work; while `window_s` has not passed since the last kick, `run()` (a task
    on the loop) yields to the loop without pause, so the loop polls its sockets with a zero
    timeout and sees the next message at once. `window_s` 0: kick and run do nothing."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._until = 0.0
        self._kicked: asyncio.Event | None = None

    def kick(self) -> None:
        if self.window_s > 0:
            self._until = time.monotonic() + self.window_s
            if self._kicked is not None:
                self._kicked.set()

    async def run(self) -> None:
        if self.window_s <= 0:
            return
        self._kicked = asyncio.Event()
        while True:
            await self._kicked.wait()
            self._kicked.clear()
            while time.monotonic() < self._until:
                await asyncio.sleep(0)
