"""Worker-side Prometheus metrics: engine state and per-request timings, with serving names.

Gauges come from the engine core's stats after every step; latencies from the times the front
admits a request, sees its tokens and ends it. Queue time starts when the gateway created the
job, so it includes the wait in Redis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from worker.engine.engine import EngineStats

_SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclass
class _Timing:
    created: float  # epoch seconds, from the job
    admitted: float  # perf_counter
    first_token: float | None = None
    last_token: float | None = None


class WorkerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model = model_name
        r = self.registry = CollectorRegistry()
        label = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sluice:{name}", doc, label, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"sluice:{name}", doc, [*label, *extra], registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...] = _SECONDS) -> Histogram:
            return Histogram(f"sluice:{name}", doc, label, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Requests in the engine's running set")
        self.waiting = gauge("num_requests_waiting", "Requests waiting in the engine")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.preemptions = counter("num_preemptions", "Requests preempted for recompute")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.success = counter("request_success", "Finished requests", ("finished_reason",))
        self.ttft = hist("time_to_first_token_seconds", "Admission to first token")
        self.itl = hist("inter_token_latency_seconds", "Between a request's tokens")
        self.e2e = hist("e2e_request_latency_seconds", "Job created to request finished")
        self.queue = hist("request_queue_time_seconds", "Job created to admitted by a worker")
        self.prefill = hist("request_prefill_time_seconds", "Admitted to first token")
        self.decode = hist("request_decode_time_seconds", "First token to last token")
        self.inference = hist("request_inference_time_seconds", "Admitted to finished")
        self.tpot = hist("request_time_per_output_token_seconds", "Decode time per token")
        self.req_prompt = hist("request_prompt_tokens", "Prompt tokens per request", _TOKENS)
        self.req_generation = hist("request_generation_tokens", "Tokens per request", _TOKENS)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens out per engine step",
                                     _TOKENS)
        self._last = EngineStats(0, 0, 0, 1, 0.0, 0, 0, 0)
        self._timings: dict[str, _Timing] = {}
        # Per-token paths use children bound once: .labels() on every token showed in profiles.
        self._ttft, self._prefill = self.ttft.labels(model_name), self.prefill.labels(model_name)
        self._itl = self.itl.labels(model_name)
        self._running, self._waiting = self.running.labels(model_name), self.waiting.labels(model_name)
        self._kv_usage = self.kv_usage.labels(model_name)
        self._preemptions = self.preemptions.labels(model_name)
        self._queries, self._hits = (self.prefix_queries.labels(model_name),
                                     self.prefix_hits.labels(model_name))
        self._per_step = self.iteration_tokens.labels(model_name)
        self._generated = self.generation_tokens.labels(model_name)
        self._queue, self._req_prompt = (self.queue.labels(model_name),
                                         self.req_prompt.labels(model_name))
        self._prompt_tokens = self.prompt_tokens.labels(model_name)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def step(self, stats: EngineStats, new_tokens: int) -> None:
        last = self._last
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._kv_usage.set(stats.kv_cache_usage)
        self._preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self._queries.inc(max(0, stats.prefix_cache_queries - last.prefix_cache_queries))
        self._hits.inc(max(0, stats.prefix_cache_hits - last.prefix_cache_hits))
        if new_tokens:
            self._per_step.observe(new_tokens)
            self._generated.inc(new_tokens)
        self._last = stats

    def admitted(self, req_id: str, created_epoch: float, num_prompt_tokens: int) -> None:
        now = time.perf_counter()
        self._timings[req_id] = _Timing(created_epoch, now)
        self._queue.observe(max(0.0, time.time() - created_epoch))
        self._prompt_tokens.inc(num_prompt_tokens)
        self._req_prompt.observe(num_prompt_tokens)

    def tokens(self, req_id: str, num_tokens: int, now: float | None = None) -> None:
        """`num_tokens` more of the request's tokens, out at `now` (perf_counter; default: now)."""
        t = self._timings.get(req_id)
        if t is None or not num_tokens:
            return
        now = time.perf_counter() if now is None else now
        if t.first_token is None:
            t.first_token = now
            self._ttft.observe(now - t.admitted)
            self._prefill.observe(now - t.admitted)
        elif t.last_token is not None:
            self._itl.observe(now - t.last_token)
        t.last_token = now

    def finished(self, req_id: str, reason: str, num_generated: int) -> None:
        t = self._timings.pop(req_id, None)
        m = self.model
        self.success.labels(m, reason).inc()
        self.req_generation.labels(m).observe(num_generated)
        if t is None:
            return
        now = time.perf_counter()
        self.e2e.labels(m).observe(max(0.0, time.time() - t.created))
        self.inference.labels(m).observe(now - t.admitted)
        if t.first_token is not None and t.last_token is not None:
            decode = t.last_token - t.first_token
            self.decode.labels(m).observe(decode)
            if num_generated > 1:
                self.tpot.labels(m).observe(decode / (num_generated - 1))
