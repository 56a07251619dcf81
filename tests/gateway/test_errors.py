"""Every error a client can meet comes back with the right status and an OpenAI error body."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from gateway.errors import (
    bad_request_from_validation,
    install_error_handlers,
    sse_error_event,
    validate_request,
)
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_completion_response,
    to_job,
)
from shared import names
from shared.errors import (
    AuthenticationError,
    BadRequestError,
    InternalError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
    SluiceError,
    error_for_status,
    error_from_type,
    to_openai_body,
)
from shared.messages import CompletionRecord
from shared.redis_server import RedisServer, free_port
from shared.settings import GatewaySettings

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Boom(RuntimeError):
    pass


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> dict[str, Any]:
        if req.model == "boom":
            raise Boom("secret detail")
        if req.model == "busy":
            raise RateLimitError("slow down", retry_after_s=2.5)
        if req.model == "missing":
            raise NotFoundError("model 'missing' does not exist", param="model", code="model_not_found")
        return {"ok": True}

    @app.post("/v1/jobs")
    async def jobs(body: dict[str, Any]) -> dict[str, Any]:
        return {"model": validate_request(CompletionRequest, body).model}

    return app


@pytest.fixture
def client() -> TestClient:
    return TestClient(make_app())


def error_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_valid_request_passes(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", json=BODY).json() == {"ok": True}


def test_malformed_json(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", content=b'{"model": "m",',
                       headers={"content-type": "application/json"})
    err = error_of(resp, 400)
    assert err["message"] == "request body is not valid JSON"
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"[]", b'"text"', b""])
def test_body_that_is_not_an_object(client: TestClient, content: bytes) -> None:
    resp = client.post("/v1/chat/completions", content=content,
                       headers={"content-type": "application/json"})
    assert "must be a JSON object" in error_of(resp, 400)["message"]


def test_unknown_fields(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={**BODY, "foo": 1, "bar": 2})
    err = error_of(resp, 400)
    assert err["message"] == "unknown field(s): foo, bar"
    assert err["param"] == "foo"


def test_wrong_type_names_the_field(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={**BODY, "temperature": "hot"})
    err = error_of(resp, 400)
    assert err["param"] == "temperature"
    assert err["message"].startswith("temperature: ")


def test_every_offending_field_is_named(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={
        **BODY, "zzz": 1, "n": "2", "logit_bias": {"1": 5},
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    msg = error_of(resp, 400)["message"]
    assert msg.startswith("unknown field(s): zzz; ")
    for part in ("n: ", "logit_bias: not supported",
                 "messages[0].content: part 0 has type 'image_url'"):
        assert part in msg


def test_unknown_route(client: TestClient) -> None:
    err = error_of(client.post("/v1/nothing", json=BODY), 404)
    assert err["type"] == "not_found_error"
    assert err["message"] == "unknown route: POST /v1/nothing"


def test_wrong_method(client: TestClient) -> None:
    resp = client.get("/v1/chat/completions")
    err = error_of(resp, 405)
    assert err["type"] == "invalid_request_error"
    assert "GET" in err["message"]
    assert "POST" in resp.headers["allow"]


def test_exception_in_route_is_a_500_without_details(client: TestClient,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.errors"):
        err = error_of(client.post("/v1/chat/completions", json={**BODY, "model": "boom"}), 500)
    assert err == {"message": "internal error", "type": "server_error", "param": None,
                   "code": None}
    [record] = [r for r in caplog.records if r.name == "gateway.errors"]
    assert record.exc_info is not None and record.exc_info[0] is Boom  # traceback logged


def test_typed_errors_keep_status_param_and_code(client: TestClient) -> None:
    err = error_of(client.post("/v1/chat/completions", json={**BODY, "model": "missing"}), 404)
    assert err == {"message": "model 'missing' does not exist", "type": "not_found_error",
                   "param": "model", "code": "model_not_found"}


def test_rate_limit_sends_retry_after(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={**BODY, "model": "busy"})
    err = error_of(resp, 429)
    assert err["type"] == "rate_limit_exceeded" and err["code"] == "rate_limit_exceeded"
    assert resp.headers["retry-after"] == "3"  # rounded up, never early


def test_hand_validated_body_is_a_400(client: TestClient) -> None:
    err = error_of(client.post("/v1/jobs", json={"model": "m", "prompt": ["a", "b"]}), 400)
    assert err["param"] == "prompt" and "one prompt per request" in err["message"]
    assert client.post("/v1/jobs", json={"model": "m", "prompt": "a"}).json() == {"model": "m"}


def test_error_raised_by_later_middleware_is_answered() -> None:
    app = FastAPI()
    install_error_handlers(app)

    class Deny:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            raise PermissionDeniedError("tenant may not use this model")

    app.add_middleware(Deny)  # outside the error middleware: only the last resort sees it
    client = TestClient(app, raise_server_exceptions=False)
    err = error_of(client.get("/anything"), 403)
    assert err["type"] == "permission_error"


def test_sse_error_event() -> None:
    event = sse_error_event(RequestTimeoutError("too slow"))
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event.removeprefix("data: ")) == {"error": {
        "message": "too slow", "type": "timeout", "param": None, "code": "timeout"}}
    hidden = json.loads(sse_error_event(KeyError("internal")).removeprefix("data: "))
    assert hidden["error"]["message"] == "internal error"
    assert hidden["error"]["type"] == "server_error"


@pytest.mark.parametrize(("cls", "status", "kind"), [
    (BadRequestError, 400, "invalid_request_error"),
    (AuthenticationError, 401, "authentication_error"),
    (PermissionDeniedError, 403, "permission_error"),
    (NotFoundError, 404, "not_found_error"),
    (RequestTimeoutError, 408, "timeout"),
    (PayloadTooLargeError, 413, "invalid_request_error"),
    (RateLimitError, 429, "rate_limit_exceeded"),
    (InternalError, 500, "server_error"),
    (ServiceUnavailableError, 503, "service_unavailable_error"),
])
def test_error_family(cls: type[SluiceError], status: int, kind: str) -> None:
    err = cls("why", param="p")
    assert (err.status_code, err.error_type, err.param, str(err)) == (status, kind, "p", "why")
    assert to_openai_body(err)["error"]["type"] == kind
    assert type(error_for_status(status, "x")) is cls


def test_errors_rebuilt_from_worker_types() -> None:
    assert isinstance(error_from_type("invalid_request_error", "bad"), BadRequestError)
    assert isinstance(error_from_type("timeout", "late"), RequestTimeoutError)
    assert isinstance(error_from_type(None, "?"), InternalError)
    assert isinstance(error_from_type("something_new", "?"), InternalError)
    assert error_for_status(415, "x").status_code == 415


def test_validation_formatting_without_fastapi() -> None:
    err = bad_request_from_validation([
        {"type": "extra_forbidden", "loc": ("a",), "msg": "Extra inputs are not permitted"},
        {"type": "value_error", "loc": ("messages", 2, "content"), "msg": "Value error, bad"},
        {"type": "value_error", "loc": ("messages", 2, "content"), "msg": "Value error, bad"},
    ])
    assert err.message == "unknown field(s): a; messages[2].content: bad"
    assert err.param == "a"


def test_official_client_reads_answers_and_errors() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> dict[str, Any]:
        job = to_job(req, model=req.model, request_id="r1", tenant="t", reply_channel=None,
                     deadline=None)
        record = CompletionRecord(index=0, text=f"top_k={job.sampling['top_k']}", token_ids=[1],
                                  finish_reason="stop")
        return chat_completion_response(request_id=job.id, model=job.model,
                                        completions=[record], usage=None)

    client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", max_retries=0,
                           http_client=TestClient(app))
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                         extra_body={"top_k": 5})
    assert out.choices[0].message.content == "top_k=5"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       logit_bias={"1": 1})
    assert info.value.param == "logit_bias"
    assert info.value.message.endswith("logit_bias: not supported")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       temperature=2.5)
    assert info.value.param == "temperature"


def test_an_unreachable_redis_is_a_503_with_retry_after(tmp_path: Path) -> None:
    """Redis going away under a running gateway: a clear 503, never a 500; once it is back on
    the same port, jobs are queued again over a new connection."""
    server = RedisServer(port=free_port(), data_dir=tmp_path, appendonly=False)
    server.start()
    settings = GatewaySettings(redis_url=server.url, api_keys=["sk-t"], models=["tiny"])
    job = {"endpoint": "/v1/completions",
           "body": {"model": "tiny", "prompt": "hi", "max_tokens": 2}}
    headers = {"Authorization": "Bearer sk-t"}
    try:
        with TestClient(create_app(settings)) as client:
            server.stop()
            r = client.post("/v1/jobs", json=job, headers=headers)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "service_unavailable_error"
            server.start()
            deadline = time.monotonic() + 10
            while (r := client.post("/v1/jobs", json=job, headers=headers)).status_code != 202:
                assert r.status_code == 503 and time.monotonic() < deadline, r.text
                time.sleep(0.1)
            assert redis.Redis.from_url(server.url).xlen(names.queue("tiny")) == 1
    finally:
        server.stop()
