"""Every error the gateway answers, turned into an OpenAI error body in this one module.

`install_error_handlers(app)` covers the typed `SluiceError` family, request validation (types,
unknown fields, malformed JSON), the framework's own 404/405, and anything unexpected (a 500 that
is logged with its traceback). Streams that already started report errors in-band with
`sse_error_event`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import (
    BadRequestError,
    InternalError,
    ServiceUnavailableError,
    SluiceError,
    error_for_status,
    to_openai_body,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

INTERNAL_MESSAGE = "internal error"  # all a client learns about a bug; the log has the rest


def _path(loc: Sequence[Any]) -> str:
    """("messages", 0, "content") -> "messages[0].content", the way clients name fields."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def bad_request_from_validation(errors: Sequence[Mapping[str, Any]]) -> BadRequestError:
    """One 400 naming every offending field, from pydantic's or FastAPI's error list."""
    unknown: list[str] = []
    problems: list[str] = []
    params: list[str] = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if loc[:1] == ("body",):  # FastAPI prefixes where the value came from
            loc = loc[1:]
        kind = e.get("type")
        if kind == "json_invalid":
            return BadRequestError("request body is not valid JSON")
        if not loc and kind in ("missing", "model_attributes_type", "model_type", "dict_type"):
            return BadRequestError("request body must be a JSON object "
                                   "(sent with Content-Type: application/json)")
        path = _path(loc)
        if path and path not in params:
            params.append(path)
        if kind == "extra_forbidden":
            unknown.append(path)
            continue
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        problem = f"{path}: {msg}" if path else msg
        if problem not in problems:
            problems.append(problem)
    if unknown:
        problems.insert(0, f"unknown field(s): {', '.join(unknown)}")
    return BadRequestError("; ".join(problems) or "invalid request",
                           param=params[0] if params else None)


def validate_request(model: type[M], data: Any) -> M:
    """`model.model_validate(data)` for a body a route reads by hand: a bad one is a 400, like a
    body FastAPI validates. (A pydantic error left to escape is treated as the gateway's own.)"""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise bad_request_from_validation(e.errors()) from e


def _http_exception_error(request: Request, exc: StarletteHTTPException) -> SluiceError:
    # The framework's stock details say little; name what was asked for instead.
    if exc.status_code == 404 and exc.detail == "Not Found":
        return error_for_status(404, f"unknown route: {request.method} {request.url.path}")
    if exc.status_code == 405 and exc.detail == "Method Not Allowed":
        return error_for_status(
            405, f"method {request.method} is not allowed on {request.url.path}")
    return error_for_status(exc.status_code, str(exc.detail))


def as_sluice_error(exc: BaseException) -> SluiceError:
    """The error a client sees for `exc`. Anything unexpected is logged, with its traceback, and
    becomes a bare 500 so that internals do not leak. A pydantic `ValidationError` counts as
    unexpected: one that reaches here came from the gateway's own data, not the client's (run a
    body validated by hand through `bad_request_from_validation`)."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, RequestValidationError):
        return bad_request_from_validation(exc.errors())
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        # Redis restarting or out of reach: a server-side condition the client may retry, not
        # a bug to log with a traceback.
        log.warning("Redis is unreachable: %s", exc)
        return ServiceUnavailableError("the request queue is unreachable; retry shortly",
                                       retry_after_s=1)
    log.error("unhandled error", exc_info=exc)
    return InternalError(INTERNAL_MESSAGE)


def error_response(err: SluiceError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The HTTP answer for `err`: its status, its OpenAI body, and Retry-After when it has one."""
    out = dict(headers or {})
    if err.retry_after_s is not None:
        # Whole seconds by the HTTP spec; rounding up (and at least 1) keeps clients from retrying
        # before the server said they may.
        out["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return JSONResponse(to_openai_body(err), status_code=err.status_code, headers=out)


def sse_error_event(err: BaseException) -> str:
    """An error in a stream that already sent its headers: one `data:` event with the body."""
    return f"data: {json.dumps(to_openai_body(as_sluice_error(err)))}\n\n"


async def _handle(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StarletteHTTPException):
        return error_response(_http_exception_error(request, exc), exc.headers)
    return error_response(as_sluice_error(exc))


class _CatchAll:
    """Turns an exception that escaped the routes into a 500 in the OpenAI shape.

    A handler registered for `Exception` alone would answer too, but the framework re-raises the
    exception after it, so every bug would be logged twice; this middleware answers and stops it.
    It also answers typed errors raised by middleware installed after it. Once a response has
    started, nothing can be answered any more: the exception goes on to the server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            await error_response(as_sluice_error(exc))(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Wires every error into the OpenAI shape. Call it before the app starts serving."""
    for cls in (SluiceError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(cls, _handle)
    app.add_middleware(_CatchAll)
    app.add_exception_handler(Exception, _last_resort)


async def _last_resort(request: Request, exc: Exception) -> Response:
    """For what escapes middleware added after `_CatchAll`. The framework re-raises the exception
    after this answers and the server logs it, so it is not logged here."""
    return error_response(exc if isinstance(exc, SluiceError) else InternalError(INTERNAL_MESSAGE))
