"""A request whose last replies never reached the gateway (published while Redis had dropped its
subscription): after a silence the gateway finds the request's record and ends the client's wait
instead of sending keep-alives until the timeout. Real Redis, no worker: the test writes the
record a worker would."""

from __future__ import annotations

import json
import threading
import time

import redis
from fastapi.testclient import TestClient

from gateway.app import create_app
from shared import names
from shared.messages import CompletionRecord, Job, RequestRecord, Usage
from shared.settings import GatewaySettings

HEADERS = {"Authorization": "Bearer sk-lost"}
BODY = {"model": "tiny", "prompt": "x", "max_tokens": 4}


def _end_without_replies(redis_url: str, status: str) -> threading.Thread:
    """Waits for the job to be queued, then writes its record and publishes nothing."""
    def run() -> None:
        r = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 10
        while not (entries := r.xrange(names.queue("tiny"))):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        job = Job.model_validate_json(entries[0][1][names.JOB_FIELD.encode()])
        record = RequestRecord(
            id=job.id, model="tiny", kind="completion", status=status, created=job.created,
            finished=time.time(), error="boom" if status == "failed" else None,
            error_type="server_error" if status == "failed" else None,
            completions=[CompletionRecord(index=0, text="all of it", token_ids=[1, 2, 3],
                                          finish_reason="length")],
            usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4))
        r.set(names.request_record("tiny", job.id), record.model_dump_json())
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _app(redis_url: str) -> TestClient:
    return TestClient(create_app(GatewaySettings(redis_url=redis_url, api_keys=["sk-lost"],
                                                 models=["tiny"], keepalive_s=0.2,
                                                 request_timeout_s=5)))


def test_a_waiting_request_is_answered_from_the_record(redis_url: str) -> None:
    with _app(redis_url) as client:
        writer = _end_without_replies(redis_url, "completed")
        r = client.post("/v1/completions", json=BODY, headers=HEADERS)
        writer.join()
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "all of it"
        assert r.json()["usage"]["completion_tokens"] == 3


def test_a_waiting_request_that_failed_gets_its_error(redis_url: str) -> None:
    with _app(redis_url) as client:
        writer = _end_without_replies(redis_url, "failed")
        r = client.post("/v1/completions", json=BODY, headers=HEADERS)
        writer.join()
        assert r.status_code == 500 and r.json()["error"]["message"] == "boom"


def test_a_stream_ends_with_a_clear_error_instead_of_keep_alives(redis_url: str) -> None:
    with _app(redis_url) as client:
        writer = _end_without_replies(redis_url, "completed")
        lines = []
        with client.stream("POST", "/v1/completions", json={**BODY, "stream": True},
                           headers=HEADERS) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        writer.join()
        error = json.loads(lines[-1].removeprefix("data: "))["error"]
        assert "missed its last replies" in error["message"]
