"""DELETE /v1/jobs/{id} against a real Redis and no worker: a running job is marked and told to
stop; one that has ended (its record exists) is shown as it ended and marked with nothing."""

from __future__ import annotations

import time
from typing import Literal

import pytest
import redis
from fastapi.testclient import TestClient

from gateway.app import create_app
from shared import names
from shared.messages import Cancel, CompletionRecord, RequestRecord
from shared.settings import GatewaySettings

HEADERS = {"Authorization": "Bearer sk-cancel"}
JOB = {"endpoint": "/v1/completions", "body": {"model": "tiny", "prompt": "x", "max_tokens": 4}}


def _cancels(pubsub: redis.client.PubSub) -> list[str]:
    """The request ids of the cancels published meanwhile (all of them: publish is synchronous,
    the gateway has answered by now, so a short wait drains them)."""
    ids, deadline = [], time.monotonic() + 0.3
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None:
            ids.append(Cancel.model_validate_json(message["data"]).req_id)
    return ids


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_delete_of_an_ended_job_shows_it_and_marks_nothing(
        redis_url: str, status: Literal["completed", "failed", "cancelled"]) -> None:
    settings = GatewaySettings(redis_url=redis_url, api_keys=["sk-cancel"], models=["tiny"])
    r = redis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    pubsub.subscribe(names.cancel_channel("tiny"))
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=JOB, headers=HEADERS).json()["id"]
        now = time.time()
        record = RequestRecord(
            id=job_id, model="tiny", kind="completion", status=status, created=now - 2,
            started=now - 1, finished=now,
            completions=[CompletionRecord(index=0, text="done", token_ids=[1],
                                          finish_reason="length")] if status == "completed" else [],
            error="it broke" if status == "failed" else None,
            error_type="server_error" if status == "failed" else None)
        r.set(names.request_record("tiny", job_id), record.model_dump_json())
        _cancels(pubsub)  # the subscription's own message, and nothing else yet

        answer = client.delete(f"/v1/jobs/{job_id}", headers=HEADERS)
        assert answer.status_code == 200, answer.text
        view = answer.json()
        assert view == client.get(f"/v1/jobs/{job_id}", headers=HEADERS).json()
        assert view["status"] == status and view["finished_at"] == now
        if status == "completed":
            assert view["result"]["choices"][0]["text"] == "done"
        if status == "failed":
            assert view["error"] == {"message": "it broke", "type": "server_error"}
        assert not r.exists(names.cancelled("tiny", job_id))
        assert _cancels(pubsub) == []
    pubsub.close()
    r.close()


def test_delete_of_a_running_job_marks_it_and_tells_the_workers(redis_url: str) -> None:
    settings = GatewaySettings(redis_url=redis_url, api_keys=["sk-cancel"], models=["tiny"],
                               record_ttl_s=600)
    r = redis.Redis.from_url(redis_url)
    pubsub = r.pubsub()
    pubsub.subscribe(names.cancel_channel("tiny"))
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=JOB, headers=HEADERS).json()["id"]
        _cancels(pubsub)
        answer = client.delete(f"/v1/jobs/{job_id}", headers=HEADERS)
        assert answer.status_code == 200 and answer.json()["status"] == "cancelling"
        assert 0 < r.ttl(names.cancelled("tiny", job_id)) <= 600
        assert _cancels(pubsub) == [job_id]
        assert client.delete("/v1/jobs/job-unknown", headers=HEADERS).status_code == 404
    pubsub.close()
    r.close()
