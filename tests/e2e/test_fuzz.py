"""A fuzz test over the gateway's OpenAPI schema: no request gets a 5xx, and none hangs.

Requests are drawn from the document the running gateway serves at /openapi.json: bodies from its
request schemas (a small JSON-schema-to-hypothesis translation of the subset FastAPI writes), then
often mutated (required fields dropped, unknown fields, wrong JSON types, extreme and non-finite
numbers, deep nesting, lone surrogates, non-object bodies, broken JSON and UTF-8, odd content
types), with random path ids and missing or wrong credentials. An example is a short sequence of
requests that may share an Idempotency-Key or a request_id (never with another example's), may
resend an earlier request as it was, and may read back, wait for or cancel the jobs it created.
A second test resends one request as it was, as a client that retries does.
Every answer must be under 500 (an error event or a job error of type "server_error" counts as
one), carry the OpenAI error body when it is an error, and come within TIMEOUT_S; streams are
read to `data: [DONE]` or an error event; a job the gateway accepted must be found and must end
within TIMEOUT_S.

The service is real (Redis, a worker with the tiny model on the CPU, the gateway). Failures are
not shrunk: a hang costs TIMEOUT_S per attempt, and the failure message already shows every
request of the example and the service's logs.
"""

from __future__ import annotations

import asyncio
import json
import re
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

if TYPE_CHECKING:  # the `service` fixture comes from tests/e2e/conftest.py
    from conftest import Service

TIMEOUT_S = 30.0  # a request not answered (or a stream not finished) by then hangs
MAX_TOKENS = 8  # keeps the requests that are valid quick on the CPU

OPERATIONS = [
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs/{job_id}"),
    ("delete", "/v1/jobs/{job_id}"),
    ("get", "/v1/models"),
]

Strategy = st.SearchStrategy[Any]

# ---------------------------------------------------------------------------------------------
# JSON values

_LEAF: Strategy = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12))
ANY_JSON: Strategy = st.recursive(
    _LEAF, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)

# Placeholders replaced in the serialized body by text json.dumps cannot write (or should not).
_RAW = "\x00raw:{}\x00"


@dataclass(frozen=True)
class Raw:
    """JSON text spliced into a body as it is: deep nesting, NaN, numbers past float range."""

    text: str


def _encode(value: Any) -> bytes:
    """Like json.dumps, but `Raw` values go in verbatim (ASCII escapes kept for everything else,
    so a lone surrogate reaches the server as the valid JSON escape "\\ud800")."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return _RAW.format(len(raws) - 1)
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_RAW.format(i)), raw, 1)
    return text.encode()


def _nested(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


EXTREME_NUMBERS: list[Any] = [
    -1, 0, -(2**63) - 1, 2**63, 2**64 + 1, 10**30, -(10**30), 1e308, -1e308, 5e-324, -0.0, 3.5,
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("1" + "0" * 5000)]
# Integers at the edges of the widths an implementation might store them in.
EDGE_INTS = [2**k + d for k in (7, 8, 11, 15, 16, 31, 32, 53, 63, 64) for d in (-1, 0)]
ODD_STRINGS: list[Any] = [
    "", " ", "\x00", "\ud800", "a\udfffb", "\u202e", "😀" * 50, "x" * 20_000, "{{ 7*7 }}",
    "<|im_end|>", "%s%n", "../../etc/passwd", "\r\n\r\nX-Injected: 1"]


# ---------------------------------------------------------------------------------------------
# OpenAPI schema -> strategy


class Schemas:
    """Strategies for the JSON-schema subset of FastAPI's document: $ref into components,
    anyOf, enum, type (object/array/string/integer/number/boolean/null), properties, required,
    additionalProperties, items, minItems, minLength/maxLength/pattern, minimum/maximum."""

    # Fields that would make a valid request slow or useless for fuzzing get tamer values.
    OVERRIDES: ClassVar[dict[str, Callable[[Strategy], Strategy]]] = {
        "model": lambda s: _mostly(st.just("tiny"), s, 1),
        "max_tokens": lambda s: st.integers(1, MAX_TOKENS),
        "max_completion_tokens": lambda s: st.integers(1, MAX_TOKENS),
        "n": lambda s: st.one_of(st.integers(1, 3), st.integers(1, 3), s),
        "min_tokens": lambda s: st.one_of(st.integers(0, MAX_TOKENS), s),
        "content": lambda s: _mostly(st.text(max_size=40), st.one_of(s, st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
            max_size=2))),
        # Some prompts only the worker can refuse: empty, or token ids past the vocabulary (2048),
        # past 32 bits too.
        "prompt": lambda s: _mostly(
            st.one_of(st.text(min_size=1, max_size=40),
                      st.lists(st.integers(0, 2047), min_size=1, max_size=8)),
            st.one_of(s, st.just(""), st.lists(st.one_of(st.integers(2048, 2**40),
                                                         st.sampled_from(EDGE_INTS)),
                                               min_size=1, max_size=3)),
            3),
        "stop_token_ids": lambda s: st.one_of(
            st.lists(st.integers(0, 2100), max_size=3), s,
            st.lists(st.sampled_from(EDGE_INTS), min_size=1, max_size=2)),
        "top_logprobs": lambda s: st.one_of(st.integers(0, 5), s),
        "stream": lambda s: st.sampled_from([True, False, None]),
    }
    # max_tokens: absent on chat means "up to the context", too slow; content: a message's text;
    # request_id: often set, so that the requests of an example share one now and then.
    ALWAYS = frozenset({"max_tokens", "content", "stream", "request_id"})
    # Optional fields drawn more often than the rest: they change how a request runs.
    FAVOURED = frozenset({"stream", "stream_options", "n", "temperature", "top_p", "seed", "stop",
                          "logprobs", "top_logprobs", "echo", "ignore_eos", "min_tokens",
                          "request_id", "priority", "stop_token_ids", "body", "endpoint"})

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.components: dict[str, Any] = doc.get("components", {}).get("schemas", {})

    def __repr__(self) -> str:  # hypothesis prints it with every falsifying example
        return f"Schemas(<openapi.json: {len(self.doc['paths'])} paths>)"

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            prefix = "#/components/schemas/"
            assert schema["$ref"].startswith(prefix), schema["$ref"]
            schema = self.components[schema["$ref"].removeprefix(prefix)]
        return schema

    def strategy(self, schema: dict[str, Any], name: str | None = None) -> Strategy:
        schema = self.resolve(schema)
        base = self._strategy(schema)
        override = self.OVERRIDES.get(name or "")
        return override(base) if override else base

    def _strategy(self, schema: dict[str, Any]) -> Strategy:
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "anyOf" in schema:
            return st.one_of([self.strategy(s) for s in schema["anyOf"]])
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            return self._object(schema)
        if kind == "array":
            items = self.strategy(schema.get("items", {}))
            low = schema.get("minItems", 0)
            return st.lists(items, min_size=low, max_size=schema.get("maxItems", low + 3))
        if kind == "string":
            low, high = schema.get("minLength", 0), min(schema.get("maxLength", 40), 40)
            if "pattern" in schema:
                return st.from_regex(schema["pattern"], fullmatch=True).filter(
                    lambda s: low <= len(s) <= schema.get("maxLength", len(s)))
            return st.text(min_size=low, max_size=max(low, high))
        if kind == "integer":
            if "minimum" in schema or "maximum" in schema:
                return st.integers(schema.get("minimum"), schema.get("maximum"))
            return st.one_of(st.integers(-2, 16), st.integers())
        if kind == "number":
            return _mostly(st.one_of(st.sampled_from([0, 0.5, 1.0]), st.floats(0, 1)),
                           st.floats(allow_nan=False, allow_infinity=False))
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        # {}: any value. These are the fields the gateway names as unsupported; mostly null, so
        # that a request is not rejected for them every time.
        return _mostly(st.none(), ANY_JSON)

    def _object(self, schema: dict[str, Any]) -> Strategy:
        props: dict[str, Any] = schema.get("properties", {})
        if not props:
            extra = schema.get("additionalProperties", True)
            values = ANY_JSON if extra in (True, {}) else self.strategy(extra)
            return st.dictionaries(st.text(max_size=10), values, max_size=3)
        required = [p for p in props if p in schema.get("required", ()) or p in self.ALWAYS]
        favoured = [p for p in props if p not in required and p in self.FAVOURED]
        others = [p for p in props if p not in required and p not in self.FAVOURED]

        def build(chosen: tuple[list[str], list[str]]) -> Strategy:
            return st.fixed_dictionaries(
                {p: self.strategy(props[p], p) for p in [*required, *chosen[0], *chosen[1]]})

        def some(names: list[str], most: int) -> Strategy:
            return (st.lists(st.sampled_from(names), unique=True, max_size=most) if names
                    else st.just([]))

        # A few optional fields at a time: all of them at once would almost never be valid.
        return st.tuples(some(favoured, 4), some(others, 2)).flatmap(build)

    def body(self, path: str, method: str = "post") -> dict[str, Any]:
        """The request body's schema of an operation."""
        op = self.doc["paths"][path][method]
        return op["requestBody"]["content"]["application/json"]["schema"]


# ---------------------------------------------------------------------------------------------
# Mutations


def _other_type(schema: dict[str, Any], schemas: Schemas) -> Strategy:
    """A JSON value of a type the schema does not allow (any value when it allows all)."""
    schema = schemas.resolve(schema)
    allowed = {schemas.resolve(s).get("type") for s in schema.get("anyOf", [schema])}
    if None in allowed:  # an untyped branch takes anything
        return ANY_JSON
    by_type: dict[str, Strategy] = {
        "string": st.text(max_size=5), "integer": st.integers(), "boolean": st.booleans(),
        "number": st.floats(-1e6, 1e6).filter(lambda x: not x.is_integer()),
        "null": st.none(), "array": st.lists(_LEAF, max_size=2),
        "object": st.dictionaries(st.text(max_size=5), _LEAF, max_size=2)}
    if "number" in allowed:
        allowed.add("integer")  # a JSON integer is a valid number
    return st.sampled_from(sorted(set(by_type) - allowed)).flatmap(by_type.__getitem__)


@st.composite
def mutated(draw: st.DrawFn, schema: dict[str, Any], schemas: Schemas,
            clean: bool = False) -> dict[str, Any]:
    """A body for `schema`: valid by its shape (always when `clean`), or one field away from it,
    several times over."""
    body = draw(schemas.strategy(schema))
    schema = schemas.resolve(schema)
    props: dict[str, Any] = schema.get("properties", {})
    for _ in range(0 if clean else draw(st.sampled_from([0, 1, 1, 2]))):
        how = draw(st.sampled_from(["drop", "unknown", "type", "number", "string", "nest",
                                    "inner"]))
        key = draw(st.sampled_from(sorted(props)))
        if how == "drop" and schema.get("required"):
            body.pop(draw(st.sampled_from(schema["required"])), None)
        elif how == "unknown":
            body[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in props))] = draw(
                ANY_JSON)
        elif how == "type":
            body[key] = draw(_other_type(props[key], schemas))
        elif how == "number":
            body[key] = draw(st.sampled_from(EXTREME_NUMBERS))
        elif how == "string":
            body[key] = draw(st.sampled_from(ODD_STRINGS))
        elif how == "nest":
            body[key] = _nested(draw(st.sampled_from([64, 1_000, 100_000])),
                                draw(st.sampled_from(["list", "dict"])))
        elif how == "inner" and isinstance(body.get(key), list | dict) and body[key]:
            # One level down: a message's fields, a prompt's token ids, a job's inner body.
            inner = body[key]
            slot = draw(st.sampled_from(list(range(len(inner))) if isinstance(inner, list)
                                        else sorted(inner)))
            inner[slot] = draw(st.one_of(st.sampled_from(EXTREME_NUMBERS + ODD_STRINGS), ANY_JSON,
                                         st.just(_nested(10_000, "list"))))
    return body


# Whole bodies that are not a JSON object, or not JSON, or not UTF-8.
BAD_BODIES: Strategy = st.one_of(
    ANY_JSON.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b'{"model": "tiny"', b'{"model": "\xff\xfe"}', b"\xef\xbb\xbf{}",
                     b'{"a": 1, "a": 2}', b"[" * 100_000, b'{"model": NaN}', b"nul",
                     b'"\\ud800"', b"\x00" * 16, "{}".encode("utf-16")]),
)

ODD_CONTENT_TYPES = ["application/json; charset=utf-8", "application/json; charset=latin-1",
                     "text/plain", None, "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x", "application/merge-patch+json"]


def _mostly(usual: Strategy, odd: Strategy, odd_in_ten: int = 2) -> Strategy:
    """`usual` but for about `odd_in_ten` times in ten: most requests should pass the first
    check. (0 is odd's never: hypothesis draws the simplest value more often than the rest.)"""
    return st.integers(0, 9).flatmap(lambda i: odd if 0 < i <= odd_in_ten else usual)


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, Any]
    content: bytes | None = None

    def __repr__(self) -> str:
        content = self.content if self.content is None or len(self.content) < 600 else (
            self.content[:300] + b"..." + self.content[-100:] + b" (%d bytes)" % len(self.content))
        return f"{self.method.upper()} {self.path} headers={self.headers!r} body={content!r}"


@dataclass
class State:
    """One example's own: the job ids it may read back, the prefix of its idempotency keys
    and request ids (so that examples do not depend on one another through the service)."""

    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    job_ids: list[str] = field(default_factory=list)


def _auth(service: Service) -> Strategy:
    good = {"Authorization": f"Bearer {service.api_key}"}
    return _mostly(st.just(good), st.one_of(
        st.sampled_from([{}, {"Authorization": ""}, {"Authorization": "Bearer"},
                         {"Authorization": "Bearer wrong"}, {"Authorization": service.api_key},
                         {"Authorization": f"bearer {service.api_key}"},
                         {"Authorization": f"Basic {service.api_key}"},
                         {"Authorization": b"Bearer \xff\xfe"},
                         {"Authorization": f"Bearer {service.api_key}x"}]),
        st.text(string.printable.strip(), max_size=30).map(lambda t: {"Authorization": t})), 3)


ODD_JOB_IDS: Strategy = st.one_of(
    st.text(max_size=30).filter(bool).map(lambda s: quote(s, safe="")),
    st.sampled_from(["job-" + "0" * 32, "%00", "..", "%2e%2e", "%2F", "a%2Fb", "~", "x" * 2000,
                     "%ff%fe", "job-%00"]),
    st.from_regex(r"job-[0-9a-f]{32}", fullmatch=True))


@st.composite
def calls(draw: st.DrawFn, service: Service, schemas: Schemas, state: State) -> Call:
    """One request. What is drawn does not depend on what the service answered earlier (only
    which job ids there are to read back does), so a seed always makes the same requests."""
    method, path = draw(st.sampled_from(OPERATIONS + OPERATIONS[:3]))  # the POSTs twice as often
    job_method = draw(st.sampled_from(["get", "delete"]))
    prefer_job, known, index = draw(st.integers(0, 9)), draw(st.integers(0, 9)), draw(
        st.integers(0, 15))
    # Half the requests are clean: the right key, JSON, a body of the schema's shape (its values
    # may still be out of range); the other half may be wrong in any of the ways listed at the
    # top of this module.
    clean = draw(st.booleans())
    headers = service.auth() if clean else dict(draw(_auth(service)))
    odd_id = draw(ODD_JOB_IDS)
    post = draw(posts(method, path, headers, schemas, state, clean)) if method == "post" \
        else None
    if state.job_ids and prefer_job < 5:  # often read back or cancel a job this example made
        method, path = job_method, "/v1/jobs/{job_id}"
    if "{job_id}" in path:
        job_id = state.job_ids[index % len(state.job_ids)] if state.job_ids and known >= 2 \
            else odd_id
        return Call(method, path.replace("{job_id}", job_id), headers)
    return post or Call(method, path, headers)


@st.composite
def posts(draw: st.DrawFn, method: str, path: str, auth: dict[str, Any], schemas: Schemas,
          state: State, clean: bool) -> Call:
    """A POST with a body: from the operation's schema, often mutated, or not JSON at all."""
    headers = dict(auth)
    key = draw(st.sampled_from([None, None, "a", "b"]))
    if key is not None:  # shared by the example's requests, never with other examples'
        headers["Idempotency-Key"] = f"{state.nonce}-{key}"
    content_type = "application/json" if clean else draw(_mostly(
        st.just("application/json"), st.sampled_from(ODD_CONTENT_TYPES)))
    if content_type is not None:
        headers["Content-Type"] = content_type
    schema = schemas.body(path, method)
    if not clean and draw(st.integers(0, 4)) == 1:
        return Call(method, path, headers, draw(BAD_BODIES))
    if path == "/v1/jobs":
        endpoint = draw(_mostly(
            st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
            st.one_of(st.sampled_from(["/v1/completions/", "/v1/jobs", "", "v1/completions",
                                       "/v1/models", "/V1/COMPLETIONS"]), st.text(max_size=20))))
        inner = draw(mutated(schemas.body(
            endpoint if endpoint in ("/v1/chat/completions", "/v1/completions")
            else draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))), schemas,
            clean))
        if draw(_mostly(st.just(True), st.just(False))):
            inner.pop("stream", None)  # a job cannot stream
        body = draw(mutated(schema, schemas, clean))
        if "body" in body and draw(_mostly(st.just(True), st.just(False), 1)):
            body["body"] = inner
        if "endpoint" in body and draw(_mostly(st.just(True), st.just(False), 1)):
            body["endpoint"] = endpoint
    else:
        body = draw(mutated(schema, schemas, clean))
    for request in (body, body.get("body")):
        # Client-chosen request ids, like idempotency keys, are shared within the example only.
        if isinstance(request, dict) and isinstance(request.get("request_id"), str) and \
                re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", request["request_id"]):
            request["request_id"] = f"{state.nonce}-{draw(st.sampled_from('aab'))}"
    return Call(method, path, headers, _encode(body))


# ---------------------------------------------------------------------------------------------
# Running one request and judging the answer


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes
    events: list[str] | None = None  # the data: payloads of a stream, in order


async def _send(client: httpx.AsyncClient, call: Call) -> Answer:
    async with client.stream(call.method.upper(), call.path, headers=call.headers,
                             content=call.content) as r:
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            return Answer(r.status_code, r.headers, await r.aread())
        events = [line.removeprefix("data:").strip() async for line in r.aiter_lines()
                  if line.startswith("data:")]
        return Answer(r.status_code, r.headers, b"", events)


def _error_shape(payload: Any) -> str | None:
    """None if `payload` is an OpenAI error body, else what is wrong with it."""
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return f"not an OpenAI error body: {payload!r:.300}"
    error = payload["error"]
    if not isinstance(error.get("message"), str) or not isinstance(error.get("type"), str):
        return f"error without a string message and type: {error!r:.300}"
    return None


def _judge(call: Call, answer: Answer) -> str | None:
    """None if the answer is acceptable, else why not."""
    if answer.status >= 500:
        return f"status {answer.status}: {answer.body[:500]!r}"
    if 300 <= answer.status < 400:  # the framework's trailing-slash redirect ("/v1/jobs/%2F")
        return None if "location" in answer.headers else f"a {answer.status} without Location"
    if answer.events is not None:
        if answer.status != 200:
            return f"a stream with status {answer.status}"
        if not answer.events:
            return "a stream without a single data: event"
        for i, event in enumerate(answer.events):
            last = i == len(answer.events) - 1
            if event == "[DONE]":
                if not last:
                    return f"events after [DONE]: {answer.events[i + 1:]!r:.300}"
                continue
            try:
                payload = json.loads(event)
            except ValueError:
                return f"a data: event that is not JSON: {event!r:.300}"
            if isinstance(payload, dict) and "error" in payload:
                problem = _error_shape(payload)
                if problem:
                    return f"stream error event: {problem}"
                if payload["error"]["type"] == "server_error":  # a 500 inside a stream
                    return f"stream ended with a server error: {payload!r:.500}"
                if not last:
                    return "events after an error event"
            elif last:
                return f"a stream that stops without [DONE] or an error: {event!r:.300}"
        return None
    try:
        payload = json.loads(answer.body)
    except ValueError:
        return f"status {answer.status} with a body that is not JSON: {answer.body[:300]!r}"
    if answer.status >= 400:
        return _error_shape(payload)
    if not isinstance(payload, dict):
        return f"status {answer.status} with a body that is not an object: {payload!r:.300}"
    if call.path.startswith("/v1/jobs/"):
        expected = {"id", "status"}
        if "error" in payload:  # a job that failed
            problem = _error_shape(payload)
            if problem is not None:
                return f"job view: {problem}"
            if payload["error"]["type"] == "server_error":  # a 500 inside a job
                return f"job failed with a server error: {payload!r:.500}"
    else:
        expected = {
            "/v1/chat/completions": {"choices", "usage"}, "/v1/completions": {"choices", "usage"},
            "/v1/jobs": {"id", "status"}, "/v1/models": {"data"}}[call.path]
    if not expected <= payload.keys():
        return f"status {answer.status} without {sorted(expected)}: {payload!r:.300}"
    return None


# ---------------------------------------------------------------------------------------------
# The test


@pytest.fixture(scope="module")
def schemas(service: Service) -> Schemas:
    """The gateway's own OpenAPI document, as served."""
    r = httpx.get(f"{service.base_url}/openapi.json", timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    return Schemas(r.json())


def test_openapi_document_covers_the_api(schemas: Schemas) -> None:
    for method, path in OPERATIONS:
        assert method in schemas.doc["paths"].get(path, {}), f"{method.upper()} {path} missing"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/jobs"):
        body = schemas.resolve(schemas.body(path))
        assert body["type"] == "object" and body["required"], path


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_fuzzed_requests_get_no_500_and_no_hang(service: Service, schemas: Schemas,
                                                data: st.DataObject) -> None:
    state = State()
    sequence: list[Call] = []

    async def wait_for_job(client: httpx.AsyncClient, job_id: str) -> None:
        """Reads the job back until it ends: one that never does is a hang too."""
        call = Call("get", f"/v1/jobs/{job_id}", service.auth())
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            answer = await _send(client, call)
            problem = _judge(call, answer)
            assert problem is None, f"{problem}\nrequest: {call!r}"
            status = json.loads(answer.body)["status"]
            if status not in ("queued", "running", "cancelling"):
                note(f"job {job_id} ended {status}")
                return
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {status} after {TIMEOUT_S:g} s (a hang); made "
                            f"by {sequence[-1]!r}\n--- worker log ---\n"
                            f"{service.log_tail('worker', 3000)}")
            await asyncio.sleep(0.05)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=service.base_url,
                                     timeout=httpx.Timeout(TIMEOUT_S)) as client:
            for step in range(data.draw(st.integers(1, 3), label="requests")):
                # Drawn one at a time: a later request may read back a job an earlier one made.
                call = data.draw(calls(service, schemas, state), label=f"request {step}")
                again = data.draw(st.integers(0, 9), label="resend an earlier request if < 2")
                if sequence and again < 2:  # as a client retrying would
                    call = sequence[data.draw(st.integers(0, 2)) % len(sequence)]
                sequence.append(call)
                t0 = time.monotonic()
                try:
                    answer = await asyncio.wait_for(_send(client, call), TIMEOUT_S)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    pytest.fail(f"no answer within {TIMEOUT_S:g} s (a hang) to {call!r}\n"
                                f"earlier requests of this example: {sequence[:-1]!r}\n"
                                f"--- gateway log ---\n{service.log_tail('gateway')}\n"
                                f"--- worker log ---\n{service.log_tail('worker', 3000)}")
                note(f"answer {step}: {answer.status} in {time.monotonic() - t0:.2f} s: "
                     f"{(answer.body or repr(answer.events).encode())[:300]!r}")
                route = "/v1/jobs/{id}" if call.path.startswith("/v1/jobs/") else call.path
                event(f"{call.method.upper()} {route} -> {answer.status}"
                      + (" (stream)" if answer.events is not None else ""))
                problem = _judge(call, answer)
                if problem is not None:
                    pytest.fail(f"{problem}\nrequest: {call!r}\n"
                                f"earlier requests of this example: {sequence[:-1]!r}\n"
                                f"--- gateway log ---\n{service.log_tail('gateway')}\n"
                                f"--- worker log ---\n{service.log_tail('worker', 3000)}")
                known = call.path.removeprefix("/v1/jobs/") in state.job_ids
                if known and answer.status == 404 and call.headers == service.auth():
                    pytest.fail(f"a job the gateway accepted (202) is not found: {call!r}\n"
                                f"requests of this example: {sequence!r}")
                wait = data.draw(st.booleans(), label="wait for it if it is a job")
                if call.path == "/v1/jobs" and answer.status == 202:
                    job_id = json.loads(answer.body)["id"]
                    state.job_ids.append(job_id)
                    if wait:
                        await wait_for_job(client, job_id)

    asyncio.run(main())


@pytest.fixture
def still_serving(service: Service) -> Service:
    """The service, once it answered a plain completion: fails at once, saying why, when an
    earlier test of this module left it unable to answer. (Function-scoped: hypothesis runs it
    once for all the examples of a test.)"""
    try:
        r = httpx.post(f"{service.base_url}/v1/completions", headers=service.auth(), timeout=10,
                       json={"model": "tiny", "prompt": "still there?", "max_tokens": 1})
    except httpx.TimeoutException:
        pytest.fail("the service no longer answers a plain completion: an earlier test of this "
                    f"module broke it (see its failure)\n--- worker log ---\n"
                    f"{service.log_tail('worker', 3000)}")
    assert r.status_code == 200, r.text
    return service


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_a_resent_request_is_answered_too(still_serving: Service, schemas: Schemas,
                                          data: st.DataObject) -> None:
    """A client that retries sends the same body again: the same request_id, the same
    Idempotency-Key. The second answer must come as surely as the first, whatever the first was."""
    service = still_serving
    state = State()
    method, path = data.draw(st.sampled_from(OPERATIONS[:3]), label="operation")
    call = data.draw(posts(method, path, service.auth(), schemas, state, clean=True),
                     label="request")
    if data.draw(st.booleans(), label="with an Idempotency-Key"):
        call.headers["Idempotency-Key"] = f"{state.nonce}-a"

    async def main() -> None:
        async with httpx.AsyncClient(base_url=service.base_url,
                                     timeout=httpx.Timeout(TIMEOUT_S)) as client:
            for attempt in ("first", "resent"):
                try:
                    answer = await asyncio.wait_for(_send(client, call), TIMEOUT_S)
                except asyncio.TimeoutError:
                    pytest.fail(f"no answer within {TIMEOUT_S:g} s (a hang) to the {attempt} "
                                f"{call!r}\n--- gateway log ---\n{service.log_tail('gateway')}\n"
                                f"--- worker log ---\n{service.log_tail('worker', 3000)}")
                note(f"{attempt}: {answer.status}: "
                     f"{(answer.body or repr(answer.events).encode())[:300]!r}")
                event(f"{method.upper()} {path}, {attempt} -> {answer.status}")
                problem = _judge(call, answer)
                assert problem is None, f"{problem}\n{attempt} request: {call!r}"

    asyncio.run(main())
