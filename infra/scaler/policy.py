"""The scaling policy: observations of one model's queue and workers in, a desired worker count out.

Pure: no Redis, no clock. Time arrives in `Observation.now`, and what the policy must remember
between two decisions (recent recommendations, when the fleet went idle) travels in `Memory`,
which `decide` returns anew. That makes every rule testable by feeding observations.

The rules:
- Scale up at once, by at most `max_surge` workers per decision.
- Scale down only when every recommendation of the last `stabilization_s` seconds was lower than
  the current count (so a flapping load does not make the fleet oscillate); the loop drains the
  workers it removes.
- Keep at least one worker while there is traffic; go to zero (when `min_workers` is 0) only
  after `idle_timeout_s` with nothing queued, running or arriving.
- From zero to one on the first queued job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

# Worker states a heartbeat reports. "drained": finished its work on the scaler's request and
# waits to be removed; such workers, and draining ones, no longer count toward the fleet.
LEAVING = frozenset({"draining", "drained"})


class Reason(str, Enum):
    FROM_ZERO = "from_zero"  # jobs queued and no worker
    QUEUE = "queue"  # backlog above what the fleet holds
    KV_PRESSURE = "kv_pressure"  # ready workers' KV cache nearly full
    MIN_WORKERS = "min_workers"  # below the lower bound
    MAX_WORKERS = "max_workers"  # above the upper bound
    STEADY = "steady"  # the fleet fits the load
    STABILIZING = "stabilizing"  # lower load, but not for a whole stabilization window yet
    SCALE_DOWN = "scale_down"  # lower load for a whole stabilization window
    IDLE_TIMEOUT = "idle_timeout"  # nothing to do for idle_timeout_s: to min_workers (maybe 0)


@dataclass(frozen=True)
class WorkerView:
    """One worker's latest heartbeat."""

    worker_id: str
    state: str  # starting | ready | draining | drained
    kv_usage: float = 0.0  # 0-1
    running: int = 0
    waiting: int = 0
    active: int = 0  # requests the worker holds, counted by its front (ahead of engine stats)

    @property
    def load(self) -> int:
        return max(self.active, self.running + self.waiting)


@dataclass(frozen=True)
class Observation:
    now: float  # seconds on any clock that does not jump; only differences matter
    replicas: int  # workers the backend runs: starting (no heartbeat yet), ready and leaving
    queue_depth: int = 0  # entries on the model's stream: queued and in flight
    lag: int = 0  # entries no worker has taken yet
    pending: int = 0  # entries taken and not yet acknowledged
    arrival_rate: float = 0.0  # jobs per second, recently
    workers: tuple[WorkerView, ...] = ()

    @property
    def num_leaving(self) -> int:
        return sum(w.state in LEAVING for w in self.workers)

    @property
    def num_active(self) -> int:
        """Workers that count: started or ready, not draining."""
        return max(0, self.replicas - self.num_leaving)

    @property
    def num_ready(self) -> int:
        return sum(w.state == "ready" for w in self.workers)

    @property
    def backlog(self) -> int:
        """Jobs the fleet has to serve: not taken yet plus taken and unfinished."""
        return max(self.queue_depth, self.lag + self.pending)

    @property
    def busy(self) -> bool:
        return (self.backlog > 0 or self.arrival_rate > 0
                or any(w.load for w in self.workers if w.state not in LEAVING))


@dataclass(frozen=True)
class PolicyConfig:
    min_workers: int = 0
    max_workers: int = 4
    max_surge: int = 4
    target_per_worker: int = 16  # jobs (queued or running) one worker is sized to hold
    kv_high: float = 0.85
    stabilization_s: float = 60.0
    idle_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ValueError(f"need 0 <= min_workers <= max_workers and max_workers >= 1 "
                             f"(got {self.min_workers}, {self.max_workers})")
        if self.max_surge < 1 or self.target_per_worker < 1:
            raise ValueError("max_surge and target_per_worker must be at least 1")


@dataclass(frozen=True)
class Memory:
    """What the policy carries from one decision to the next."""

    since: float | None = None  # time of the first observation
    idle_since: float | None = None  # start of the current idle stretch; None while busy
    # (time, recommendation) over the last stabilization window, oldest first.
    recent: tuple[tuple[float, int], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Decision:
    desired: int  # active workers wanted, within [min_workers, max_workers]
    current: int  # active workers now (Observation.num_active)
    reason: Reason
    detail: str  # one sentence for the decision log

    @property
    def delta(self) -> int:
        return self.desired - self.current


def recommend(config: PolicyConfig, obs: Observation) -> tuple[int, Reason]:
    """What the load alone asks for, before bounds, surge limits and stabilization."""
    by_queue = math.ceil(obs.backlog / config.target_per_worker)
    ready = [w for w in obs.workers if w.state == "ready"]
    kv_full = bool(ready) and sum(w.kv_usage for w in ready) / len(ready) >= config.kv_high
    # One more than the ready workers, not the active ones: a worker still starting is the
    # answer to the pressure already, and must not call for another one every step.
    if kv_full and obs.lag > 0 and obs.num_ready + 1 > by_queue:
        return obs.num_ready + 1, Reason.KV_PRESSURE
    if obs.num_active == 0 and by_queue > 0:
        return by_queue, Reason.FROM_ZERO
    return by_queue, Reason.QUEUE


def decide(config: PolicyConfig, memory: Memory, obs: Observation) -> tuple[Decision, Memory]:
    now, current = obs.now, obs.num_active
    since = memory.since if memory.since is not None else now
    idle_since = None if obs.busy else (memory.idle_since if memory.idle_since is not None
                                        else now)
    idle_for = 0.0 if idle_since is None else now - idle_since
    raw, reason = recommend(config, obs)
    if current > 0 and idle_for < config.idle_timeout_s:
        raw = max(raw, 1)  # stay warm through short pauses
    recent = tuple((t, r) for t, r in memory.recent if t > now - config.stabilization_s)
    recent += ((now, raw),)
    new_memory = Memory(since=since, idle_since=idle_since, recent=recent)

    def out(desired: int, why: Reason, detail: str) -> tuple[Decision, Memory]:
        return Decision(desired, current, why, detail), new_memory

    lo, hi = config.min_workers, config.max_workers
    load = f"backlog {obs.backlog} (lag {obs.lag}), {obs.num_ready} ready of {current}"
    if current < lo:
        return out(lo, Reason.MIN_WORKERS, f"{current} workers, below the minimum {lo}")
    if current > hi:
        return out(hi, Reason.MAX_WORKERS, f"{current} workers, above the maximum {hi}")
    if raw > current:
        desired = min(raw, current + config.max_surge, hi)
        if desired == current:  # already at the maximum
            return out(current, Reason.MAX_WORKERS, f"{load}: wants {raw}, capped at {hi}")
        return out(desired, reason, f"{load}: wants {raw}, starting {desired - current}")
    if idle_for >= config.idle_timeout_s and current > lo:
        return out(lo, Reason.IDLE_TIMEOUT,
                   f"idle for {idle_for:.0f} s (timeout {config.idle_timeout_s:g} s)")
    if max(raw, lo) < current:
        window_full = now - since >= config.stabilization_s
        stabilized = max(max(r for _, r in recent), lo)
        if window_full and stabilized < current:
            return out(stabilized, Reason.SCALE_DOWN,
                       f"{load}: at most {stabilized} wanted for {config.stabilization_s:g} s")
        return out(current, Reason.STABILIZING, f"{load}: wants {raw}, waiting out the "
                                                f"{config.stabilization_s:g} s window")
    return out(current, Reason.STEADY, load)

