"""Serving metrics against timelines worked out by hand, through the client's SSE handling."""

from __future__ import annotations

import json

import pytest

from loadtest.client import (
    RequestOutput,
    StreamError,
    _Timeline,
    finish,
    handle_payload,
    iter_sse_data,
)
from loadtest.metrics import (
    MetricsError,
    calculate_metrics,
    max_concurrency_seen,
    parse_goodput,
    parse_percentiles,
)


def timed(start_s: float, chunk_times_s: list[float], prompt_len: int = 10,
          usage_tokens: int | None = None) -> RequestOutput:
    """A completions stream whose chunks arrive at the given times after its start."""
    out = RequestOutput(prompt_len, 16)
    t0 = 0.0  # an exact origin, so the SLO edge case below compares exact values
    timeline = _Timeline(out, t0)
    out.start_s = start_s
    for t in chunk_times_s:
        chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": None}]}
        assert not handle_payload(json.dumps(chunk), "completions", timeline, t0 + t)
    if usage_tokens is not None:
        usage = {"choices": [], "usage": {"prompt_tokens": prompt_len,
                                          "completion_tokens": usage_tokens}}
        handle_payload(json.dumps(usage), "completions", timeline, t0 + chunk_times_s[-1] + 0.5)
    assert handle_payload("[DONE]", "completions", timeline, t0 + 99)
    finish(out, timeline.last - t0)
    return out


def failed(reason: str, prompt_len: int) -> RequestOutput:
    out = RequestOutput(prompt_len, 16, error=reason)
    finish(out, 0.0)
    return out


@pytest.fixture
def outputs() -> list[RequestOutput]:
    return [
        timed(0.0, [0.10, 0.15, 0.25, 0.30], prompt_len=10),  # TTFT 100, TPOT 200/3, gaps 50,100,50
        timed(0.5, [0.20, 0.40], prompt_len=20),  # TTFT 200, TPOT 200, gap 200
        timed(1.0, [0.05], prompt_len=30),  # one token: no TPOT, no gap
        failed("http_429", 40),
        failed("timeout", 50),
    ]


def test_per_request_timeline(outputs: list[RequestOutput]) -> None:
    a = outputs[0]
    assert a.success and a.output_tokens == 4
    assert a.ttft_s == pytest.approx(0.10)
    assert a.itl_s == pytest.approx([0.05, 0.10, 0.05])
    assert a.latency_s == pytest.approx(0.30)  # the last token chunk, not [DONE]


def test_metrics_match_hand_computed(outputs: list[RequestOutput]) -> None:
    m = calculate_metrics(outputs, duration_s=2.0, percentiles=[50, 90, 99]).as_dict()
    assert (m["completed"], m["failed"]) == (3, 2)
    assert m["failures_by_reason"] == {"http_429": 1, "timeout": 1}
    # Tokens of completed requests only: 10 + 20 + 30 in, 4 + 2 + 1 out.
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 7)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(33.5)
    # TTFT 100, 200, 50 ms; linear interpolation between order statistics.
    assert m["mean_ttft_ms"] == pytest.approx(350 / 3)
    assert m["median_ttft_ms"] == pytest.approx(100)
    assert m["p90_ttft_ms"] == pytest.approx(180)
    assert m["p99_ttft_ms"] == pytest.approx(198)
    # TPOT excludes the first token: (300 - 100) / 3 and (400 - 200) / 1; the 1-token request
    # has none.
    assert m["mean_tpot_ms"] == pytest.approx((200 / 3 + 200) / 2)
    assert m["p90_tpot_ms"] == pytest.approx(200 / 3 + 0.9 * (200 - 200 / 3))
    # ITL pools every gap: 50, 100, 50, 200.
    assert m["mean_itl_ms"] == pytest.approx(100)
    assert m["median_itl_ms"] == pytest.approx(75)
    assert m["p90_itl_ms"] == pytest.approx(170)
    assert m["mean_e2el_ms"] == pytest.approx((300 + 400 + 50) / 3)
    assert m["request_goodput"] is None  # no SLO given


def test_goodput_counts_requests_meeting_every_slo(outputs: list[RequestOutput]) -> None:
    # TTFT <= 150 and TPOT <= 100: the first (100, 66.7) and the one-token request (TPOT 0).
    m = calculate_metrics(outputs, 2.0, slos_ms={"ttft": 150, "tpot": 100})
    assert m.good_requests == 2 and m.request_goodput == pytest.approx(1.0)
    # Adding E2EL <= 100 leaves only the one-token request (50 ms).
    m = calculate_metrics(outputs, 2.0, slos_ms={"ttft": 150, "tpot": 100, "e2el": 100})
    assert m.good_requests == 1
    # An SLO at exactly a request's value still counts it (<=).
    assert calculate_metrics(outputs, 2.0, slos_ms={"ttft": 200}).good_requests == 3


def test_usage_beats_chunk_count_for_tpot() -> None:
    # A server that packs tokens: 3 chunks carried 5 tokens; TPOT = (400 - 100) / 4.
    out = timed(0.0, [0.1, 0.2, 0.4], usage_tokens=5)
    assert out.output_tokens == 5 and out.usage_reported
    m = calculate_metrics([out], 1.0).as_dict()
    assert m["mean_tpot_ms"] == pytest.approx(75)
    assert m["total_output_tokens"] == 5


def test_peak_concurrency_from_timelines(outputs: list[RequestOutput]) -> None:
    # Spans [0, 0.3], [0.5, 0.9], [1.0, 1.05] never overlap; failures take no time.
    assert max_concurrency_seen(outputs[:3]) == 1
    assert max_concurrency_seen([timed(0.0, [1.0]), timed(0.5, [1.0]), timed(0.9, [0.05])]) == 3


def test_empty_and_zero_duration_runs() -> None:
    m = calculate_metrics([failed("connection", 5)], 0.0)
    assert m.completed == 0 and m.request_throughput == 0.0
    assert m.distributions["ttft"].count == 0


def test_sse_parsing_handles_splits_comments_and_crlf() -> None:
    payloads, rest = iter_sse_data(': keep-alive\n\ndata: {"a": 1}\r\n\r\ndata: [DO')
    assert payloads == ['{"a": 1}'] and rest == "data: [DO"
    payloads, rest = iter_sse_data(rest + "NE]\n\n")
    assert payloads == ["[DONE]"] and rest == ""


def test_stream_errors_and_chat_chunks() -> None:
    out = RequestOutput(1, 1)
    timeline = _Timeline(out, 0.0)
    handle_payload(json.dumps({"choices": [{"delta": {"role": "assistant"}}]}), "chat",
                   timeline, 0.2)
    handle_payload(json.dumps({"choices": [{"delta": {"content": "hi"}}]}), "chat", timeline, 0.3)
    assert out.generated_text == "hi" and out.ttft_s == pytest.approx(0.2)
    finish(out, 0.3)
    assert out.output_tokens == 1  # no usage: the role-only chunk is timed but is no token
    with pytest.raises(StreamError) as exc:
        handle_payload(json.dumps({"error": {"type": "timeout_error", "message": "late"}}),
                       "chat", timeline, 0.4)
    assert exc.value.reason == "stream_error_timeout_error"
    with pytest.raises(StreamError, match="bad_chunk"):
        handle_payload("{not json", "chat", timeline, 0.5)
    silent = RequestOutput(1, 1)
    finish(silent, 0.0)
    assert not silent.success and silent.error == "no_tokens"


def test_option_parsing() -> None:
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_percentiles("50,90,99.9") == [50.0, 90.0, 99.9]
    for bad in (["itl:5"], ["ttft"], ["ttft:-1"]):
        with pytest.raises(MetricsError):
            parse_goodput(bad)
    with pytest.raises(MetricsError):
        parse_percentiles("0,101")
