"""Busy polling holds the CPU for its window after a kick, and only then."""

from __future__ import annotations

import asyncio
import time

from shared.busy_poll import LoopPoller


async def _cpu_over(poller: LoopPoller, seconds: float, kick: bool) -> float:
    c0 = time.process_time()
    if kick:
        poller.kick()
    await asyncio.sleep(seconds)
    return time.process_time() - c0


def test_polls_for_its_window_after_a_kick_then_sleeps() -> None:
    async def main() -> tuple[float, float, float, int]:
        poller = LoopPoller(0.15)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(0.05)
        idle = await _cpu_over(poller, 0.2, kick=False)
        polling = await _cpu_over(poller, 0.3, kick=True)
        after = await _cpu_over(poller, 0.2, kick=False)
        # Timers still fire while it polls: it yields to the loop on every turn.
        fired = 0

        def tick() -> None:
            nonlocal fired
            fired += 1

        poller.kick()
        for k in range(5):
            asyncio.get_running_loop().call_later(0.01 * (k + 1), tick)
        await asyncio.sleep(0.1)
        task.cancel()
        return idle, polling, after, fired

    idle, polling, after, fired = asyncio.run(main())
    assert polling > 0.05  # about 0.15 s of CPU on an unloaded machine
    assert idle < 0.03 and after < 0.03
    assert fired == 5


def test_a_zero_window_never_polls() -> None:
    async def main() -> float:
        poller = LoopPoller(0.0)
        await poller.run()  # returns at once
        return await _cpu_over(poller, 0.2, kick=True)

    assert asyncio.run(main()) < 0.03


def test_the_engine_core_window_follows_the_worker_settings() -> None:
    from shared.settings import WorkerSettings
    from worker.service import _core_busy_poll_s

    # Unset: the core chooses by its device (polling on a GPU only).
    assert _core_busy_poll_s(WorkerSettings()) is None
    assert _core_busy_poll_s(WorkerSettings(busy_poll_ms=0)) == 0.0
    assert _core_busy_poll_s(WorkerSettings(busy_poll_ms=5)) == 0.005
    assert _core_busy_poll_s(WorkerSettings(busy_poll_ms=5, core_busy_poll_ms=0)) == 0.0
    assert _core_busy_poll_s(WorkerSettings(core_busy_poll_ms=30)) == 0.03


def test_a_cgroup_quota_reads_as_cpus() -> None:
    from shared.busy_poll import quota_cpus

    assert quota_cpus("max 100000\n") is None  # cgroup v2, no limit
    assert quota_cpus("250000 100000\n") == 2.5
    assert quota_cpus("-1\n 100000\n") is None  # cgroup v1, no limit
    assert quota_cpus("50000\n 100000\n") == 0.5


def test_the_gateway_polls_by_default_only_where_cpus_are_plenty() -> None:
    from shared.busy_poll import GATEWAY_POLL_MIN_CPUS, GPU_BUSY_POLL_S, gateway_window_s

    assert gateway_window_s(None, cpus=GATEWAY_POLL_MIN_CPUS) == GPU_BUSY_POLL_S
    assert gateway_window_s(None, cpus=GATEWAY_POLL_MIN_CPUS - 0.5) == 0.0  # e.g. a quota
    assert gateway_window_s(0.0, cpus=64) == 0.0  # told not to
    assert gateway_window_s(0.005, cpus=2) == 0.005  # told to


def test_usable_cpus_is_at_most_the_affinity() -> None:
    import os

    from shared.busy_poll import usable_cpus

    assert 0 < usable_cpus() <= len(os.sched_getaffinity(0))
