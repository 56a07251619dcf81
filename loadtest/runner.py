"""One benchmark run: requests sent on an arrival schedule, under an optional concurrency cap.

Streaming mode times every request chunk by chunk (`loadtest.client`). Jobs mode submits each
request as a background job (`POST /v1/jobs`), polls it until it ends, and times the turnaround;
it also reports the queue time: `started_at - created_at` where the job view gives both (Sluice
does), else submit to the first poll that shows the job no longer queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

import httpx

from loadtest.client import ApiConfig, RequestOutput, send_request
from loadtest.datasets import SampleRequest

T = TypeVar("T")
JOB_DONE = {"completed", "failed", "cancelled"}
# Statuses a server may use for a job that has not started: without the view's timestamps, its
# queue time ends at the first poll that shows anything else ("queued_or_running", which older
# Sluice versions report until the job ends, ends nothing).
JOB_QUEUED = {"queued", "pending", "validating"}
JOB_UNSTARTED = JOB_QUEUED | {"queued_or_running"}


def server_queue_time_s(view: dict[str, Any]) -> float | None:
    """`started_at - created_at` of a job view that gives both (Unix seconds), else None. Not
    clamped at zero: a negative figure tells of clocks that disagree, and the report shows it."""
    created, started = view.get("created_at"), view.get("started_at")
    if not (_is_time(created) and _is_time(started)):
        return None
    return float(started) - float(created)


def _is_time(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, disable: bool) -> Any:
    if disable:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True)


def http_client(timeout_s: float, max_concurrency: int | None) -> httpx.AsyncClient:
    # No pool limit by default: a cap here would be a hidden concurrency limit.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
                             limits=limits)


async def _on_schedule(offsets: list[float], max_concurrency: int | None, bar: Any,
                       make: Callable[[int, float], Awaitable[T]]) -> tuple[list[T], float]:
    """Starts make(i, run_start) at each offset (holding a slot when capped); returns the
    results in order and the time from the first send to the last result."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    run_start = time.perf_counter()

    async def one(i: int) -> T:
        async with slots if slots is not None else contextlib.nullcontext():
            result = await make(i, run_start)
        bar.update(1)
        return result

    tasks = []
    for i, offset in enumerate(offsets):
        delay = run_start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    results = await asyncio.gather(*tasks)
    first_send = run_start + (offsets[0] if offsets else 0.0)
    return list(results), time.perf_counter() - first_send


async def run_streaming(samples: list[SampleRequest], api: ApiConfig, offsets: list[float],
                        max_concurrency: int | None = None, timeout_s: float = 600.0,
                        disable_progress: bool = False, desc: str = "requests"
                        ) -> tuple[list[RequestOutput], float]:
    """Streams every sample at its offset; returns each request's output and the duration."""
    bar = progress_bar(len(samples), desc, disable_progress)
    try:
        async with http_client(timeout_s, max_concurrency) as client:
            return await _on_schedule(
                offsets, max_concurrency, bar,
                lambda i, run_start: send_request(client, api, samples[i], run_start))
    finally:
        bar.close()


@dataclass
class JobOutput:
    """One background job: times in seconds, `start_s` from the start of the run."""

    prompt_len: int
    expected_output_len: int
    start_s: float = 0.0
    job_id: str = ""
    status: str = ""
    submit_s: float = 0.0  # POST /v1/jobs round trip
    turnaround_s: float = 0.0  # submit to the first poll that saw it end
    # started_at - created_at from the job view ("server"), else submit to the first poll that
    # saw it started ("polls": up to one poll interval late)
    queue_time_s: float | None = None
    queue_time_source: str = ""
    output_tokens: int = 0
    num_polls: int = 0
    success: bool = False
    error: str = ""
    error_detail: str = ""


async def run_job(client: httpx.AsyncClient, api: ApiConfig, sample: SampleRequest,
                  run_start: float, poll_interval_s: float) -> JobOutput:
    out = JobOutput(sample.prompt_len, sample.expected_output_len)
    base = api.base_url.rstrip("/")
    t0 = time.perf_counter()
    out.start_s = t0 - run_start
    try:
        r = await client.post(f"{base}/v1/jobs", headers=api.headers(),
                              json={"endpoint": api.endpoint, "body": api.body(sample, False)})
        out.submit_s = time.perf_counter() - t0
        if r.status_code not in (200, 201, 202):
            out.error, out.error_detail = f"http_{r.status_code}", r.text[:500]
            return out
        view = r.json()
        out.job_id, out.status = view["id"], view.get("status", "")
        polled_queue_s: float | None = None
        while out.status not in JOB_DONE:
            await asyncio.sleep(poll_interval_s)
            r = await client.get(f"{base}/v1/jobs/{out.job_id}", headers=api.headers())
            out.num_polls += 1
            if r.status_code != 200:
                out.error, out.error_detail = f"poll_http_{r.status_code}", r.text[:500]
                return out
            view = r.json()
            out.status = view.get("status", "")
            if polled_queue_s is None and out.status not in JOB_UNSTARTED:
                polled_queue_s = time.perf_counter() - t0
        out.turnaround_s = time.perf_counter() - t0
        # The last view is the one that knows most: a finished job still tells its start.
        out.queue_time_s = server_queue_time_s(view)
        if out.queue_time_s is not None:
            out.queue_time_source = "server"
        elif polled_queue_s is not None:
            out.queue_time_s, out.queue_time_source = polled_queue_s, "polls"
        if out.status != "completed":
            err = view.get("error") or {}
            out.error = f"job_{out.status}_{err.get('type', 'unknown')}"
            out.error_detail = str(err.get("message", ""))[:500]
            return out
        usage = (view.get("result") or {}).get("usage") or {}
        out.output_tokens = int(usage.get("completion_tokens") or 0)
        out.success = True
    except httpx.TimeoutException as exc:
        out.error, out.error_detail = "timeout", f"{type(exc).__name__}: {exc}"
    except httpx.HTTPError as exc:
        out.error, out.error_detail = "connection", f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError, TypeError) as exc:  # a reply that is not a job view
        out.error, out.error_detail = "bad_reply", f"{type(exc).__name__}: {exc}"
    return out


async def run_jobs(samples: list[SampleRequest], api: ApiConfig, offsets: list[float],
                   poll_interval_s: float = 0.5, max_concurrency: int | None = None,
                   timeout_s: float = 600.0, disable_progress: bool = False
                   ) -> tuple[list[JobOutput], float]:
    """Submits every sample as a job at its offset and polls each until it ends."""
    bar = progress_bar(len(samples), "jobs", disable_progress)
    try:
        async with http_client(timeout_s, None) as client:
            return await _on_schedule(
                offsets, max_concurrency, bar,
                lambda i, run_start: run_job(client, api, samples[i], run_start, poll_interval_s))
    finally:
        bar.close()
