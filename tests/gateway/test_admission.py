"""Admission and timeouts, with a real Redis and no worker: jobs wait in the stream."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from gateway.app import create_app
from shared.settings import GatewaySettings

HEADERS = {"Authorization": "Bearer sk-admission"}


def _app(redis_url: str, **overrides: object) -> TestClient:
    settings = GatewaySettings(redis_url=redis_url, api_keys=["sk-admission"], models=["tiny"],
                               **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def test_queue_cap_answers_429_with_retry_after(redis_url: str) -> None:
    job = {"endpoint": "/v1/completions",
           "body": {"model": "tiny", "prompt": "wait", "max_tokens": 4}}
    with _app(redis_url, queue_cap=2) as client:
        assert client.post("/v1/jobs", json=job, headers=HEADERS).status_code == 202
        assert client.post("/v1/jobs", json=job, headers=HEADERS).status_code == 202
        third = client.post("/v1/jobs", json=job, headers=HEADERS)
    assert third.status_code == 429
    assert int(third.headers["Retry-After"]) >= 1
    assert third.json()["error"]["type"] == "rate_limit_exceeded"


def test_request_timeout_is_a_clear_error(redis_url: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    with _app(redis_url, request_timeout_s=0.5, keepalive_s=0.2) as client:
        r = client.post("/v1/chat/completions", json=body, headers=HEADERS)
        assert r.status_code == 408
        assert "timeout" in r.json()["error"]["message"]
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                           headers=HEADERS) as s:
            lines = [line for line in s.iter_lines() if line]
    # While nothing serves the model the stream keeps the connection alive, then says why.
    assert lines[0].startswith(": keep-alive")
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert "timeout" in error["message"]


def test_odd_paths_get_an_openai_404_not_a_redirect(redis_url: str) -> None:
    with _app(redis_url) as client:
        for path in ["/v1/jobs/%2F", "/v1/models/", "/v1/nothing"]:
            r = client.get(path, headers=HEADERS, follow_redirects=False)
            assert r.status_code == 404, path
            assert r.json()["error"]["message"], path
