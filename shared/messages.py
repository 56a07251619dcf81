"""What travels between gateway and workers: jobs in, events out, records at the end.

JSON on the wire; pydantic models at both ends. Nothing here imports torch.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Job(BaseModel):
    """One request, as queued on `names.queue(model)`. Validated at the gateway; trusted after."""

    model_config = ConfigDict(extra="forbid")

    id: str
    model: str
    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # completion given as text
    prompt_token_ids: list[int] | None = None  # completion given as token ids
    sampling: dict[str, Any] = Field(default_factory=dict)  # SamplingParams fields by name
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    echo: bool = False
    stream: bool = False
    reply_channel: str | None = None  # None: an async job, read back from its record
    priority: int = 0
    tenant: str = "default"
    created: float = Field(default_factory=time.time)
    deadline: float | None = None  # epoch seconds; a job past it is dropped with an error
    resume_from: int = 0  # tokens already streamed to the client by an earlier delivery
    # Structured output: llguidance grammar text, built and validated by the gateway; every
    # worker compiles it against its own tokenizer.
    grammar: str | None = None
    tools: list[dict[str, Any]] | None = None  # chat: for the template to show the model


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class Event(BaseModel):
    """One completion's progress in one engine step. `seq` is the index of its first token."""

    req_id: str
    index: int = 0
    seq: int
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    # Per token: {"token": str, "token_id": int, "logprob": float, "top": [[str, id, logprob]]}
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None
    # On a completion's first event: the prompt's length in tokens, so that a stream can carry
    # its usage so far on every chunk (stream_options.continuous_usage_stats).
    prompt_tokens: int | None = None
    error: str | None = None  # set with finish_reason "error"
    error_type: str | None = None  # e.g. "invalid_request_error" for input the worker rejected


class Reply(BaseModel):
    """One PUBLISH: every event of one step for one reply channel."""

    events: list[Event]


class CompletionRecord(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class RequestRecord(BaseModel):
    """Written to `names.request_record` when a request ends, before its job is acknowledged."""

    id: str
    model: str
    kind: Literal["chat", "completion"]
    status: Literal["completed", "failed", "cancelled"]
    created: float
    started: float | None = None  # when a worker first started it; None: it never ran
    finished: float
    prompt_token_ids: list[int] = Field(default_factory=list)
    completions: list[CompletionRecord] = Field(default_factory=list)
    usage: Usage | None = None
    error: str | None = None
    error_type: str | None = None


class Started(BaseModel):
    """Written to `names.started` by the worker that first takes a request."""

    worker_id: str
    started: float


class Cancel(BaseModel):
    req_id: str
