"""Jobs mode's queue time: from the job view's times where the server gives them, else from the
polls, and its distribution as the report states it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from loadtest.client import ApiConfig
from loadtest.datasets import SampleRequest
from loadtest.metrics import calculate_job_metrics
from loadtest.report import summary_text
from loadtest.runner import JobOutput, run_job, server_queue_time_s


def test_server_queue_time_is_started_minus_created() -> None:
    assert server_queue_time_s({"created_at": 100.0, "started_at": 100.25}) == 0.25
    assert server_queue_time_s({"created_at": 100, "started_at": 103}) == 3.0
    # Clocks that disagree show as a negative figure rather than a hidden zero.
    assert server_queue_time_s({"created_at": 100.0, "started_at": 99.5}) == -0.5
    for view in ({"created_at": 100.0, "started_at": None}, {"created_at": 100.0},
                 {"status": "queued_or_running"}, {"created_at": True, "started_at": 101.0},
                 {"created_at": "100", "started_at": 101.0}):
        assert server_queue_time_s(view) is None, view


def job(queue_s: float | None, source: str = "server", success: bool = True) -> JobOutput:
    return JobOutput(8, 4, job_id="j", status="completed" if success else "failed",
                     submit_s=0.01, turnaround_s=1.0, queue_time_s=queue_s,
                     queue_time_source=source if queue_s is not None else "",
                     output_tokens=4, success=success)


def test_queue_time_distribution_and_report() -> None:
    outputs = [job(0.1), job(0.2), job(0.3), job(0.4, "polls"), job(None),
               job(5.0, success=False)]  # a failed job's queue time is not counted
    run = calculate_job_metrics(outputs, 2.0, [50.0, 90.0, 99.0])
    assert run["mean_queue_time_ms"] == pytest.approx(250.0)
    assert run["median_queue_time_ms"] == pytest.approx(250.0)
    # numpy's linear interpolation over 100, 200, 300, 400 ms
    assert run["p90_queue_time_ms"] == pytest.approx(370.0)
    assert run["p99_queue_time_ms"] == pytest.approx(397.0)
    assert run["queue_time_sources"] == {"server": 3, "polls": 1}
    assert run["queue_time_observed"] and (run["completed"], run["failed"]) == (5, 1)
    text = summary_text({**run, "request_rate": float("inf")}, "jobs", ["p50", "p90", "p99"])
    assert "Mean queue (ms):" in text and "P90 queue (ms):" in text
    assert "polls 1, server 3" in text


def poll(views: list[dict[str, Any]], created: dict[str, Any]) -> JobOutput:
    """run_job against a server that answers the submission with `created`, then each poll with
    the next of `views`."""
    pending = list(views)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=created)
        return httpx.Response(200, json=pending.pop(0))

    async def main() -> JobOutput:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            api = ApiConfig(base_url="http://bench.test", model="m")
            return await run_job(client, api, SampleRequest("hi", 1, 4), 0.0, 0.0)

    out = asyncio.run(main())
    assert not pending and out.success, out
    return out


DONE = {"id": "job-1", "status": "completed", "result": {"usage": {"completion_tokens": 4}}}


def test_run_job_takes_the_views_times_and_falls_back_to_polls() -> None:
    created = {"id": "job-1", "status": "queued", "created_at": 50.0, "started_at": None}
    out = poll([{**created, "status": "running", "started_at": 50.75},
                {**DONE, "created_at": 50.0, "started_at": 50.75, "finished_at": 52.0}], created)
    assert (out.queue_time_s, out.queue_time_source) == (0.75, "server")

    # A server without the times: submit to the first poll that shows the job started.
    old = {"id": "job-1", "status": "queued"}
    out = poll([old, {**old, "status": "in_progress"}, DONE], old)
    assert out.queue_time_source == "polls" and out.num_polls == 3
    assert 0 <= out.queue_time_s <= out.turnaround_s  # type: ignore[operator]
    # "queued_or_running" tells nothing: the queue time ends when the job is seen done.
    out = poll([{**old, "status": "queued_or_running"}, DONE], old)
    assert out.queue_time_source == "polls" and out.num_polls == 2
