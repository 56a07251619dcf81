"""The scaling policy, fed observations: burst, steady load, idle, flapping load, bounds."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.scaler.policy import (
    Decision,
    Memory,
    Observation,
    PolicyConfig,
    Reason,
    WorkerView,
    decide,
)

CONFIG = PolicyConfig(min_workers=0, max_workers=8, max_surge=2, target_per_worker=4,
                      stabilization_s=30.0, idle_timeout_s=60.0)


def ready(n: int, kv: float = 0.2, running: int = 0) -> tuple[WorkerView, ...]:
    return tuple(WorkerView(f"w{i}", "ready", kv, running) for i in range(n))


class Fleet:
    """A simulated fleet that does what each decision says at once: the policy's closed loop."""

    def __init__(self, config: PolicyConfig = CONFIG, workers: int = 0) -> None:
        self.config, self.workers, self.memory = config, workers, Memory()
        self.decisions: list[Decision] = []

    def tick(self, now: float, backlog: int, rate: float = 0.0, kv: float = 0.2) -> Decision:
        obs = Observation(now=now, replicas=self.workers, queue_depth=backlog,
                          lag=max(0, backlog - 4 * self.workers),
                          pending=min(backlog, 4 * self.workers), arrival_rate=rate,
                          workers=ready(self.workers, kv, running=min(backlog, 4)))
        decision, self.memory = decide(self.config, self.memory, obs)
        self.decisions.append(decision)
        self.workers = decision.desired
        return decision


def test_burst_from_zero_scales_up_at_once_within_surge_and_bounds() -> None:
    fleet = Fleet()
    first = fleet.tick(0, backlog=40, rate=40)
    assert (first.current, first.desired, first.reason) == (0, 2, Reason.FROM_ZERO)
    second = fleet.tick(1, backlog=40, rate=40)
    assert (second.desired, second.reason) == (4, Reason.QUEUE)
    for t in range(2, 10):
        fleet.tick(t, backlog=40, rate=40)
    assert fleet.workers == 8  # ceil(40 / 4) = 10, capped at max_workers
    assert fleet.decisions[-1].reason is Reason.MAX_WORKERS


def test_first_queued_job_wakes_a_fleet_at_zero() -> None:
    fleet = Fleet()
    assert fleet.tick(0, backlog=0).desired == 0
    d = fleet.tick(1, backlog=1, rate=1)
    assert (d.desired, d.reason) == (1, Reason.FROM_ZERO)


def test_steady_load_holds_the_fleet() -> None:
    fleet = Fleet(workers=3)
    for t in range(120):
        fleet.tick(t, backlog=10 + (t % 3), rate=5)  # 10-12 jobs: 3 workers of 4
    assert {d.desired for d in fleet.decisions} == {3}


def test_idle_fleet_keeps_one_worker_until_the_idle_timeout_then_goes_to_zero() -> None:
    fleet = Fleet(workers=4)
    fleet.tick(0, backlog=16, rate=4)
    for t in range(1, 200):
        d = fleet.tick(t, backlog=0)
        if t < 30:  # inside the stabilization window: no scale-down yet
            assert d.desired == 4 and d.reason is Reason.STABILIZING
        if 30 < t <= 60:
            assert fleet.workers == 1  # stays warm through a pause
    reasons = [d.reason for d in fleet.decisions if d.delta]
    assert reasons == [Reason.SCALE_DOWN, Reason.IDLE_TIMEOUT]
    went_to_zero = next(i for i, d in enumerate(fleet.decisions) if d.desired == 0)
    assert went_to_zero == 61  # idle since t=1, timeout 60 s
    assert fleet.workers == 0


def test_min_workers_is_kept_when_idle() -> None:
    config = PolicyConfig(min_workers=1, max_workers=2, idle_timeout_s=5, stabilization_s=5)
    fleet = Fleet(config, workers=0)
    assert fleet.tick(0, backlog=0).desired == 1
    for t in range(1, 60):
        fleet.tick(t, backlog=0)
    assert fleet.workers == 1
    assert [d.reason for d in fleet.decisions[1:]] == [Reason.STEADY] * 59


def test_flapping_load_does_not_make_the_fleet_oscillate() -> None:
    fleet = Fleet()
    for t in range(300):  # 10 s bursts of 24 jobs, then 10 s of nothing, over and over
        fleet.tick(t, backlog=24 if (t // 10) % 2 == 0 else 0, rate=2.4)
    sizes = [d.desired for d in fleet.decisions]
    changes = sum(a != b for a, b in itertools.pairwise(sizes))
    assert changes <= 3  # the ramp up only: 0 -> 2 -> 4 -> 6
    assert sizes[-1] == 6


def test_kv_pressure_adds_a_worker_when_work_waits() -> None:
    fleet = Fleet(workers=2)
    d = fleet.tick(0, backlog=8 + 1, kv=0.95)  # queue alone asks for 3; KV adds on top of 2
    assert d.desired == 3
    obs = Observation(now=1, replicas=2, queue_depth=6, lag=1, pending=5,
                      workers=ready(2, kv=0.95))
    d, memory = decide(CONFIG, Memory(), obs)
    assert (d.desired, d.reason) == (3, Reason.KV_PRESSURE)
    # While the third worker starts (no heartbeat yet), the same pressure asks for no fourth.
    for t in range(2, 10):
        d, memory = decide(CONFIG, memory, replace(obs, now=t, replicas=3))
        assert (d.current, d.desired) == (3, 3)


def test_draining_workers_do_not_count_toward_the_fleet() -> None:
    workers = (*ready(2), WorkerView("w9", "draining"), WorkerView("w8", "drained"))
    obs = Observation(now=0, replicas=4, queue_depth=8, lag=0, pending=8, workers=workers)
    d, _ = decide(CONFIG, Memory(), obs)
    assert (d.current, d.desired) == (2, 2)


def test_out_of_bounds_fleets_are_brought_back() -> None:
    config = PolicyConfig(min_workers=2, max_workers=3)
    d, _ = decide(config, Memory(), Observation(now=0, replicas=0))
    assert (d.desired, d.reason) == (2, Reason.MIN_WORKERS)
    d, _ = decide(config, Memory(), Observation(now=0, replicas=5, workers=ready(5)))
    assert (d.desired, d.reason) == (3, Reason.MAX_WORKERS)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_workers"):
        PolicyConfig(min_workers=3, max_workers=2)


@settings(max_examples=150, deadline=None)
@given(min_w=st.integers(0, 3), extra=st.integers(0, 5), surge=st.integers(1, 4),
       window=st.floats(0, 20), idle=st.floats(1, 40),
       loads=st.lists(st.tuples(st.integers(0, 80), st.floats(0, 1)), min_size=1, max_size=80))
def test_desired_stays_in_bounds_and_scale_down_waits_out_the_window(
        min_w: int, extra: int, surge: int, window: float, idle: float,
        loads: list[tuple[int, float]]) -> None:
    config = PolicyConfig(min_workers=min_w, max_workers=max(1, min_w + extra), max_surge=surge,
                          target_per_worker=4, stabilization_s=window, idle_timeout_s=idle)
    fleet = Fleet(config)
    last_up = None
    for t, (backlog, kv) in enumerate(loads):
        d = fleet.tick(float(t), backlog=backlog, kv=kv)
        assert config.min_workers <= d.desired <= config.max_workers
        if d.current >= config.min_workers and d.delta > 0:
            assert d.delta <= config.max_surge
            last_up = t
        if d.reason in (Reason.SCALE_DOWN, Reason.IDLE_TIMEOUT):
            assert d.delta < 0
        if d.reason is Reason.SCALE_DOWN:
            assert last_up is None or t - last_up >= window
            assert t >= window
