"""The control loop: observe -> decide -> act, once per interval, for one model.

Acting on a scale-down never kills a worker that holds requests: the loop publishes "drain" on
the chosen workers' control channels, waits until each reports "drained" (or its heartbeat is
gone, or `drain_timeout_s` passed), and only then asks the backend to remove exactly those. The
loop also writes the model's entry in the registry the gateway reads (`names.MODELS`), so a model
at zero workers stays listed, as "cold" or "warming".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import redis

from infra.scaler.backend import Backend
from infra.scaler.metrics import ScalerMetrics
from infra.scaler.observe import Observer, Snapshot
from infra.scaler.policy import LEAVING, Decision, Memory, PolicyConfig, decide
from shared import names

log = logging.getLogger("sluice.scaler")

DRAIN_MESSAGE = json.dumps({"action": "drain"})


@dataclass
class ColdStart:
    """One start from no ready worker, in epoch seconds."""

    queued_at: float  # the oldest job waiting when no worker was ready
    ready_at: float | None = None
    first_token_at: float | None = None


class ScalerLoop:
    def __init__(self, client: redis.Redis, model: str, backend: Backend, config: PolicyConfig,
                 *, interval_s: float = 1.0, drain_timeout_s: float = 300.0,
                 metrics: ScalerMetrics | None = None,
                 on_step: Callable[[Snapshot, Decision], None] | None = None) -> None:
        self.client = client
        self.model = model
        self.backend = backend
        self.config = config
        self.interval_s = interval_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = metrics or ScalerMetrics(model)
        self.on_step = on_step
        self.observer = Observer(client, model)
        self.memory = Memory()
        self.draining: dict[str, float] = {}  # worker id -> when the drain was asked (monotonic)
        self.cold_starts: deque[ColdStart] = deque(maxlen=100)  # the latest, for reports
        self._cold: ColdStart | None = None
        self._last: Decision | None = None

    def step(self) -> Decision:
        snap = self._mark_draining(self.observer.observe(self.backend.replicas()))
        decision, self.memory = decide(self.config, self.memory, snap.obs)
        self._log(decision)
        self.metrics.record(snap.obs, decision)
        self._track_cold_start(snap)
        if decision.delta > 0:
            self.backend.scale_up(decision.delta)
        elif decision.delta < 0:
            self._drain(snap, -decision.delta)
        self._remove_drained(snap)
        self._publish(snap, decision)
        if self.on_step is not None:
            self.on_step(snap, decision)
        return decision

    def run(self, stop: threading.Event) -> None:
        """Steps every interval until `stop` is set. A failing step is logged and retried: the
        scaler must outlive a Redis restart or a backend hiccup."""
        log.info("scaling %s with the %s backend: %d to %d workers, idle timeout %g s, "
                 "stabilization %g s", self.model, self.backend.name, self.config.min_workers,
                 self.config.max_workers, self.config.idle_timeout_s, self.config.stabilization_s)
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.step()
            except (redis.RedisError, OSError, RuntimeError) as e:
                log.warning("scaler step failed: %s", e)
            stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def close(self) -> None:
        """Forgets the model in the registry; the backend stops its workers itself."""
        try:
            self.client.hdel(names.MODELS, self.model)
        except redis.RedisError as e:
            log.warning("could not clear the model registry entry: %s", e)

    def _log(self, decision: Decision) -> None:
        last = self._last
        self._last = decision
        if decision.delta != 0:
            log.info("%s: %d -> %d workers (%s): %s", self.model, decision.current,
                     decision.desired, decision.reason.value, decision.detail)
        elif last is None or last.reason is not decision.reason:
            log.info("%s: hold %d workers (%s): %s", self.model, decision.current,
                     decision.reason.value, decision.detail)

    def _mark_draining(self, snap: Snapshot) -> Snapshot:
        """Workers asked to drain count as leaving at once, before their heartbeat says so, so
        the next decision does not drain more workers for the same scale-down."""
        workers = tuple(replace(w, state="draining")
                        if w.worker_id in self.draining and w.state not in LEAVING else w
                        for w in snap.obs.workers)
        return replace(snap, obs=replace(snap.obs, workers=workers))

    def _drain(self, snap: Snapshot, count: int) -> None:
        # The least busy ready workers go first: they finish soonest.
        candidates = sorted((w for w in snap.obs.workers
                             if w.state == "ready" and w.worker_id not in self.draining),
                            key=lambda w: (w.load, w.kv_usage))
        for w in candidates[:count]:
            self.client.publish(names.worker_control(w.worker_id), DRAIN_MESSAGE)
            self.draining[w.worker_id] = snap.obs.now
            log.info("draining worker %s (%d requests in flight)", w.worker_id, w.load)

    def _remove_drained(self, snap: Snapshot) -> None:
        states = {w.worker_id: w.state for w in snap.obs.workers}
        # Drained workers nobody waits for were drained by an earlier scaler that stopped
        # before removing them: they serve nothing, so they go too.
        done = [w for w, state in states.items() if state == "drained" and w not in self.draining]
        for worker_id, asked in self.draining.items():
            state = states.get(worker_id)
            if state == "drained" or state is None:
                done.append(worker_id)
            elif snap.obs.now - asked > self.drain_timeout_s:
                log.warning("worker %s still %s after %g s; removing it anyway (its unfinished "
                            "jobs stay pending and another worker claims them)", worker_id, state,
                            self.drain_timeout_s)
                done.append(worker_id)
        if done:
            self.backend.remove(done)
            for worker_id in done:
                del self.draining[worker_id]
            log.info("removed drained workers %s", ", ".join(done))

    def _track_cold_start(self, snap: Snapshot) -> None:
        obs, wall = snap.obs, time.time()
        if self._cold is None:
            if obs.num_ready == 0 and obs.backlog > 0:
                self._cold = ColdStart(queued_at=snap.oldest_job_at or wall)
            return
        cold = self._cold
        if cold.ready_at is None and obs.num_ready > 0:
            cold.ready_at = wall
            self.metrics.cold_start_phase("ready", wall - cold.queued_at)
        taken = obs.pending > 0 or any(w.load for w in obs.workers)
        if cold.ready_at is not None and (taken or obs.backlog == 0):
            cold.first_token_at = wall
            self.metrics.cold_start_phase("first_token", wall - cold.queued_at)
            log.info("cold start: job queued -> worker ready %.1f s -> first token %.1f s",
                     cold.ready_at - cold.queued_at, wall - cold.queued_at)
            self.cold_starts.append(cold)
            self._cold = None
        elif obs.backlog == 0 and obs.num_ready == 0 and obs.replicas == 0:
            self._cold = None  # the job went away (cancelled) before any worker came

    def _publish(self, snap: Snapshot, decision: Decision) -> None:
        obs = snap.obs
        state = "ready" if obs.num_ready else "warming" if decision.desired > 0 else "cold"
        entry = {"state": state, "desired": decision.desired, "current": decision.current,
                 "ready": obs.num_ready, "queue_depth": obs.backlog,
                 "reason": decision.reason.value, "backend": self.backend.name,
                 "min_workers": self.config.min_workers, "max_workers": self.config.max_workers,
                 "updated": time.time()}
        self.client.hset(names.MODELS, self.model, json.dumps(entry))
