"""The job view against a real Redis and no worker: the start mark and the record a worker
writes (same keys, same messages) move it from queued to running to completed."""

from __future__ import annotations

import time

import redis
from fastapi.testclient import TestClient

from gateway.app import create_app
from shared import names
from shared.messages import CompletionRecord, RequestRecord, Started
from shared.settings import GatewaySettings

HEADERS = {"Authorization": "Bearer sk-jobs"}
JOB = {"endpoint": "/v1/completions", "body": {"model": "tiny", "prompt": "wait", "max_tokens": 4}}


def test_job_view_reports_queued_running_and_its_times(redis_url: str) -> None:
    settings = GatewaySettings(redis_url=redis_url, api_keys=["sk-jobs"], models=["tiny"])
    r = redis.Redis.from_url(redis_url)
    with TestClient(create_app(settings)) as client:
        before = time.time()
        created = client.post("/v1/jobs", json=JOB, headers=HEADERS).json()
        job_id = created["id"]
        assert created["status"] == "queued"
        assert before <= created["created_at"] <= time.time()

        view = client.get(f"/v1/jobs/{job_id}", headers=HEADERS).json()
        assert view["status"] == "queued" and view["created_at"] == created["created_at"]
        assert view["started_at"] is None and view["finished_at"] is None

        started = created["created_at"] + 1.5
        r.set(names.started("tiny", job_id), Started(worker_id="w1", started=started)
              .model_dump_json())
        view = client.get(f"/v1/jobs/{job_id}", headers=HEADERS).json()
        assert (view["status"], view["started_at"], view["result"]) == ("running", started, None)

        record = RequestRecord(
            id=job_id, model="tiny", kind="completion", status="completed",
            created=created["created_at"], started=started, finished=started + 2.0,
            completions=[CompletionRecord(index=0, text="done", token_ids=[1],
                                          finish_reason="length")])
        r.set(names.request_record("tiny", job_id), record.model_dump_json())
        view = client.get(f"/v1/jobs/{job_id}", headers=HEADERS).json()
        assert view["status"] == "completed" and view["result"]["choices"][0]["text"] == "done"
        assert view["created_at"] < view["started_at"] < view["finished_at"] == started + 2.0

        # A cancel asked before any worker took it reads as cancelling, not as running.
        other = client.post("/v1/jobs", json=JOB, headers=HEADERS).json()["id"]
        assert client.delete(f"/v1/jobs/{other}", headers=HEADERS).status_code == 200
        view = client.get(f"/v1/jobs/{other}", headers=HEADERS).json()
        assert (view["status"], view["started_at"]) == ("cancelling", None)
    r.close()
