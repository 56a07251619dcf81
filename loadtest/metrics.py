"""Serving metrics from per-request timelines, defined as `vllm bench serve` defines them.

For a successful request with output length n (server-reported usage, else chunks):
  TTFT  time from sending the request to the first chunk that carries a token
  TPOT  (latency - TTFT) / (n - 1), only for n > 1: the first token is excluded
  ITL   every gap between consecutive token chunks (pooled over requests)
  E2EL  time from sending the request to its last chunk
Throughputs divide by the run's duration: completed requests, output tokens, and prompt + output
tokens of completed requests. Goodput counts only requests that meet every SLO given (TTFT,
TPOT, E2EL in ms; a request with n <= 1 has TPOT 0 there, as in vLLM). Percentiles interpolate
linearly between samples (numpy's default, as vLLM uses). Failed requests count by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.client import RequestOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


class MetricsError(ValueError):
    """Options the metrics cannot use (an unknown SLO name, a percentile outside 0..100)."""


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds), vLLM's format."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise MetricsError(f"goodput SLO {item!r}: the name must be ttft, tpot or e2el")
        try:
            slos[name] = float(value)
        except ValueError:
            raise MetricsError(f"goodput SLO {item!r}: expected NAME:MILLISECONDS") from None
        if slos[name] < 0:
            raise MetricsError(f"goodput SLO {item!r} must be >= 0 ms")
    return slos


def parse_percentiles(text: str) -> list[float]:
    """'50,90,99' -> [50.0, 90.0, 99.0]."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MetricsError(f"percentiles must be numbers separated by commas, got {text!r}"
                           ) from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise MetricsError(f"percentiles must be in (0, 100], got {text!r}")
    return values


def percentile_key(p: float) -> str:
    """99 -> 'p99', 99.9 -> 'p99.9' (vLLM's key style)."""
    return f"p{p:g}"


@dataclass
class Distribution:
    """Summary of one metric in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[str, float]
    count: int

    @classmethod
    def of(cls, values_s: list[float], percentiles: list[float]) -> Distribution:
        if not values_s:
            return cls(0.0, 0.0, 0.0, {percentile_key(p): 0.0 for p in percentiles}, 0)
        ms = np.asarray(values_s, dtype=float) * 1000.0
        return cls(float(ms.mean()), float(np.median(ms)), float(ms.std()),
                   {percentile_key(p): float(np.percentile(ms, p)) for p in percentiles},
                   len(ms))


@dataclass
class BenchmarkMetrics:
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    good_requests: int | None
    slos_ms: dict[str, float]
    max_concurrent_requests: int
    failures_by_reason: dict[str, int]
    distributions: dict[str, Distribution] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat keys as in vLLM's result JSON (mean_ttft_ms, p99_itl_ms, ...), and a few more."""
        out: dict[str, Any] = {
            "duration": self.duration_s, "completed": self.completed, "failed": self.failed,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput, "good_requests": self.good_requests,
            "goodput_slos_ms": self.slos_ms,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_concurrent_requests": self.max_concurrent_requests,
            "failures_by_reason": self.failures_by_reason,
        }
        for name, d in self.distributions.items():
            out[f"mean_{name}_ms"] = d.mean
            out[f"median_{name}_ms"] = d.median
            out[f"std_{name}_ms"] = d.std
            for key, value in d.percentiles.items():
                out[f"{key}_{name}_ms"] = value
        return out


def tpot_s(out: RequestOutput) -> float | None:
    """Time per output token after the first, or None with fewer than two tokens."""
    if out.output_tokens <= 1:
        return None
    return (out.latency_s - out.ttft_s) / (out.output_tokens - 1)


def meets_slos(out: RequestOutput, slos_ms: dict[str, float]) -> bool:
    values_ms = {"ttft": out.ttft_s * 1000, "tpot": (tpot_s(out) or 0.0) * 1000,
                 "e2el": out.latency_s * 1000}
    return all(values_ms[name] <= limit for name, limit in slos_ms.items())


def max_concurrency_seen(outputs: list[RequestOutput]) -> int:
    """The most requests in flight at once (start to last chunk), from the timelines."""
    events = sorted([(o.start_s, 1) for o in outputs]
                    + [(o.start_s + max(o.latency_s, 0.0), -1) for o in outputs],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def calculate_metrics(outputs: list[RequestOutput], duration_s: float,
                      percentiles: list[float] | None = None,
                      slos_ms: dict[str, float] | None = None) -> BenchmarkMetrics:
    percentiles = percentiles or [50.0, 90.0, 99.0]
    slos_ms = slos_ms or {}
    ok = [o for o in outputs if o.success]
    tpots = [t for t in map(tpot_s, ok) if t is not None]
    good = sum(meets_slos(o, slos_ms) for o in ok) if slos_ms else None
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    values = {"ttft": [o.ttft_s for o in ok], "tpot": tpots,
              "itl": [g for o in ok for g in o.itl_s], "e2el": [o.latency_s for o in ok]}
    return BenchmarkMetrics(
        duration_s=duration_s, completed=len(ok), failed=len(outputs) - len(ok),
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=per_s(len(ok)), output_throughput=per_s(total_out),
        total_token_throughput=per_s(total_in + total_out),
        request_goodput=None if good is None else per_s(good), good_requests=good,
        slos_ms=slos_ms, max_concurrent_requests=max_concurrency_seen(outputs),
        failures_by_reason=dict(Counter(o.error for o in outputs if not o.success)),
        distributions={name: Distribution.of(values[name], percentiles) for name in METRICS})


def calculate_job_metrics(outputs: list[Any], duration_s: float,
                          percentiles: list[float] | None = None) -> dict[str, Any]:
    """Background jobs (`runner.JobOutput`): throughputs as above, and the distributions of the
    submit round trip, the turnaround (submit to seen done, so up to one poll interval late)
    and, where the server shows it, the queue time (with how many came from the job view's
    times and how many from the polls)."""
    percentiles = percentiles or [50.0, 90.0, 99.0]
    ok = [o for o in outputs if o.success]
    total_out = sum(o.output_tokens for o in ok)
    queue = [o.queue_time_s for o in ok if o.queue_time_s is not None]
    dists = {"submit": [o.submit_s for o in outputs if o.job_id],
             "turnaround": [o.turnaround_s for o in ok], "queue_time": queue}
    out: dict[str, Any] = {
        "duration": duration_s, "completed": len(ok), "failed": len(outputs) - len(ok),
        "total_input_tokens": sum(o.prompt_len for o in ok), "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": total_out / duration_s if duration_s > 0 else 0.0,
        "queue_time_observed": bool(queue),
        "queue_time_sources": dict(Counter(o.queue_time_source for o in ok
                                           if o.queue_time_s is not None)),
        "failures_by_reason": dict(Counter(o.error for o in outputs if not o.success)),
    }
    for name, values in dists.items():
        d = Distribution.of(values, percentiles)
        out.update({f"mean_{name}_ms": d.mean, f"median_{name}_ms": d.median,
                    **{f"{k}_{name}_ms": v for k, v in d.percentiles.items()}})
    return out
