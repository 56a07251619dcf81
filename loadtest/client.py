"""One streaming request to an OpenAI-compatible server, timed chunk by chunk.

Plain httpx with the SSE parsed here: the `openai` SDK costs too much CPU per chunk to drive
hundreds of streams from one process. The timing follows `vllm bench serve`: TTFT is the first
chunk that carries choices, every later such chunk adds an inter-token gap, and the latency ends
at the last chunk. The output token count is the server's `usage.completion_tokens` (asked for
with `stream_options.include_usage`) or, when a server sends no usage, the number of chunks that
carry text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.datasets import SampleRequest

ENDPOINT_KINDS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


@dataclass
class ApiConfig:
    """Where and how requests go; `extra_body` is merged into every request body."""

    base_url: str
    endpoint: str = "/v1/completions"
    model: str = ""
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    include_usage: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def kind(self) -> str:
        try:
            return ENDPOINT_KINDS[self.endpoint]
        except KeyError:
            raise ValueError(f"unsupported endpoint {self.endpoint!r}; use one of "
                             f"{', '.join(ENDPOINT_KINDS)}") from None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, sample: SampleRequest, stream: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": sample.expected_output_len,
                                "temperature": self.temperature}
        if self.kind == "chat":
            if not isinstance(sample.prompt, str):
                raise ValueError("token-id prompts go to /v1/completions only")
            body["messages"] = [{"role": "user", "content": sample.prompt}]
        else:
            body["prompt"] = sample.prompt
        if stream:
            body["stream"] = True
            if self.include_usage:
                body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return {**body, **self.extra_body}


@dataclass
class RequestOutput:
    """What one request did. Times are seconds; `start_s` is from the start of the run,
    `chunk_times_s` from the request's own start."""

    prompt_len: int
    expected_output_len: int
    start_s: float = 0.0
    success: bool = False
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    chunk_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    text_chunks: int = 0  # chunks that carried text: the token count when no usage comes
    usage_reported: bool = False
    generated_text: str = ""
    error: str = ""  # a short reason class, e.g. "http_429", "timeout"; "" on success
    error_detail: str = ""


class StreamError(Exception):
    """A stream that broke its protocol or reported an error; `reason` classes it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _chunk_text(choice: dict[str, Any], kind: str) -> str:
    if kind == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def iter_sse_data(buffer: str) -> tuple[list[str], str]:
    """Complete `data:` payloads in `buffer` and the unfinished rest. Comments (keep-alives) and
    other fields are skipped; events are separated by a blank line."""
    buffer = buffer.replace("\r\n", "\n")
    *events, rest = buffer.split("\n\n")
    payloads = []
    for event in events:
        lines = [line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:")]
        if lines:
            payloads.append("\n".join(lines))
    return payloads, rest


class _Timeline:
    """Turns chunk arrivals into the output's TTFT, gaps and latency."""

    def __init__(self, out: RequestOutput, t_start: float) -> None:
        self.out = out
        self.t_start = t_start
        self.last = t_start

    def chunk(self, now: float, text: str) -> None:
        out = self.out
        if not out.chunk_times_s:
            out.ttft_s = now - self.t_start
        else:
            out.itl_s.append(now - self.last)
        out.chunk_times_s.append(now - self.t_start)
        out.generated_text += text
        out.text_chunks += bool(text)
        self.last = now


def handle_payload(payload: str, kind: str, timeline: _Timeline, now: float) -> bool:
    """Applies one SSE payload; True at `[DONE]`."""
    if payload.strip() == "[DONE]":
        return True
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        raise StreamError("bad_chunk", payload[:200]) from None
    if not isinstance(data, dict):
        raise StreamError("bad_chunk", payload[:200])
    if "error" in data:
        err = data["error"] if isinstance(data["error"], dict) else {"message": data["error"]}
        raise StreamError(f"stream_error_{err.get('type') or 'unknown'}",
                          str(err.get("message", ""))[:500])
    if choices := data.get("choices"):
        timeline.chunk(now, _chunk_text(choices[0], kind))
    usage = data.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        timeline.out.output_tokens = int(usage["completion_tokens"])
        timeline.out.usage_reported = True
    return False


async def send_request(client: httpx.AsyncClient, api: ApiConfig, sample: SampleRequest,
                       run_start: float) -> RequestOutput:
    """Sends `sample` as a streaming request and times it; never raises for a failed request."""
    out = RequestOutput(sample.prompt_len, sample.expected_output_len)
    t_start = time.perf_counter()
    out.start_s = t_start - run_start
    timeline = _Timeline(out, t_start)
    try:
        async with client.stream("POST", api.url, json=api.body(sample),
                                 headers=api.headers()) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")
                raise StreamError(f"http_{response.status_code}", detail[:500])
            buffer, done = "", False
            async for piece in response.aiter_text():
                now = time.perf_counter()
                payloads, buffer = iter_sse_data(buffer + piece)
                for payload in payloads:
                    done = handle_payload(payload, api.kind, timeline, now) or done
            if not done:
                raise StreamError("stream_cut", "the stream ended without data: [DONE]")
    except StreamError as exc:
        out.error, out.error_detail = exc.reason, exc.detail
    except httpx.TimeoutException as exc:
        out.error, out.error_detail = "timeout", f"{type(exc).__name__}: {exc}"
    except httpx.HTTPError as exc:
        out.error, out.error_detail = "connection", f"{type(exc).__name__}: {exc}"
    finish(out, timeline.last - t_start)
    return out


def finish(out: RequestOutput, latency_s: float) -> None:
    """Settles success, latency and token count once a request is over."""
    if not out.error and not out.chunk_times_s:
        out.error, out.error_detail = "no_tokens", "the stream carried no token chunk"
    out.success = not out.error
    out.latency_s = latency_s if out.chunk_times_s else 0.0
    if not out.usage_reported:
        # A chat stream's first chunk may carry only the role; it is timed (as vLLM times it)
        # but is no token.
        out.output_tokens = out.text_chunks
