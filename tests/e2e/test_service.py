"""The service end to end: real Redis, a real worker process, a real gateway process, and the
official `openai` client as the reference client."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
import redis

from shared import names
from worker import LLM, SamplingParams

if TYPE_CHECKING:  # the `service` fixture comes from tests/e2e/conftest.py
    from conftest import Service


@pytest.fixture(scope="module")
def offline(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), device="cpu", kv_cache_memory_bytes=2**24)


def test_chat_matches_offline_engine(service: Service, offline: LLM) -> None:
    messages = [{"role": "user", "content": "What does the scheduler do?"}]
    reply = service.client().chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, temperature=0.0)
    expected = offline.chat(messages, SamplingParams(temperature=0.0, max_tokens=24),
                            use_tqdm=False)[0].outputs[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage is not None and reply.usage.completion_tokens == len(expected.token_ids)


def test_completion_stream_matches_non_stream(service: Service) -> None:
    client = service.client()
    whole = client.completions.create(model="tiny", prompt="Paged attention", max_tokens=20,
                                      temperature=0.0)
    chunks = list(client.completions.create(model="tiny", prompt="Paged attention",
                                            max_tokens=20, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_continuous_usage_counts_every_chunks_tokens(service: Service) -> None:
    """stream_options.continuous_usage_stats: every chunk carries the usage so far, so a client
    counts tokens even where one chunk holds several; chat and completions, n=2."""
    client = service.client()
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model="tiny", prompt="Paged attention",
                                            max_tokens=12, temperature=0.0, stream=True, n=2,
                                            stream_options=options))  # type: ignore[arg-type]
    prompt = chunks[-1].usage.prompt_tokens if chunks[-1].usage else 0
    assert prompt > 0 and not chunks[-1].choices
    for index in (0, 1):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        counts = [c.usage.completion_tokens for c in mine if c.usage is not None]
        assert len(counts) == len(mine) and counts == sorted(counts) and counts[-1] == 12
        assert all(c.usage is not None and c.usage.prompt_tokens == prompt
                   and c.usage.total_tokens == prompt + c.usage.completion_tokens for c in mine)
    chat = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0.0, stream=True, stream_options=options))  # type: ignore[arg-type]
    assert all(c.usage is not None for c in chat)
    assert chat[0].usage is not None and chat[0].usage.completion_tokens == 0  # the role chunk
    assert chat[-2].usage is not None and chat[-2].usage.completion_tokens == 6
    # A resubmission with the same Idempotency-Key streams the recorded result, usage included.
    key = {"Idempotency-Key": "continuous-usage-1"}
    first = client.completions.create(model="tiny", prompt="again", max_tokens=5,
                                      temperature=0.0, extra_headers=key)
    again = list(client.completions.create(model="tiny", prompt="again", max_tokens=5,
                                           temperature=0.0, stream=True, extra_headers=key,
                                           stream_options=options))  # type: ignore[arg-type]
    assert "".join(c.choices[0].text for c in again if c.choices) == first.choices[0].text
    assert first.usage is not None and all(c.usage is not None for c in again)
    assert again[0].usage is not None and again[0].usage.completion_tokens == 5
    assert again[0].usage.prompt_tokens == first.usage.prompt_tokens


def test_n_logprobs_and_stop(service: Service, offline: LLM) -> None:
    client = service.client()
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2,
        temperature=1.0, seed=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.logprobs is not None and len(choice.logprobs.content) == 8
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    full = client.completions.create(model="tiny", prompt="stop here", max_tokens=30,
                                     temperature=0.0).choices[0].text
    stop = full[10:13]
    cut = client.completions.create(model="tiny", prompt="stop here", max_tokens=30,
                                    temperature=0.0, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_fifty_concurrent_streams_arrive_whole_and_in_order(service: Service) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await client.completions.create(
            model="tiny", prompt=f"stream number {i}", max_tokens=24, temperature=0.0,
            stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        whole = await client.completions.create(model="tiny", prompt=f"stream number {i}",
                                                max_tokens=24, temperature=0.0)
        return text, whole.choices[0].text

    async def main() -> list[tuple[str, str]]:
        client = service.aclient()
        return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(main())
    assert all(streamed == whole for streamed, whole in results)


def test_disconnect_frees_the_worker_slot(service: Service) -> None:
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{service.base_url}/v1/completions",
            headers={"Authorization": f"Bearer {service.api_key}"},
            json={"model": "tiny", "prompt": "a long one", "max_tokens": 1500,
                  "ignore_eos": True, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # one token arrived; now hang up
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        beat = service.heartbeat()
        if beat.get("running") == 0 and beat.get("active") == 0:
            break
        time.sleep(0.05)
    freed_after = time.monotonic() - t0
    assert freed_after < 1.0 + 0.2 + 0.05, f"slot freed after {freed_after:.2f} s"


def test_async_job_and_idempotent_resubmit(service: Service) -> None:
    headers = {"Authorization": f"Bearer {service.api_key}", "Idempotency-Key": "job-key-1"}
    body = {"endpoint": "/v1/completions",
            "body": {"model": "tiny", "prompt": "a background job", "max_tokens": 12,
                     "temperature": 0.0}}
    first = httpx.post(f"{service.base_url}/v1/jobs", json=body, headers=headers)
    again = httpx.post(f"{service.base_url}/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202 and again.status_code == 202
    job_id = first.json()["id"]
    assert again.json()["id"] == job_id
    deadline = time.monotonic() + 30
    seen = set()
    while time.monotonic() < deadline:
        view = httpx.get(f"{service.base_url}/v1/jobs/{job_id}", headers=headers).json()
        seen.add(view["status"])
        if view["status"] == "completed":
            break
        time.sleep(0.1)
    assert seen <= {"queued", "running", "completed"}, seen
    # The worker marked its start: the view tells the job's queue time and its run time.
    assert view["created_at"] <= view["started_at"] <= view["finished_at"] <= time.time()
    direct = service.client().completions.create(model="tiny", prompt="a background job",
                                                 max_tokens=12, temperature=0.0)
    assert view["result"]["choices"][0]["text"] == direct.choices[0].text


def test_a_job_reads_running_once_a_worker_started_it(service: Service) -> None:
    # Long enough (64 tokens, about a second on the CPU) that polls catch it running.
    body = {"endpoint": "/v1/completions",
            "body": {"model": "tiny", "prompt": "a long job", "max_tokens": 64,
                     "ignore_eos": True}}
    job_id = httpx.post(f"{service.base_url}/v1/jobs", json=body, headers=service.auth()
                        ).json()["id"]
    views: list[dict] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not views or views[-1]["status"] != "completed"):
        views.append(httpx.get(f"{service.base_url}/v1/jobs/{job_id}", headers=service.auth()
                               ).json())
        time.sleep(0.02)
    running = [v for v in views if v["status"] == "running"]
    assert running, [v["status"] for v in views]
    assert running[0]["started_at"] is not None and running[0]["finished_at"] is None
    done = views[-1]
    assert done["status"] == "completed" and done["started_at"] == running[0]["started_at"]
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]


def test_a_cancelled_job_leaves_no_marker_behind(service: Service) -> None:
    """Cancelled while it runs, a job ends "cancelled" and its marker goes with its record; a
    DELETE after that answers the final state and marks nothing again."""
    body = {"endpoint": "/v1/completions",
            "body": {"model": "tiny", "prompt": "cancel me", "max_tokens": 1500,
                     "ignore_eos": True}}
    url = f"{service.base_url}/v1/jobs"
    job_id = httpx.post(url, json=body, headers=service.auth()).json()["id"]
    marker = names.cancelled("tiny", job_id)
    r = redis.Redis.from_url(service.redis_url)
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/{job_id}", headers=service.auth()).json()["status"] != "running":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.02)
        assert httpx.delete(f"{url}/{job_id}", headers=service.auth()).json()["status"] in (
            "cancelling", "cancelled")
        while (view := httpx.get(f"{url}/{job_id}", headers=service.auth()).json()
               )["status"] == "cancelling":
            assert time.monotonic() < deadline, "the cancel never took"
            time.sleep(0.02)
        assert view["status"] == "cancelled"
        assert not r.exists(marker)
        again = httpx.delete(f"{url}/{job_id}", headers=service.auth())
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        assert not r.exists(marker)
    finally:
        r.close()


@pytest.mark.parametrize(("body", "status", "needle"), [
    ("{not json", 400, "not valid JSON"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "colour": 1}, 400,
     "unknown field(s): colour"),
    ({"model": "tiny", "messages": "x"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400,
     "max_tokens"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "nope"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 3000}]}, 400,
     "context"),
])
def test_bad_input_gets_openai_errors(service: Service, body: object, status: int,
                                      needle: str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{service.base_url}/v1/chat/completions", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {service.api_key}",
                            "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]


def test_auth_and_body_size(service: Service) -> None:
    url = f"{service.base_url}/v1/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    models = httpx.get(url, headers={"Authorization": f"Bearer {service.api_key}"}).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    big = "x" * (5 * 1024 * 1024)
    r = httpx.post(f"{service.base_url}/v1/completions", content=big,
                   headers={"Authorization": f"Bearer {service.api_key}",
                            "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_metrics_exposed(service: Service) -> None:
    text = httpx.get(f"{service.base_url}/metrics").text
    assert "sluice:e2e_request_latency_seconds" in text
    assert "sluice:http_requests_total" in text
