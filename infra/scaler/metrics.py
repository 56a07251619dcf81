"""The scaler's Prometheus metrics (`sluice:scaler_*`, label model_name).

- `sluice:scaler_desired_workers`, `sluice:scaler_current_workers` (started or ready, not
  draining), `sluice:scaler_ready_workers`, `sluice:scaler_queue_depth` (gauges);
- `sluice:scaler_decisions_total{reason}` (counter, one per decision that changed the count);
- `sluice:scaler_cold_start_seconds{phase}` (histogram): from the first job queued while no worker
  was ready to the first ready worker (phase "ready") and to the first job a worker took (phase
  "first_token": a worker starts a job's first engine step as it takes it). The scaler sees these
  moments at its polling interval, so each is late by at most one interval.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from infra.scaler.policy import Decision, Observation

_COLD_START_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
                       120.0, 180.0, 300.0, 600.0)


class ScalerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model = model_name
        r = self.registry = CollectorRegistry()
        label = ["model_name"]
        self.desired = Gauge("sluice:scaler_desired_workers", "Workers the policy wants", label,
                             registry=r)
        self.current = Gauge("sluice:scaler_current_workers",
                             "Workers started or ready, not draining", label, registry=r)
        self.ready = Gauge("sluice:scaler_ready_workers", "Workers ready to serve", label,
                           registry=r)
        self.queue_depth = Gauge("sluice:scaler_queue_depth", "Unfinished jobs on the stream",
                                 label, registry=r)
        self.decisions = Counter("sluice:scaler_decisions", "Scaling decisions by reason",
                                 [*label, "reason"], registry=r)
        self.cold_start = Histogram("sluice:scaler_cold_start_seconds",
                                    "First job queued with no ready worker to ready / first token",
                                    [*label, "phase"], buckets=_COLD_START_BUCKETS, registry=r)

    def record(self, obs: Observation, decision: Decision) -> None:
        m = self.model
        self.desired.labels(m).set(decision.desired)
        self.current.labels(m).set(decision.current)
        self.ready.labels(m).set(obs.num_ready)
        self.queue_depth.labels(m).set(obs.backlog)
        if decision.delta != 0:
            self.decisions.labels(m, decision.reason.value).inc()

    def cold_start_phase(self, phase: str, seconds: float) -> None:
        self.cold_start.labels(self.model, phase).observe(seconds)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
