"""Prometheus metrics seen from the gateway, named as the serving ecosystem names them.

Names carry the `sluice:` prefix and a `model_name` label, so dashboards built for the usual
serving metrics port by a prefix swap.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from shared.messages import Event

REGISTRY = CollectorRegistry()
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)

HTTP_REQUESTS = Counter("sluice:http_requests_total", "HTTP requests by route and status",
                        ["path", "method", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("sluice:http_request_duration_seconds", "HTTP handler time to headers",
                         ["path", "method"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
QUEUED = Counter("sluice:requests_queued_total", "Jobs put on a model's stream", ["model_name"],
                 registry=REGISTRY)
TTFT = Histogram("sluice:time_to_first_token_seconds", "Time to first token, gateway view",
                 ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
ITL = Histogram("sluice:inter_token_latency_seconds", "Time between streamed events",
                ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
E2E = Histogram("sluice:e2e_request_latency_seconds", "Request latency, gateway view",
                ["model_name"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
SUCCESS = Counter("sluice:request_success_total", "Finished requests by finish reason",
                  ["model_name", "finished_reason"], registry=REGISTRY)
PROMPT_TOKENS = Counter("sluice:prompt_tokens_total", "Prompt tokens of finished requests",
                        ["model_name"], registry=REGISTRY)
GENERATION_TOKENS = Counter("sluice:generation_tokens_total", "Generated tokens",
                            ["model_name"], registry=REGISTRY)

_KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/jobs", "/health",
                "/metrics")


def _path_label(path: str) -> str:
    # Bounded label values: job ids and unknown routes must not mint new series.
    for known in _KNOWN_PATHS:
        if path == known or path.startswith(known + "/"):
            return known
    return "other"


def observe_http(path: str, method: str, status: int, seconds: float) -> None:
    label = _path_label(path)
    HTTP_REQUESTS.labels(label, method, str(status)).inc()
    HTTP_LATENCY.labels(label, method).observe(seconds)


def requests_queued(model: str) -> None:
    QUEUED.labels(model).inc()


class StreamClock:
    """First-token and inter-event timing of one streamed request."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.start = time.perf_counter()
        self.last: float | None = None
        # Looked up once: a labels() call per token is a measurable share of a stream's cost.
        self._ttft = TTFT.labels(model)
        self._itl = ITL.labels(model)

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self._ttft.observe(now - self.start)
        else:
            self._itl.observe(now - self.last)
        self.last = now


def observe_finished(model: str, events: list[Event], seconds: float) -> None:
    E2E.labels(model).observe(seconds)
    GENERATION_TOKENS.labels(model).inc(sum(len(e.token_ids) for e in events))
    for e in events:
        if e.finish_reason is not None:
            SUCCESS.labels(model, e.finish_reason).inc()
        if e.usage is not None:
            PROMPT_TOKENS.labels(model).inc(e.usage.prompt_tokens)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
