"""The OpenAI wire format: request models, their mapping to a `Job`, and response builders.

Requests are checked in two steps. The pydantic models check shape and types (and reject every
field that would change the result but is not implemented, naming it); `to_job` checks values,
through `SamplingParams`, so ranges are defined once, by the engine. Both steps raise errors the
gateway answers with a 400: `RequestValidationError` / `ValidationError` from the models,
`BadRequestError` from `to_job`.

Nothing here imports torch: `worker.engine.sampling_params` is plain Python.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.structured import asks_for_grammar, request_grammar, uses_tool_calls
from shared.errors import BadRequestError
from shared.messages import CompletionRecord, Event, Job, Usage
from worker.engine.errors import InvalidSamplingParamsError
from worker.engine.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 128  # completions per request, as the OpenAI API caps it; more is a denial of service
MAX_TEMPERATURE = 2.0  # the OpenAI API's cap; the engine itself would take any temperature >= 0
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the legacy completions endpoint's documented default
# Logprobs are floats in JSON; -inf is not valid JSON, so very unlikely tokens are clamped.
MIN_LOGPROB = -9999.0
_INT64 = (-(2**63), 2**63 - 1)  # seeds are int64 in the OpenAI API and in torch generators

# Fields that would change the result but are not implemented, with the reason the client sees.
# Sending one is an error, never silently ignored; null (and the values in _NOOP) mean "not used".
_FUNCTIONS_OLD = "not supported; use tools and tool_choice"
_UNSUPPORTED: dict[str, str] = {
    "logit_bias": "not supported",
    "functions": _FUNCTIONS_OLD,
    "function_call": _FUNCTIONS_OLD,
    "audio": "not supported; audio input and output are not supported",
    "modalities": 'not supported; only ["text"] is',
    "prediction": "not supported",
    "web_search_options": "not supported",
    "reasoning_effort": "not supported; use chat_template_kwargs for templates with a thinking "
                        "switch",
    "verbosity": "not supported",
    "suffix": "not supported",
    "length_penalty": "not supported; beam search is not implemented",
    "use_beam_search": "not supported; beam search is not implemented",
    "truncate_prompt_tokens": "not supported",
    "prompt_logprobs": "not supported",
    "allowed_token_ids": "not supported",
    "bad_words": "not supported",
    "return_tokens_as_token_ids": "not supported",
    "return_token_ids": "not supported",
    "continue_final_message": "not supported",
}
# Values of those fields that change nothing, so clients that always send them keep working.
_NOOP: dict[str, list[Any]] = {
    "logit_bias": [{}],
    "functions": [[]],
    "function_call": ["none"],
    "modalities": [["text"]],
    "suffix": [""],
    "use_beam_search": [False],
    "return_tokens_as_token_ids": [False],
    "return_token_ids": [False],
    "continue_final_message": [False],
}


def _reject_unsupported(value: Any, info: ValidationInfo) -> None:
    name = info.field_name or ""
    if value is None or value in _NOOP.get(name, ()):
        return None
    raise PydanticCustomError("unsupported_field", _UNSUPPORTED[name])


# A field Sluice recognizes but does not implement: null or a no-op value, else an error.
Unsupported = Annotated[Any, AfterValidator(_reject_unsupported)]


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not true, as in the OpenAI API; a JSON integer still
    # fills a float field.
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------------------------------------
# Requests


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # A string, or a list of text parts joined into one string (see _join_text_parts).
    content: str | None = None
    name: str | None = None
    tool_call_id: str | None = None
    # What clients send back when they replay an assistant message they received.
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls, replayed
    function_call: Unsupported = None
    audio: Unsupported = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("content_type",
                                      "must be a string or a list of text parts")
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise PydanticCustomError(
                    "content_part", "part {i} must be an object like "
                    '{{"type": "text", "text": "..."}}', {"i": i})
            kind = part.get("type")
            if kind != "text":
                raise PydanticCustomError(
                    "content_part", "part {i} has type {kind}; only text parts are supported",
                    {"i": i, "kind": repr(kind)})
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise PydanticCustomError(
                    "content_part", 'part {i} must be {{"type": "text", "text": <string>}}',
                    {"i": i})
            texts.append(part["text"])
        # Parts are separate paragraphs of one message; a newline keeps words from fusing.
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError("content_missing",
                                      "content is required for role {role}",
                                      {"role": repr(self.role)})
        return self

    def to_job_message(self) -> dict[str, Any]:
        # Templates know "system"; "developer" is the OpenAI API's newer name for it.
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format; "structural_tag" takes vLLM's structures and triggers."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: exactly one constraint, plus JSON whitespace options."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, or GBNF/EBNF
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: any object
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class _Common(_Strict):
    """Fields both endpoints take. null means "the default" for every one of them."""

    model: str
    n: int | None = None
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Accepted and ignored: they cannot change the result.
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    store: bool | None = None

    # Extras under their usual serving names.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = None  # lower runs first
    # Chosen by the client. It may end up in Redis keys and response ids, hence the tame alphabet.
    request_id: str | None = Field(default=None, min_length=1, max_length=128,
                                   pattern=r"^[A-Za-z0-9_.:-]+$")

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Deprecated names of structured_outputs' fields: honored, with a deprecation header.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_json_object: bool | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    logit_bias: Unsupported = None
    length_penalty: Unsupported = None
    use_beam_search: Unsupported = None
    truncate_prompt_tokens: Unsupported = None
    prompt_logprobs: Unsupported = None
    allowed_token_ids: Unsupported = None
    bad_words: Unsupported = None
    return_tokens_as_token_ids: Unsupported = None
    return_token_ids: Unsupported = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if value is not None and not isinstance(value, list):
            raise PydanticCustomError("stop_type", "must be a string or a list of strings")
        return value


class ChatCompletionRequest(_Common):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call
    functions: Unsupported = None
    function_call: Unsupported = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None
    reasoning_effort: Unsupported = None
    verbosity: Unsupported = None
    continue_final_message: Unsupported = None


class CompletionRequest(_Common):
    """Body of POST /v1/completions. One prompt per request."""

    # A string or token ids; a list holding one of those is unwrapped (see _one_prompt).
    prompt: str | list[int]
    # Left out: the documented default of 16; an explicit null: up to the model's context.
    max_tokens: int | None = COMPLETION_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool | None = None

    suffix: Unsupported = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) > 1:
                raise PydanticCustomError(
                    "several_prompts", "several prompts in one request are not supported; "
                    "send one prompt per request")
            value = value[0]  # ["text"] or [[1, 2, 3]]: one prompt in a batch of one
        return _prompt(value)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise PydanticCustomError("prompt_type", "must be a string or a list of token ids")
    if not value:
        raise PydanticCustomError("prompt_empty", "must not be empty")
    # At C speed first (a long token-id prompt is checked on the event loop): exact ints only,
    # so no bools, none negative.
    if set(map(type, value)) == {int} and min(value) >= 0:
        return value
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise PydanticCustomError("prompt_tokens", "token ids must be non-negative integers")
    return value


Request = ChatCompletionRequest | CompletionRequest


# ---------------------------------------------------------------------------------------------
# Requests to jobs


def stream_include_usage(req: Request) -> bool:
    """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def stream_continuous_usage(req: Request) -> bool:
    """Whether every chunk of a stream carries usage so far (stream_options.continuous_usage_stats)."""
    return bool(req.stream and req.stream_options and req.stream_options.continuous_usage_stats)


def _max_tokens(req: Request) -> int | None:
    if isinstance(req, CompletionRequest):
        return req.max_tokens
    given = req.max_completion_tokens
    if given is not None and req.max_tokens is not None and given != req.max_tokens:
        raise BadRequestError(
            f"max_tokens ({req.max_tokens}) and max_completion_tokens ({given}) differ; "
            "send one of them", param="max_completion_tokens")
    return given if given is not None else req.max_tokens  # None: up to the context


def _logprobs(req: Request) -> int | None:
    if isinstance(req, CompletionRequest):
        return req.logprobs
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise BadRequestError("top_logprobs requires logprobs to be true",
                                  param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise BadRequestError(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def _check_openai_limits(req: Request, n: int) -> None:
    """Limits the OpenAI API sets beyond what the engine needs."""
    if req.temperature is not None and not 0 <= req.temperature <= MAX_TEMPERATURE:
        raise BadRequestError(
            f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {req.temperature!r}",
            param="temperature")
    if n > MAX_N:
        raise BadRequestError(f"n must be <= {MAX_N}, got {n}", param="n")
    if req.best_of is not None and req.best_of != n:
        raise BadRequestError("best_of is not supported (other than equal to n)",
                              param="best_of")
    if req.seed is not None and not _INT64[0] <= req.seed <= _INT64[1]:
        raise BadRequestError("seed must fit in a signed 64-bit integer", param="seed")
    if req.stream_options is not None and not req.stream:
        raise BadRequestError("stream_options is only allowed when stream is true",
                              param="stream_options")
    if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
        raise BadRequestError("echo together with logprobs is not supported", param="echo")


_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params(req: Request) -> dict[str, Any]:
    """The request's sampling settings, validated, keyed by `SamplingParams` field names."""
    n = 1 if req.n is None else req.n
    _check_openai_limits(req, n)

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    try:
        params = SamplingParams(
            n=n,
            temperature=given(req.temperature, 1.0),
            top_p=given(req.top_p, 1.0),
            top_k=given(req.top_k, 0),
            min_p=given(req.min_p, 0.0),
            presence_penalty=given(req.presence_penalty, 0.0),
            frequency_penalty=given(req.frequency_penalty, 0.0),
            repetition_penalty=given(req.repetition_penalty, 1.0),
            seed=req.seed,
            max_tokens=_max_tokens(req),
            min_tokens=given(req.min_tokens, 0),
            stop=given(req.stop, []),
            stop_token_ids=given(req.stop_token_ids, []),
            include_stop_str_in_output=given(req.include_stop_str_in_output, False),
            ignore_eos=given(req.ignore_eos, False),
            logprobs=_logprobs(req),
            skip_special_tokens=given(req.skip_special_tokens, True),
            spaces_between_special_tokens=given(req.spaces_between_special_tokens, True),
        )
    except InvalidSamplingParamsError as e:
        raise BadRequestError(str(e), param=e.param) from e
    # From the validated object, so normalizations (top_k -1 -> 0) travel with the job. A shallow
    # copy: its values are numbers, strings and lists of them, and `asdict`'s deep copy cost
    # more than the rest of the request's validation.
    return {name: getattr(params, name) for name in _SAMPLING_FIELDS}


def to_job(req: Request, *, model: str, request_id: str, tenant: str,
           reply_channel: str | None, deadline: float | None) -> Job:
    """The job a worker runs for `req`. Raises `BadRequestError` for values out of range.

    `model` is the resolved model name (not necessarily `req.model`); `request_id` is the id the
    gateway chose (it may come from `req.request_id`).
    """
    common: dict[str, Any] = {
        "id": request_id, "model": model, "sampling": sampling_params(req),
        "stream": bool(req.stream), "reply_channel": reply_channel,
        "priority": req.priority or 0, "tenant": tenant, "deadline": deadline,
        "grammar": request_grammar(req),
    }
    if isinstance(req, ChatCompletionRequest):
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        return Job(kind="chat", messages=[m.to_job_message() for m in req.messages],
                   tools=tools if tools and uses_tool_calls(req) else None,
                   add_generation_prompt=(True if req.add_generation_prompt is None
                                          else req.add_generation_prompt),
                   chat_template_kwargs=req.chat_template_kwargs or {}, **common)
    if isinstance(req.prompt, str):
        return Job(kind="completion", prompt=req.prompt, echo=bool(req.echo), **common)
    return Job(kind="completion", prompt_token_ids=list(req.prompt), echo=bool(req.echo),
               **common)


async def to_job_off_loop(req: Request, **kwargs: Any) -> Job:
    """`to_job`, with a request that asks for a grammar built on a worker thread: compiling
    and validating a large schema takes milliseconds that the event loop must not wait out."""
    if asks_for_grammar(req):
        return await asyncio.to_thread(to_job, req, **kwargs)
    return to_job(req, **kwargs)


# ---------------------------------------------------------------------------------------------
# Responses


def _prefixed(prefix: str, request_id: str) -> str:
    # Gateways may already name requests "chatcmpl-..."; the prefix is not doubled then.
    return request_id if request_id.startswith(prefix) else prefix + request_id


def chat_completion_id(request_id: str) -> str:
    return _prefixed("chatcmpl-", request_id)


def completion_id(request_id: str) -> str:
    return _prefixed("cmpl-", request_id)


def completions_from_events(events: Sequence[Event]
                            ) -> tuple[list[CompletionRecord], Usage | None]:
    """Folds a request's events (each delivered once) into one record per choice, plus the last
    usage reported, for `chat_completion_response` / `completion_response`."""
    # Pieces per choice, joined once at the end: adding to one string or list per event would
    # copy the whole reply again for every step.
    texts: dict[int, list[str]] = {}
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list[dict[str, Any]]] = {}
    ends: dict[int, tuple[str, int | str | None]] = {}
    usage = None
    for ev in sorted(events, key=lambda e: (e.index, e.seq)):
        texts.setdefault(ev.index, []).append(ev.text)
        tokens.setdefault(ev.index, []).extend(ev.token_ids)
        if ev.logprobs is not None:
            logprobs.setdefault(ev.index, []).extend(ev.logprobs)
        if ev.finish_reason is not None:
            ends[ev.index] = (ev.finish_reason, ev.stop_reason)
        usage = ev.usage or usage
    records = []
    for i in sorted(texts):
        finish_reason, stop_reason = ends.get(i, (None, None))
        records.append(CompletionRecord(index=i, text="".join(texts[i]), token_ids=tokens[i],
                                        logprobs=logprobs.get(i), finish_reason=finish_reason,
                                        stop_reason=stop_reason))
    return records, usage


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _logprob(value: Any) -> float:
    value = float(value)
    return value if value >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN, which fails >=


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Event/record logprob entries in the chat shape: {"content": [...]}."""
    return {"content": [
        {"token": e["token"], "logprob": _logprob(e["logprob"]), "bytes": _token_bytes(e["token"]),
         "top_logprobs": [{"token": tok, "logprob": _logprob(lp), "bytes": _token_bytes(tok)}
                          for tok, _tid, lp in e.get("top", [])]}
        for e in entries]}


def completion_logprobs(entries: Sequence[dict[str, Any]], *, text_offset: int = 0
                        ) -> dict[str, Any]:
    """Entries in the completions shape. `text_offset` is where the first token starts in the
    choice's text (streams carry it over from chunk to chunk)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for e in entries:
        # The API promises the sampled token among the top ones, even when it ranks lower.
        top = {tok: _logprob(lp) for tok, _tid, lp in e.get("top", [])}
        top.setdefault(e["token"], _logprob(e["logprob"]))
        tokens.append(e["token"])
        token_logprobs.append(_logprob(e["logprob"]))
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def _now() -> int:
    return int(time.time())


def chat_completion_response(*, request_id: str, model: str,
                             completions: Sequence[CompletionRecord], usage: Usage | None,
                             created: int | None = None) -> dict[str, Any]:
    """A whole chat completion (object "chat.completion")."""
    return {
        "id": chat_completion_id(request_id), "object": "chat.completion",
        "created": _now() if created is None else created, "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None if c.logprobs is None else chat_logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        } for c in sorted(completions, key=lambda c: c.index)],
        "usage": None if usage is None else usage_dict(usage),
    }


def completion_response(*, request_id: str, model: str, completions: Sequence[CompletionRecord],
                        usage: Usage | None, created: int | None = None) -> dict[str, Any]:
    """A whole text completion (object "text_completion")."""
    return {
        "id": completion_id(request_id), "object": "text_completion",
        "created": _now() if created is None else created, "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": c.index,
            "text": c.text,
            "logprobs": None if c.logprobs is None else completion_logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        } for c in sorted(completions, key=lambda c: c.index)],
        "usage": None if usage is None else usage_dict(usage),
    }


def chat_chunk(*, request_id: str, model: str, created: int, index: int, role: bool = False,
               content: str | None = None, logprobs: Sequence[dict[str, Any]] | None = None,
               finish_reason: str | None = None, stop_reason: int | str | None = None,
               usage: Usage | None = None) -> dict[str, Any]:
    """One "chat.completion.chunk" for one choice. `role` marks the choice's first chunk."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    chunk: dict[str, Any] = {
        "id": chat_completion_id(request_id), "object": "chat.completion.chunk",
        "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": index, "delta": delta,
                     "logprobs": None if logprobs is None else chat_logprobs(logprobs),
                     "finish_reason": finish_reason, "stop_reason": stop_reason}],
    }
    if usage is not None:
        chunk["usage"] = usage_dict(usage)
    return chunk


def usage_so_far(prompt_tokens: int, completion_tokens: int) -> Usage:
    """The usage a chunk carries under stream_options.continuous_usage_stats."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def chat_event_chunks(event: Event, *, request_id: str, model: str, created: int, first: bool,
                      usage: Usage | None = None) -> list[dict[str, Any]]:
    """The chunks one event becomes: the role (on a choice's first event), its text, and a last
    chunk with the finish reason and an empty delta. An event with `error` set is not a chunk:
    send `gateway.errors.sse_error_event` instead. `usage`, when given, goes on every chunk."""
    ids: dict[str, Any] = {"request_id": request_id, "model": model, "created": created, "index": event.index,
           "usage": usage}
    chunks = []
    if first:
        role = dict(ids)
        if usage is not None:  # the role chunk comes before the event's tokens
            role["usage"] = usage_so_far(usage.prompt_tokens,
                                         usage.completion_tokens - len(event.token_ids))
        chunks.append(chat_chunk(role=True, content="", **role))
    if event.text or event.logprobs:
        chunks.append(chat_chunk(content=event.text, logprobs=event.logprobs, **ids))
    if event.finish_reason is not None:
        chunks.append(chat_chunk(finish_reason=event.finish_reason,
                                 stop_reason=event.stop_reason, **ids))
    return chunks


def completion_chunk(*, request_id: str, model: str, created: int, index: int, text: str,
                     logprobs: Sequence[dict[str, Any]] | None = None, text_offset: int = 0,
                     finish_reason: str | None = None, stop_reason: int | str | None = None,
                     usage: Usage | None = None) -> dict[str, Any]:
    """One streamed "text_completion" object for one choice. `text_offset`: where `text` starts
    in the choice's whole text, for the logprobs' offsets."""
    chunk: dict[str, Any] = {
        "id": completion_id(request_id), "object": "text_completion", "created": created,
        "model": model, "system_fingerprint": None,
        "choices": [{"index": index, "text": text,
                     "logprobs": (None if logprobs is None
                                  else completion_logprobs(logprobs, text_offset=text_offset)),
                     "finish_reason": finish_reason, "stop_reason": stop_reason}],
    }
    if usage is not None:
        chunk["usage"] = usage_dict(usage)
    return chunk


def usage_chunk(*, kind: Literal["chat", "completion"], request_id: str, model: str,
                created: int, usage: Usage) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    chat = kind == "chat"
    return {"id": chat_completion_id(request_id) if chat else completion_id(request_id),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": [],
            "usage": usage_dict(usage)}
