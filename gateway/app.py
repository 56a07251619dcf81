"""The OpenAI-compatible gateway: validate, queue on Redis Streams, stream replies back.

The gateway holds no model and no tokenizer. A request becomes a `Job` on its model's stream; the
worker that takes it publishes events on this gateway's reply channel, which one subscription
demultiplexes by request id.
"""


import asyncio
import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics
from gateway.errors import error_response, install_error_handlers, sse_error_event, validate_request
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion_response,
    chat_event_chunks,
    completion_chunk,
    completion_response,
    completions_from_events,
    stream_continuous_usage,
    stream_include_usage,
    to_job_off_loop,
    usage_chunk,
    usage_so_far,
)
from gateway.replies import Progress, ReplyRouter
from gateway.structured import (
    ToolCallStream,
    deprecation_headers,
    tool_call_response,
    uses_tool_calls,
)
from shared import names, resp, trace
from shared.busy_poll import LoopPoller, gateway_window_s
from shared.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
    SluiceError,
    error_from_type,
)
from shared.fleet import fleet_view, live_workers, model_names, model_state, registry
from shared.messages import Cancel, CompletionRecord, Event, Job, RequestRecord, Started, Usage
from shared.resilient import run_resilient
from shared.settings import GatewaySettings

log = logging.getLogger(__name__)


class JobRequest(BaseModel):
    """POST /v1/jobs: one request run in the background, read back with GET /v1/jobs/{id}."""

    model_config = ConfigDict(extra="forbid")
    endpoint: str  # "/v1/chat/completions" or "/v1/completions"
    body: dict[str, Any]


# How long a streaming or waiting request waits for the reply channel to be subscribed again
# after Redis dropped it, before a 503.
_RESUBSCRIBE_WAIT_S = 5.0

# The gateway's view of the fleet (which models are served, and their states) is read this
# often in the background; a request for a model not in it reads it again.
_FLEET_REFRESH_S = 0.25

# XADD the job unless the queue already holds the cap; answers the entry id, or the depth
# (an integer) when full.
_ENQUEUE_IF_ROOM = resp.Script("""
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return depth end
return redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[3])
""")


async def _get_within(queue: asyncio.Queue[Event], timeout_s: float) -> Event:
    """queue.get() with a time limit. asyncio.timeout (3.11+) arms a timer on the running task;
    wait_for, once per streamed step, would wrap the get in a task of its own."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await queue.get()
    return await asyncio.wait_for(queue.get(), timeout=timeout_s)


class BodyLimitAndMetrics:
    """Refuses oversized bodies before they are read, and counts every HTTP request.

    Plain ASGI on purpose: it passes each response chunk straight through, where a
    decorator-style middleware would copy every chunk of every stream through a task and queue.
    The latency observed is the time to the response's headers (for a stream, its start).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        size = dict(scope["headers"]).get(b"content-length", b"")
        if size.isdigit() and int(size) > self.max_body_bytes:
            response = error_response(PayloadTooLargeError(
                f"request body is {int(size)} bytes; the limit is {self.max_body_bytes}"))
            await response(scope, receive, send)
            metrics.observe_http(path, method, response.status_code, 0.0)
            return
        t0 = time.perf_counter()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics.observe_http(path, method, message["status"], time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, send_counted)


def create_app(settings: GatewaySettings) -> FastAPI:
    state: dict[str, Any] = {}
    given = settings.busy_poll_ms
    poller = LoopPoller(gateway_window_s(None if given is None else given / 1e3))
    if poller.window_s > 0:
        log.info("the gateway polls for %.0f ms after each request or reply", poller.window_s * 1e3)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Requests wait for a free connection instead of failing when a burst exceeds the pool.
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=512,
                                                        timeout=30)
        state["redis"] = aioredis.Redis(connection_pool=pool)
        # Each job's XADD goes over a lean connection of its own (shared/resp.py): it is on
        # every request's path, and the pool's client work would cost more than the round trip.
        state["lane"] = resp.RespClient(settings.redis_url)
        await state["lane"].connection()
        state["router"] = ReplyRouter(settings.redis_url, names.gateway_channel(settings.gateway_id),
                                      on_message=poller.kick)
        await state["router"].start()
        watcher = asyncio.create_task(run_resilient(watch_fleet, "fleet view", log))
        polling = asyncio.create_task(poller.run())
        log.info("gateway %s on reply channel %s, Redis %s", settings.gateway_id,
                 state["router"].channel, settings.redis_url)
        yield
        watcher.cancel()
        polling.cancel()
        await state["router"].stop()
        await state["lane"].aclose()
        await state["redis"].aclose()

    # No slash redirects: a client of a JSON API wants the error, not a bare 307 to follow
    # (e.g. GET /v1/jobs/%2F would otherwise redirect to /v1/jobs/).
    app = FastAPI(title="Sluice", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="OpenAI-compatible LLM serving over Redis Streams.")
    install_error_handlers(app)
    keys = {k: hashlib.sha256(k.encode()).hexdigest()[:12] for k in settings.api_keys}

    async def tenant(authorization: Annotated[str | None, Header()] = None) -> str:
        if settings.allow_unauthenticated and not keys:
            return "open"
        token = (authorization or "").removeprefix("Bearer ").strip()
        if token not in keys:
            raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer KEY'")
        return keys[token]

    Tenant = Annotated[str, Depends(tenant)]

    app.add_middleware(BodyLimitAndMetrics, max_body_bytes=settings.max_body_bytes)

    fleet: dict[str, Any] = {"models": [], "states": {}, "read_at": 0.0}

    async def read_fleet() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        """Worker heartbeats and the scaler's model registry, raw."""
        pipe = state["redis"].pipeline(transaction=False)
        pipe.hgetall(names.WORKERS)
        pipe.hgetall(names.MODELS)
        beats, models = await pipe.execute()
        return beats, models

    async def refresh_fleet() -> None:
        now = time.time()
        beats, models = await read_fleet()
        workers, known = live_workers(beats, now), registry(models, now)
        fleet["models"] = model_names(workers, known)
        fleet["states"] = {m: model_state(m, workers, known.get(m))
                           for m in {*fleet["models"], *settings.models}}
        fleet["read_at"] = now

    async def watch_fleet() -> None:
        """Keeps the fleet view fresh off the requests' path: reading it on a request would
        put a Redis round trip in front of that request's job."""
        while True:
            await refresh_fleet()
            await asyncio.sleep(_FLEET_REFRESH_S)

    async def served_models(max_age_s: float = 4 * _FLEET_REFRESH_S) -> list[str]:
        """Models some live worker serves or the scaler manages (maybe at zero workers); their
        states (cold, warming, ready) are in fleet["states"]. The view is read again here only
        when it is older than `max_age_s` (the watcher is failing: Redis is away)."""
        if time.time() - fleet["read_at"] > max_age_s:
            await refresh_fleet()
        return list(settings.models or fleet["models"])

    async def check_model(model: str) -> None:
        # A model not in the view may have come up since it was read: read it again before
        # saying no, so a worker that just became ready serves its first request.
        if model not in await served_models() and \
                model not in await served_models(max_age_s=0.0):
            raise NotFoundError(f"model {model!r} is not served here; GET /v1/models lists them",
                                param="model")

    async def admit_and_enqueue(job: Job, tenant_id: str, endpoint: str,
                                idempotency_key: str | None) -> None:
        """Admission and XADD in one round trip (and atomically: no two gateways both take the
        last place); a refused request gives its Idempotency-Key back for the retry."""
        # Workers delete entries as they acknowledge them: the length is the unfinished backlog.
        trace.point("g_xadd", job.id)
        added = await state["lane"].run_script(
            _ENQUEUE_IF_ROOM, [names.queue(job.model)],
            [settings.queue_cap, names.JOB_FIELD, job.model_dump_json()])
        if isinstance(added, int):
            if idempotency_key:
                await state["redis"].delete(
                    names.idempotency(tenant_id, f"{endpoint}:{idempotency_key}"))
            raise RateLimitError(f"model {job.model!r} has {added} requests queued or running; "
                                 "retry shortly", retry_after_s=1)
        metrics.requests_queued(job.model)

    # Marks a request cancelled unless its record exists: one that already ended keeps no
    # marker for an hour. A script, so no record can land between the check and the mark (one
    # that lands after it clears the mark: the worker deletes it with the job's ack).
    mark_cancelled = """
        if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
        redis.call('SET', KEYS[2], 1, 'EX', ARGV[1])
        return 1"""

    async def cancel(model: str, req_id: str) -> bool:
        """Cancels a request that has not ended; False (and nothing done) if it has."""
        marked = await state["redis"].eval(
            mark_cancelled, 2, names.request_record(model, req_id),
            names.cancelled(model, req_id), settings.record_ttl_s)
        if not marked:
            return False
        await state["redis"].publish(names.cancel_channel(model),
                                     Cancel(req_id=req_id).model_dump_json())
        return True

    background: set[asyncio.Task[Any]] = set()

    def cancel_soon(model: str, req_id: str) -> None:
        """Cancels from a task of its own: called while the request's own task is being
        cancelled (the client left), where any await of ours would be cancelled too."""
        task = asyncio.get_running_loop().create_task(cancel(model, req_id))
        background.add(task)
        task.add_done_callback(background.discard)

    async def remember_idempotent(tenant_id: str, endpoint: str, key: str | None, req_id: str,
                                  model: str) -> str | None:
        """Returns the earlier request's id if this key was used before on this endpoint, else
        claims it. Keys are per endpoint: a job id and a completion id are not interchangeable."""
        if not key:
            return None
        name = names.idempotency(tenant_id, f"{endpoint}:{key}")
        value = json.dumps({"id": req_id, "model": model})
        if await state["redis"].set(name, value, nx=True, ex=settings.idempotency_ttl_s):
            return None
        earlier = await state["redis"].get(name)
        return json.loads(earlier)["id"] if earlier else None

    async def read_record(model: str, req_id: str) -> RequestRecord | None:
        raw = await state["redis"].get(names.request_record(model, req_id))
        return RequestRecord.model_validate_json(raw) if raw else None

    async def wait_record(model: str, req_id: str, deadline: float) -> RequestRecord:
        while time.time() < deadline:
            record = await read_record(model, req_id)
            if record is not None:
                return record
            await asyncio.sleep(0.05)
        raise RequestTimeoutError("the request did not finish within the gateway's timeout")

    async def run(req: ChatCompletionRequest | CompletionRequest, kind: str, tenant_id: str,
                  idempotency_key: str | None) -> Response:
        await check_model(req.model)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        # A client's request_id is kept for correlation, with a random suffix: ids name Redis
        # records, and two clients (or tenants) may well choose the same one.
        client_id = getattr(req, "request_id", None)
        req_id = f"{prefix}-{client_id}-{uuid.uuid4().hex[:12]}" if client_id else \
            f"{prefix}-{uuid.uuid4().hex}"
        deadline = time.time() + settings.request_timeout_s
        router: ReplyRouter = state["router"]
        # Validate before claiming an Idempotency-Key: a rejected request must not hold the key,
        # or its resubmission would wait for a result that never comes.
        job = await to_job_off_loop(req, model=req.model, request_id=req_id, tenant=tenant_id,
                                    reply_channel=router.channel, deadline=deadline)
        deprecation = deprecation_headers(req)  # old guided_* fields: honored, and flagged
        earlier = await remember_idempotent(tenant_id, kind, idempotency_key, req_id, req.model)
        if earlier is not None:  # same request again: the first one's result, never a rerun
            record = await wait_record(req.model, earlier, deadline)
            if req.stream:
                _raise_unless_completed(record)
                return StreamingResponse(_replay(record, kind, req), media_type="text/event-stream",
                                         headers={"X-Request-Id": earlier, **deprecation})
            return JSONResponse(_record_response(kind, record, tools=uses_tool_calls(req)),
                                headers=deprecation)
        queue = router.register(req_id)  # before the job exists: no reply may be missed
        try:
            if not await router.wait_subscribed(_RESUBSCRIBE_WAIT_S):
                raise ServiceUnavailableError("the gateway's reply channel is not subscribed "
                                              "(Redis restarting?); retry shortly",
                                              retry_after_s=1)
            await admit_and_enqueue(job, tenant_id, kind, idempotency_key)
        except Exception:
            router.unregister(req_id)
            raise
        if req.stream:
            return StreamingResponse(stream(req, kind, job, queue, deadline),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": req_id,
                                              **deprecation})
        return JSONResponse(await collect(req, kind, job, queue, deadline),
                            headers={"X-Request-Id": req_id, **deprecation})

    async def next_event(queue: asyncio.Queue[Event], deadline: float,
                         timeout_s: float) -> Event | None:
        if not queue.empty():  # the common case mid-stream: no timer to arm and cancel
            return queue.get_nowait()
        remaining = deadline - time.time()
        if remaining <= 0:
            raise RequestTimeoutError("the request did not finish within the gateway's timeout")
        try:
            return await _get_within(queue, min(timeout_s, remaining))
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            return None

    async def ended_unseen(job: Job, queue: asyncio.Queue[Event]) -> RequestRecord | None:
        """After a silence, the request's record if it ended without its last replies reaching
        this gateway: published while Redis dropped the subscription, they are gone, and the
        client would otherwise wait out the whole timeout. (The record is written after the
        last PUBLISH, so one that exists while nothing arrives means those replies were lost.)"""
        try:
            record = await read_record(job.model, job.id)
        except RedisError:  # Redis away: keep waiting, as the worker does for it
            return None
        return record if record is not None and queue.empty() else None

    async def collect(req: Any, kind: str, job: Job, queue: asyncio.Queue[Event],
                      deadline: float) -> dict[str, Any]:
        progress = Progress(job.sampling.get("n", 1))
        events: list[Event] = []
        finished = False
        t0 = time.perf_counter()
        try:
            while not progress.done:
                ev = await next_event(queue, deadline, settings.keepalive_s)
                if ev is None:
                    record = await ended_unseen(job, queue)
                    if record is None:
                        continue
                    finished = True
                    return _record_response(kind, record, tools=job.tools is not None)
                if ev.error is not None:
                    raise _worker_error(ev)
                if progress.accept(ev):
                    events.append(ev)
            finished = True
        finally:
            state["router"].unregister(job.id)
            if not finished:
                cancel_soon(job.model, job.id)
        metrics.observe_finished(job.model, events, time.perf_counter() - t0)
        completions, usage = completions_from_events(events)
        return _respond(kind, job.id, job.model, completions, usage, int(job.created),
                        tools=job.tools is not None)

    async def stream(req: Any, kind: str, job: Job, queue: asyncio.Queue[Event],
                     deadline: float) -> AsyncIterator[str]:
        progress = Progress(job.sampling.get("n", 1))
        finished = False
        t0 = time.perf_counter()
        first: dict[int, bool] = {}
        usage = None
        clock = metrics.StreamClock(job.model)
        seen: list[Event] = []
        offsets: dict[int, int] = {}
        tool_calls = ToolCallStream() if job.tools is not None else None
        # stream_options.continuous_usage_stats: every chunk carries the usage so far, with
        # the completion tokens of its own choice (the prompt's length comes on the first event).
        continuous = stream_continuous_usage(req)
        prompt_tokens = 0
        generated: dict[int, int] = {}
        text_lines = _TextLines(kind, job) if tool_calls is None and not continuous else None
        try:
            while not progress.done:
                try:
                    ev = await next_event(queue, deadline, settings.keepalive_s)
                except SluiceError as e:
                    yield sse_error_event(e)
                    finished = True
                    return
                if ev is None:
                    if await ended_unseen(job, queue) is not None:
                        yield sse_error_event(ServiceUnavailableError(
                            "the request ended, but this stream missed its last replies (Redis "
                            "restarted meanwhile); what it sent so far stands"))
                        finished = True
                        return
                    yield ": keep-alive\n\n"  # the job may wait in Redis for a worker
                    continue
                # Everything already here (one worker step's events, usually) goes out as one
                # write: one chunk of the response per step, not one per token.
                out: list[str] = []
                opening = not seen  # this write carries the stream's first tokens
                while ev is not None:
                    if ev.error is not None:
                        out.append(sse_error_event(_worker_error(ev)))
                        yield "".join(out)
                        finished = True
                        return
                    if progress.accept(ev):
                        clock.tick()
                        seen.append(ev)
                        usage = ev.usage or usage
                        line = text_lines.line(ev, first=not first.get(ev.index)) \
                            if text_lines else None
                        if line is not None:  # the usual mid-stream token
                            out.append(line)
                            offsets[ev.index] = offsets.get(ev.index, 0) + len(ev.text)
                        else:
                            so_far = None
                            if continuous:
                                prompt_tokens = (ev.prompt_tokens or prompt_tokens
                                                 or (ev.usage.prompt_tokens if ev.usage else 0))
                                done = generated[ev.index] = (generated.get(ev.index, 0)
                                                              + len(ev.token_ids))
                                so_far = usage_so_far(prompt_tokens, done)
                            chunks = _stream_chunks(ev, kind, job, offsets,
                                                    first=not first.get(ev.index), usage=so_far)
                            for chunk in tool_calls.rewrite(chunks) if tool_calls else chunks:
                                out.append(f"data: {json.dumps(chunk)}\n\n")
                        first[ev.index] = True
                    ev = queue.get_nowait() if not queue.empty() and not progress.done else None
                if out:
                    if opening:
                        trace.point("g_sse", job.id)
                    yield "".join(out)
            if usage is not None and stream_include_usage(req):
                chunk = usage_chunk(kind=kind, request_id=job.id, model=job.model,  # type: ignore[arg-type]
                                    created=int(job.created), usage=usage)
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
            metrics.observe_finished(job.model, seen, time.perf_counter() - t0)
        finally:
            state["router"].unregister(job.id)
            if not finished:  # the client went away: free the worker's slot now
                cancel_soon(job.model, job.id)

    # The two completion endpoints' usual requests skip the framework's routing and
    # dependency solving (see _CompletionFastPath); innermost, so the error middleware and the
    # body limit and metrics still wrap them.
    app.user_middleware.append(Middleware(
        _CompletionFastPath, run=run, authorize=tenant, kick=poller.kick, models={
            "/v1/chat/completions": (ChatCompletionRequest, "chat"),
            "/v1/completions": (CompletionRequest, "completion")}))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, tenant_id: Tenant,
                               idempotency_key: Annotated[str | None, Header()] = None) -> Response:
        return await run(req, "chat", tenant_id, idempotency_key)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, tenant_id: Tenant,
                          idempotency_key: Annotated[str | None, Header()] = None) -> Response:
        return await run(req, "completion", tenant_id, idempotency_key)

    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: JobRequest, tenant_id: Tenant,
                         idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
        kind, model_cls = _job_kind(body.endpoint)
        req = validate_request(model_cls, body.body)
        if req.stream:
            raise BadRequestError("a background job cannot stream; drop 'stream'", param="stream")
        await check_model(req.model)
        req_id = f"job-{uuid.uuid4().hex}"
        job = await to_job_off_loop(req, model=req.model, request_id=req_id, tenant=tenant_id,
                                    reply_channel=None, deadline=None)
        earlier = await remember_idempotent(tenant_id, "jobs", idempotency_key, req_id, req.model)
        if earlier is not None:
            return JSONResponse(_job_view(earlier, req.model, "queued", None), status_code=202)
        # Indexed before it is queued, so a job that exists can always be found.
        await state["redis"].set(names.job_index(req_id),
                                 json.dumps({"model": req.model, "kind": kind, "tenant": tenant_id,
                                             "body": body.body, "created": job.created}),
                                 ex=settings.record_ttl_s)
        try:
            await admit_and_enqueue(job, tenant_id, "jobs", idempotency_key)
        except RateLimitError:
            await state["redis"].delete(names.job_index(req_id))
            raise
        return JSONResponse(_job_view(req_id, req.model, "queued", None, created=job.created),
                            status_code=202)

    async def job_meta(job_id: str, tenant_id: str) -> dict[str, Any]:
        raw = await state["redis"].get(names.job_index(job_id))
        meta = json.loads(raw) if raw else None
        if meta is None or meta["tenant"] != tenant_id:
            raise NotFoundError(f"no job {job_id!r}", param="id")
        return meta

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, tenant_id: Tenant) -> JSONResponse:
        meta = await job_meta(job_id, tenant_id)
        record = await read_record(meta["model"], job_id)
        if record is not None:
            return JSONResponse(ended_job_view(job_id, meta, record))
        pipe = state["redis"].pipeline(transaction=False)
        pipe.exists(names.cancelled(meta["model"], job_id))
        pipe.get(names.started(meta["model"], job_id))
        cancelled, raw_started = await pipe.execute()
        started = Started.model_validate_json(raw_started).started if raw_started else None
        status = "cancelling" if cancelled else "queued" if started is None else "running"
        return JSONResponse(_job_view(job_id, meta["model"], status, None,
                                      created=meta.get("created"), started=started))

    def ended_job_view(job_id: str, meta: dict[str, Any], record: RequestRecord
                       ) -> dict[str, Any]:
        result = None
        if record.status == "completed":
            body = meta["body"]
            result = _respond(meta["kind"], job_id, record.model, record.completions, record.usage,
                              int(record.created), tools=bool(body.get("tools")) and body.get(
                                  "tool_choice", "auto") != "none")
        view = _job_view(job_id, meta["model"], record.status, result,
                         created=meta.get("created", record.created), started=record.started,
                         finished=record.finished)
        if record.error:
            view["error"] = {"message": record.error, "type": record.error_type or "server_error"}
        return view

    @app.delete("/v1/jobs/{job_id}")
    async def delete_job(job_id: str, tenant_id: Tenant) -> JSONResponse:
        """Cancels a job; one that has already ended is left as it is and shown as it ended."""
        meta = await job_meta(job_id, tenant_id)
        if await cancel(meta["model"], job_id):
            return JSONResponse(_job_view(job_id, meta["model"], "cancelling", None,
                                          created=meta.get("created")))
        record = await read_record(meta["model"], job_id)
        if record is None:  # ended and its record expired meanwhile: nothing left to cancel
            raise NotFoundError(f"no job {job_id!r}", param="id")
        return JSONResponse(ended_job_view(job_id, meta, record))

    @app.get("/v1/models")
    async def list_models(tenant_id: Tenant) -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "sluice",
             "state": fleet["states"].get(m, "cold")}
            for m in await served_models()]}

    @app.get("/v1/fleet")
    async def get_fleet(tenant_id: Tenant) -> dict[str, Any]:
        """Models, queue depths and workers, as `sluice status` prints them."""
        beats, models = await read_fleet()
        now = time.time()
        listed = model_names(live_workers(beats, now), registry(models, now))
        depths = {m: int(await state["redis"].xlen(names.queue(m))) for m in listed}
        return fleet_view(beats, models, depths, now)

    @app.get("/health")
    async def health() -> dict[str, str]:
        await state["redis"].ping()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


class _CompletionFastPath:
    """POST /v1/chat/completions and /v1/completions straight to the endpoint's handler.

    The framework's per-request routing, dependency solving and body handling cost about a
    fifth of a millisecond of CPU before the job is queued, on every first token's path. A
    request takes this path only when the framework would accept it: a JSON body (parsed and
    validated as the framework does) and a key that authorizes. Anything else (no or a wrong
    key, a body that does not validate, another content type) goes on to the framework's own
    route with its body, so every error keeps one source; the routes also give the OpenAPI
    schema. Errors of the handler itself reach the same error middleware either way.
    """

    def __init__(self, app: ASGIApp, run: Callable[..., Awaitable[Response]],
                 authorize: Callable[[str | None], Awaitable[str]], kick: Callable[[], None],
                 models: dict[str, tuple[type[BaseModel], str]]) -> None:
        self.app, self.run, self.authorize, self.models = app, run, authorize, models
        self.kick = kick  # busy polling: a request's reply is on its way

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.models.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        t0 = time.time()
        self.kick()
        headers = Headers(scope=scope)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                await self.app(scope, _received(b"", message, receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        model, kind = route
        try:
            if headers.get("content-type", "application/json").split(";")[0].strip() \
                    != "application/json":
                raise ValueError("not a JSON body")
            req = model.model_validate(json.loads(body))
            tenant_id = await self.authorize(headers.get("authorization"))
        except Exception:  # the framework's route answers it, as it would any error
            await self.app(scope, _received(body, None, receive), send)
            return
        response = await self.run(req, kind, tenant_id, headers.get("idempotency-key"))
        if trace.ON:  # the request's id is the response's: known only now
            trace.point("g_in", response.headers.get("x-request-id", ""), t0)
        await response(scope, receive, send)


def _received(body: bytes, first: Message | None, receive: Receive) -> Receive:
    """`receive` for an app downstream of one that read the request already: that body (or
    the message that ended the reading) once, then the real `receive`."""
    pending: list[Message] = [first or {"type": "http.request", "body": body,
                                        "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _job_kind(endpoint: str) -> tuple[str, Any]:
    if endpoint.rstrip("/") == "/v1/chat/completions":
        return "chat", ChatCompletionRequest
    if endpoint.rstrip("/") == "/v1/completions":
        return "completion", CompletionRequest
    raise BadRequestError("endpoint must be /v1/chat/completions or /v1/completions",
                          param="endpoint")


def _job_view(job_id: str, model: str, status: str, result: Any, created: float | None = None,
              started: float | None = None, finished: float | None = None) -> dict[str, Any]:
    """status: queued (no worker took it yet), running, cancelling, then completed, failed or
    cancelled. Times in Unix seconds, null while unknown: queue time is started_at - created_at."""
    return {"id": job_id, "object": "job", "model": model, "status": status, "result": result,
            "created_at": created, "started_at": started, "finished_at": finished}


def _respond(kind: str, req_id: str, model: str, completions: list[CompletionRecord],
             usage: Usage | None, created: int, tools: bool = False) -> dict[str, Any]:
    """`tools`: the request could call tools, so its text is read for tool calls."""
    build = chat_completion_response if kind == "chat" else completion_response
    response = build(request_id=req_id, model=model, completions=completions, usage=usage,
                     created=created)
    return tool_call_response(response) if tools and kind == "chat" else response


def _raise_unless_completed(record: RequestRecord) -> None:
    if record.status != "completed":
        raise error_from_type(record.error_type, record.error or f"request {record.status}")


def _record_response(kind: str, record: RequestRecord, *, tools: bool) -> dict[str, Any]:
    """The reply of a request that ended, from its record; its error if it did not complete."""
    _raise_unless_completed(record)
    return _respond(kind, record.id, record.model, record.completions, record.usage,
                    int(record.created), tools=tools)


async def _replay(record: RequestRecord, kind: str, req: Any) -> AsyncIterator[str]:
    """A finished request as a stream: one event per completion, then usage and [DONE]."""
    job = Job(id=record.id, model=record.model, kind=record.kind, created=record.created)
    offsets: dict[int, int] = {}
    tool_calls = ToolCallStream() if kind == "chat" and uses_tool_calls(req) else None
    for c in record.completions:
        ev = Event(req_id=record.id, index=c.index, seq=0, text=c.text, token_ids=c.token_ids,
                   finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        so_far = None
        if record.usage is not None and stream_continuous_usage(req):
            so_far = usage_so_far(record.usage.prompt_tokens, len(c.token_ids))
        chunks = _stream_chunks(ev, kind, job, offsets, first=True, usage=so_far)
        for chunk in tool_calls.rewrite(chunks) if tool_calls else chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    if record.usage is not None and stream_include_usage(req):
        chunk = usage_chunk(kind=kind, request_id=record.id, model=record.model,  # type: ignore[arg-type]
                            created=int(record.created), usage=record.usage)
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


class _TextLines:
    """The SSE line of a plain mid-stream text event (no logprobs, no finish, not a chat
    choice's first), from a template made once per choice by the general chunk builders:
    a `json.dumps` of the whole chunk object per token was the largest share of the gateway's
    CPU per token, and only the text changes between them."""

    _MARK = "__sluice_text__"

    def __init__(self, kind: str, job: Job) -> None:
        self.kind = kind
        self.job = job
        self._parts: dict[int, tuple[str, str]] = {}  # choice index -> text's surroundings

    def line(self, ev: Event, first: bool) -> str | None:
        if (not ev.text or ev.logprobs is not None or ev.finish_reason is not None
                or ev.usage is not None or (first and self.kind == "chat")):
            return None
        parts = self._parts.get(ev.index)
        if parts is None:
            ids: dict[str, Any] = {"request_id": self.job.id, "model": self.job.model,
                                   "created": int(self.job.created), "index": ev.index}
            chunk = chat_chunk(content=self._MARK, **ids) if self.kind == "chat" else \
                completion_chunk(text=self._MARK, **ids)
            head, _, tail = json.dumps(chunk).partition(json.dumps(self._MARK))
            parts = self._parts[ev.index] = (f"data: {head}", f"{tail}\n\n")
        return parts[0] + json.dumps(ev.text) + parts[1]


def _stream_chunks(ev: Event, kind: str, job: Job, offsets: dict[int, int], first: bool,
                   usage: Usage | None = None) -> list[dict[str, Any]]:
    created = int(job.created)
    if kind == "chat":
        return chat_event_chunks(ev, request_id=job.id, model=job.model, created=created,
                                 first=first, usage=usage)
    offset = offsets.get(ev.index, 0)
    offsets[ev.index] = offset + len(ev.text)
    return [completion_chunk(request_id=job.id, model=job.model, created=created,
                             index=ev.index, text=ev.text, logprobs=ev.logprobs,
                             text_offset=offset, finish_reason=ev.finish_reason,
                             stop_reason=ev.stop_reason, usage=usage)]


def _worker_error(ev: Event) -> SluiceError:
    return error_from_type(ev.error_type, ev.error or "the worker failed this request")
