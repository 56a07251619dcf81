"""The completion endpoints' fast path: it answers what the framework's routes would, and it
is the one that answers a valid request. Real Redis, no worker (requests time out)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.app import _CompletionFastPath, create_app
from shared.settings import GatewaySettings

KEY = "sk-fast"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
TEXT = {"model": "tiny", "prompt": "x", "max_tokens": 4}

# (path, body or raw bytes, headers): errors of every kind, and valid requests that time out.
CASES: list[tuple[str, Any, dict[str, str]]] = [
    ("/v1/chat/completions", CHAT, {}),
    ("/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-wrong"}),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', AUTH),
    ("/v1/chat/completions", b"", AUTH),
    ("/v1/chat/completions", b"[1, 2]", AUTH),
    ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, AUTH),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, AUTH),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, AUTH),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, AUTH),
    ("/v1/chat/completions", CHAT, {**AUTH, "Content-Type": "text/plain"}),
    ("/v1/chat/completions", CHAT, AUTH),
    ("/v1/completions", {**TEXT, "prompt": [1, -2]}, AUTH),
    ("/v1/completions", {**TEXT, "n": 0}, AUTH),
    ("/v1/completions", TEXT, {**AUTH, "Content-Type": "application/json; charset=utf-8"}),
]


def _app(redis_url: str, fast: bool, **overrides: Any) -> FastAPI:
    settings = GatewaySettings(redis_url=redis_url, api_keys=[KEY], models=["tiny"],
                               request_timeout_s=0.3, keepalive_s=0.1, **overrides)
    app = create_app(settings)
    if not fast:
        app.user_middleware = [m for m in app.user_middleware
                               if m.cls is not _CompletionFastPath]
    return app


def _post(client: TestClient, path: str, body: Any, headers: dict[str, str]) -> Any:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"Content-Type": "application/json",
                                                         **headers})
    return client.post(path, json=body, headers=headers)


def _answer(resp: Any) -> tuple[int, Any, str | None]:
    return resp.status_code, resp.json(), resp.headers.get("retry-after")


def test_fast_path_answers_as_the_framework_routes_do(redis_url: str) -> None:
    with TestClient(_app(redis_url, fast=True)) as fast, \
            TestClient(_app(redis_url, fast=False)) as framework:
        for path, body, headers in CASES:
            assert _answer(_post(fast, path, body, headers)) == \
                _answer(_post(framework, path, body, headers)), (path, body, headers)


def test_queue_full_answers_the_same(redis_url: str) -> None:
    with TestClient(_app(redis_url, fast=True, queue_cap=1)) as fast, \
            TestClient(_app(redis_url, fast=False, queue_cap=1)) as framework:
        # Both share one stream: the first request fills it, everything after is refused.
        assert fast.post("/v1/completions", json=TEXT, headers=AUTH).status_code == 408
        answers = [_answer(c.post("/v1/completions", json=TEXT, headers=AUTH))
                   for c in (fast, framework)]
    assert answers[0] == answers[1]
    assert answers[0][0] == 429 and answers[0][2] is not None


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT),
                                       ("/v1/completions", TEXT)])
def test_valid_requests_take_the_fast_path_and_others_do_not(redis_url: str, path: str,
                                                             body: dict[str, Any]) -> None:
    app = _app(redis_url, fast=True)
    # Without the framework's route, only the fast path can answer.
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != path]
    with TestClient(app) as client:
        valid = client.post(path, json=body, headers=AUTH)
        assert valid.status_code == 408, valid.text  # it ran: queued, then timed out
        with client.stream("POST", path, json={**body, "stream": True}, headers=AUTH) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[0].startswith(": keep-alive") and "timeout" in lines[-1]
        # An invalid one went on to the route, which is not there.
        assert client.post(path, json={**body, "frobnicate": 1},
                           headers=AUTH).status_code in (404, 405)
        assert client.post(path, json=body).status_code in (404, 405)
