"""Worker metrics: the engine's state per step and each request's timings, as Prometheus
reads them."""

from __future__ import annotations

import time

import pytest

from worker.engine.engine import EngineStats
from worker.metrics import WorkerMetrics


def _value(m: WorkerMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, {"model_name": "tiny", **labels})
    assert value is not None, name
    return value


def test_request_timings_use_the_times_given() -> None:
    m = WorkerMetrics("tiny")
    m.admitted("r", time.time() - 0.5, num_prompt_tokens=7)
    admitted = m._timings["r"].admitted
    # Tokens are timed when their step's results arrived, even when recorded later.
    m.tokens("r", 1, admitted + 0.010)
    m.tokens("r", 0, admitted + 0.015)  # nothing new: no interval
    m.tokens("r", 2, admitted + 0.030)
    m.finished("r", "length", num_generated=3)
    assert _value(m, "sluice:time_to_first_token_seconds_sum") == pytest.approx(0.010)
    assert _value(m, "sluice:inter_token_latency_seconds_count") == 1
    assert _value(m, "sluice:inter_token_latency_seconds_sum") == pytest.approx(0.020)
    assert _value(m, "sluice:request_decode_time_seconds_sum") == pytest.approx(0.020)
    assert _value(m, "sluice:request_time_per_output_token_seconds_sum") == pytest.approx(0.010)
    assert _value(m, "sluice:request_queue_time_seconds_sum") >= 0.5
    assert _value(m, "sluice:prompt_tokens_total") == 7
    assert _value(m, "sluice:request_success_total", finished_reason="length") == 1


def test_step_sets_the_engine_state_and_counts_only_what_is_new() -> None:
    m = WorkerMetrics("tiny")
    m.step(EngineStats(num_running=3, num_waiting=1, num_free_blocks=6, num_total_blocks=8,
                       kv_cache_usage=0.25, num_preemptions=2, prefix_cache_queries=64,
                       prefix_cache_hits=32), new_tokens=3)
    m.step(EngineStats(num_running=2, num_waiting=0, num_free_blocks=7, num_total_blocks=8,
                       kv_cache_usage=0.125, num_preemptions=2, prefix_cache_queries=96,
                       prefix_cache_hits=32), new_tokens=2)
    assert _value(m, "sluice:num_requests_running") == 2
    assert _value(m, "sluice:num_requests_waiting") == 0
    assert _value(m, "sluice:kv_cache_usage_perc") == 0.125
    assert _value(m, "sluice:num_preemptions_total") == 2
    assert _value(m, "sluice:prefix_cache_queries_total") == 96
    assert _value(m, "sluice:prefix_cache_hits_total") == 32
    assert _value(m, "sluice:generation_tokens_total") == 5
    assert _value(m, "sluice:iteration_tokens_total_count") == 2
