"""`sluice scaler`: the control loop for one model, with a backend chosen by settings.

`sluice up` embeds the same pieces (`build_loop` with a `LocalBackend`) in a thread of its own.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import redis

from infra.scaler.backend import Backend
from infra.scaler.local import LocalBackend
from infra.scaler.loop import ScalerLoop
from infra.scaler.metrics import ScalerMetrics
from infra.scaler.policy import PolicyConfig
from shared.settings import ScalerSettings

log = logging.getLogger("sluice.scaler")


class BackendUnavailableError(RuntimeError):
    """The chosen backend cannot be loaded (a module or a dependency is missing)."""


def policy_config(s: ScalerSettings) -> PolicyConfig:
    return PolicyConfig(min_workers=s.min_workers, max_workers=s.max_workers,
                        max_surge=s.max_surge, target_per_worker=s.target_per_worker,
                        kv_high=s.kv_high, stabilization_s=s.stabilization_s,
                        idle_timeout_s=s.idle_timeout_s)


def make_backend(s: ScalerSettings, log_dir: Path | None = None) -> Backend:
    served = s.served_model_name or s.model
    if s.backend == "local":
        return LocalBackend(s.redis_url, s.model, served, device=s.device,
                            worker_args=s.worker_args, log_dir=log_dir)
    try:  # imported only when asked for: the kubernetes client is an optional dependency
        from infra.scaler.kubernetes import KubernetesBackend, KubernetesBackendError
    except ImportError as e:
        raise BackendUnavailableError(
            f"the kubernetes backend cannot be loaded ({e}); install it with "
            "`pip install 'sluice[kubernetes]'`") from e
    try:
        return KubernetesBackend(s.namespace, s.deployment)
    except KubernetesBackendError as e:
        raise BackendUnavailableError(f"the kubernetes backend cannot start: {e}") from e


def build_loop(s: ScalerSettings, backend: Backend, client: redis.Redis) -> ScalerLoop:
    served = s.served_model_name or s.model
    metrics = ScalerMetrics(served)
    if s.metrics_port is not None:
        metrics.serve(s.metrics_port)
        log.info("scaler metrics on http://0.0.0.0:%d/metrics", s.metrics_port)
    return ScalerLoop(client, served, backend, policy_config(s), interval_s=s.interval_s,
                      drain_timeout_s=s.drain_timeout_s, metrics=metrics)


def run_scaler(s: ScalerSettings) -> int:
    """Runs until SIGTERM or Ctrl-C. Workers of the local backend are drained on the way out;
    a Deployment keeps its pods (the scaler's exit must not take the fleet down)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    backend = make_backend(s)
    client = redis.Redis.from_url(s.redis_url)
    loop = build_loop(s, backend, client)
    try:
        loop.run(stop)
    finally:
        loop.close()
        backend.close()
        client.close()
    return 0
