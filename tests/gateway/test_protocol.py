"""Request models, their mapping to jobs, and response shapes the official client parses."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion_response,
    chat_event_chunks,
    completion_chunk,
    completion_logprobs,
    completion_response,
    completions_from_events,
    sampling_params,
    stream_continuous_usage,
    stream_include_usage,
    to_job,
    usage_chunk,
)
from shared.errors import BadRequestError
from shared.messages import CompletionRecord, Event, Job, Usage
from worker.engine.sampling_params import SamplingParams

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def errors_of(model: type[ChatCompletionRequest | CompletionRequest],
              body: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return [dict(e) for e in info.value.errors()]


def job(req: ChatCompletionRequest | CompletionRequest) -> Job:
    return to_job(req, model="served", request_id="r1", tenant="t", reply_channel="ch",
                  deadline=123.0)


# --- shape and types --------------------------------------------------------------------------


def test_unknown_fields_are_named() -> None:
    errs = errors_of(ChatCompletionRequest, {"model": "m", "messages": USER, "foo": 1, "bar": 2})
    assert {(e["type"], e["loc"]) for e in errs} == {("extra_forbidden", ("foo",)),
                                                    ("extra_forbidden", ("bar",))}


CHAT_UNSUPPORTED = {
    "logit_bias": {"50256": -100},
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "high",
}
@pytest.mark.parametrize(("field", "value"), sorted(CHAT_UNSUPPORTED.items()))
def test_unsupported_chat_fields_are_rejected_by_name(field: str, value: Any) -> None:
    [err] = errors_of(ChatCompletionRequest, {"model": "m", "messages": USER, field: value})
    assert err["loc"] == (field,)
    assert "not supported" in err["msg"] or "only" in err["msg"]


@pytest.mark.parametrize(("field", "value"), [("suffix", "x"), ("logit_bias", {"1": 1})])
def test_unsupported_completion_fields_are_rejected_by_name(field: str, value: Any) -> None:
    [err] = errors_of(CompletionRequest, {"model": "m", "prompt": "p", field: value})
    assert err["loc"] == (field,)


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"},
    {"logit_bias": {}}, {"modalities": ["text"]}, {"logit_bias": None}, {"tools": None},
    {"parallel_tool_calls": True}, {"user": "u", "metadata": {"k": "v"}},
    {"service_tier": "auto", "store": False},
])
def test_values_that_change_nothing_are_accepted(fields: dict[str, Any]) -> None:
    assert job(chat(**fields)).sampling == job(chat()).sampling
    assert job(chat(**fields)).grammar is None


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", "0.5"), ("n", 1.5), ("n", True), ("max_tokens", "10"), ("stream", "yes"),
    ("logprobs", 1), ("top_logprobs", 2.5), ("stop", 3), ("stop", [1, 2]), ("seed", "1"),
    ("stop_token_ids", ["a"]), ("priority", "high"), ("chat_template_kwargs", []),
    ("stream_options", {"include_usage": "y"}), ("model", 5), ("messages", "hi"),
    ("request_id", ""), ("request_id", "a b"), ("request_id", "x" * 129), ("request_id", 5),
])
def test_wrong_types_name_the_field(field: str, value: Any) -> None:
    errs = errors_of(ChatCompletionRequest, {"model": "m", "messages": USER, field: value})
    assert errs and all(e["loc"][0] == field for e in errs)


def test_completion_logprobs_must_be_an_integer() -> None:
    [err] = errors_of(CompletionRequest, {"model": "m", "prompt": "p", "logprobs": True})
    assert err["loc"] == ("logprobs",)


def test_integer_json_values_fill_float_fields() -> None:
    assert chat(temperature=1, top_p=1).temperature == 1.0


@pytest.mark.parametrize(("message", "loc"), [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     ("messages", 0, "content")),
    ({"role": "user", "content": [{"type": "text", "text": 5}]}, ("messages", 0, "content")),
    ({"role": "user", "content": ["plain"]}, ("messages", 0, "content")),
    ({"role": "user", "content": 7}, ("messages", 0, "content")),
    ({"role": "robot", "content": "x"}, ("messages", 0, "role")),
    ({"role": "user"}, ("messages", 0)),
    ({"role": "user", "content": "x", "extra": 1}, ("messages", 0, "extra")),
])
def test_bad_messages_are_located(message: dict[str, Any], loc: tuple[Any, ...]) -> None:
    [err] = errors_of(ChatCompletionRequest, {"model": "m", "messages": [message]})
    assert err["loc"] == loc


def test_image_part_message_is_clear() -> None:
    [err] = errors_of(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert err["msg"] == "part 1 has type 'image_url'; only text parts are supported"


def test_messages_must_not_be_empty() -> None:
    [err] = errors_of(ChatCompletionRequest, {"model": "m", "messages": []})
    assert err["loc"] == ("messages",)


# --- values, through to_job -------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -5}, "max_tokens"),
    ({"temperature": 3.0}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": 2**64}, "seed"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"max_tokens": 10, "max_completion_tokens": 20}, "max_completion_tokens"),
    ({"best_of": 2}, "best_of"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_values_out_of_range_are_bad_requests(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        job(chat(**fields))
    assert info.value.param == param
    assert info.value.status_code == 400


@pytest.mark.parametrize(("fields", "param"), [
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"echo": True, "logprobs": 1}, "echo"), ({"max_tokens": -3}, "max_tokens"),
])
def test_completion_values_out_of_range(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as info:
        job(completion(**fields))
    assert info.value.param == param


def test_chat_job_defaults() -> None:
    j = job(chat())
    assert (j.id, j.model, j.kind, j.tenant, j.reply_channel, j.deadline) == (
        "r1", "served", "chat", "t", "ch", 123.0)
    assert j.messages == [{"role": "user", "content": "hi"}]
    assert j.add_generation_prompt is True and j.chat_template_kwargs == {}
    assert j.stream is False and j.priority == 0
    defaults = dataclasses.asdict(SamplingParams(max_tokens=None))
    assert j.sampling == defaults  # OpenAI defaults: temperature 1, top_p 1, n 1, no max


def test_sampling_keys_are_exactly_the_sampling_params_fields() -> None:
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(job(chat()).sampling) == names
    assert set(job(completion()).sampling) == names
    SamplingParams(**job(chat(top_k=-1)).sampling)  # what the worker will do with it


def test_chat_job_carries_every_field_and_extra() -> None:
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": [{"type": "text", "text": "a"},
                                           {"type": "text", "text": "b"}]},
            {"role": "user", "content": "q", "name": "ann"},
            {"role": "assistant", "content": None, "refusal": None},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ],
        n=2, temperature=0.5, top_p=0.9, max_completion_tokens=40, stop="END", seed=7,
        presence_penalty=0.1, frequency_penalty=0.2, logprobs=True, top_logprobs=3,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
        top_k=20, min_p=0.05, repetition_penalty=1.1, ignore_eos=True, min_tokens=2,
        stop_token_ids=[7, 8], skip_special_tokens=False, spaces_between_special_tokens=False,
        include_stop_str_in_output=True, priority=-3, request_id="mine",
        add_generation_prompt=False, chat_template_kwargs={"enable_thinking": False},
        best_of=2,
    )
    j = job(req)
    assert j.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert j.sampling == {
        "n": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
        "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.1,
        "seed": 7, "max_tokens": 40, "min_tokens": 2, "stop": ["END"], "stop_token_ids": [7, 8],
        "include_stop_str_in_output": True, "ignore_eos": True, "logprobs": 3,
        "skip_special_tokens": False, "spaces_between_special_tokens": False,
    }
    assert j.stream and j.priority == -3 and not j.add_generation_prompt
    assert j.chat_template_kwargs == {"enable_thinking": False}
    assert req.request_id == "mine"
    assert stream_include_usage(req) and stream_continuous_usage(req)


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, None), ({"logprobs": False}, None), ({"logprobs": True}, 0),
    ({"logprobs": True, "top_logprobs": 5}, 5), ({"logprobs": True, "top_logprobs": 0}, 0),
])
def test_chat_logprobs_mapping(fields: dict[str, Any], expected: int | None) -> None:
    assert job(chat(**fields)).sampling["logprobs"] == expected


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, 0), (5, 5)])
def test_completion_logprobs_mapping(value: int | None, expected: int | None) -> None:
    assert job(completion(logprobs=value)).sampling["logprobs"] == expected


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, 16), ({"max_tokens": None}, None), ({"max_tokens": 5}, 5)])
def test_completion_max_tokens(fields: dict[str, Any], expected: int | None) -> None:
    assert job(completion(**fields)).sampling["max_tokens"] == expected


def test_max_completion_tokens_is_max_tokens() -> None:
    assert job(chat(max_completion_tokens=9)).sampling["max_tokens"] == 9
    assert job(chat(max_tokens=9)).sampling["max_tokens"] == 9
    assert job(chat(max_tokens=9, max_completion_tokens=9)).sampling["max_tokens"] == 9


def test_nulls_mean_defaults() -> None:
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                           "top_k", "min_p", "max_tokens", "logprobs", "stream", "priority"))
    assert job(chat(**nulls)).sampling == job(chat()).sampling


def test_any_number_of_stop_strings() -> None:
    stops = [f"s{i}" for i in range(10)]
    assert job(chat(stop=stops)).sampling["stop"] == stops


@pytest.mark.parametrize(("prompt", "text", "ids"), [
    ("hello", "hello", None), (["hello"], "hello", None), ([1, 2, 3], None, [1, 2, 3]),
    ([[4, 5]], None, [4, 5]), ("", "", None),
])
def test_prompt_variants(prompt: Any, text: str | None, ids: list[int] | None) -> None:
    j = job(completion(prompt=prompt, echo=True))
    assert (j.kind, j.prompt, j.prompt_token_ids, j.echo) == ("completion", text, ids, True)
    assert j.messages is None


@pytest.mark.parametrize(("prompt", "words"), [
    (["a", "b"], "send one prompt per request"), ([[1], [2]], "send one prompt per request"),
    ([], "must not be empty"), ([1, -2], "non-negative"), ([1, True], "non-negative"),
    ([1.5], "non-negative"), (5, "string or a list of token ids"), ({"a": 1}, "string"),
])
def test_bad_prompts(prompt: Any, words: str) -> None:
    [err] = errors_of(CompletionRequest, {"model": "m", "prompt": prompt})
    assert err["loc"] == ("prompt",) and words in err["msg"]


def test_prompt_is_required() -> None:
    [err] = errors_of(CompletionRequest, {"model": "m"})
    assert err["loc"] == ("prompt",)


def test_stream_usage_helpers() -> None:
    assert not stream_include_usage(chat())
    assert not stream_include_usage(chat(stream=True))
    assert stream_include_usage(chat(stream=True, stream_options={"include_usage": True}))
    assert not stream_continuous_usage(chat(stream=True, stream_options={"include_usage": True}))


def test_sampling_params_converts_engine_errors() -> None:
    with pytest.raises(BadRequestError, match=r"top_p must be in \(0, 1\]"):
        sampling_params(completion(top_p=0.0))


# --- responses --------------------------------------------------------------------------------

LOGPROBS = [
    {"token": "Hel", "token_id": 10, "logprob": -0.1,
     "top": [["Hel", 10, -0.1], ["He", 11, -2.5]]},
    {"token": "lo", "token_id": 12, "logprob": float("-inf"), "top": [["x", 13, -0.01]]},
]
USAGE = Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7, cached_tokens=3)


def records(logprobs: list[dict[str, Any]] | None = None) -> list[CompletionRecord]:
    return [CompletionRecord(index=1, text="Hello", token_ids=[10, 12], logprobs=logprobs,
                             finish_reason="length"),
            CompletionRecord(index=0, text="Hi", token_ids=[9], logprobs=logprobs,
                             finish_reason="stop", stop_reason="END")]


def test_chat_completion_response_parses() -> None:
    body = chat_completion_response(request_id="abc", model="m", completions=records(LOGPROBS),
                                    usage=USAGE, created=1700000000)
    out = ChatCompletion.model_validate(body)
    assert out.id == "chatcmpl-abc" and out.object == "chat.completion"
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == "Hi" and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop" and out.choices[1].finish_reason == "length"
    assert out.usage is not None and out.usage.total_tokens == 7
    assert out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens == 3
    lp = out.choices[1].logprobs
    assert lp is not None and lp.content is not None
    assert [t.token for t in lp.content] == ["Hel", "lo"]
    assert lp.content[0].bytes == list(b"Hel")
    assert [(t.token, t.logprob) for t in lp.content[0].top_logprobs] == [("Hel", -0.1),
                                                                          ("He", -2.5)]
    assert lp.content[1].logprob == -9999.0  # -inf is not JSON


def test_chat_response_without_logprobs() -> None:
    out = ChatCompletion.model_validate(chat_completion_response(
        request_id="chatcmpl-x", model="m", completions=records(), usage=None))
    assert out.id == "chatcmpl-x"  # an id that already has the prefix keeps it once
    assert out.choices[0].logprobs is None and out.usage is None


def test_completion_response_parses() -> None:
    body = completion_response(request_id="abc", model="m", completions=records(LOGPROBS),
                               usage=USAGE, created=1700000000)
    out = Completion.model_validate(body)
    assert out.id == "cmpl-abc" and out.object == "text_completion"
    assert out.choices[1].text == "Hello"
    lp = out.choices[1].logprobs
    assert lp is not None
    assert lp.tokens == ["Hel", "lo"]
    assert lp.token_logprobs == [-0.1, -9999.0]
    assert lp.text_offset == [0, 3]
    # the sampled token is listed among the top ones even when it ranks lower
    assert lp.top_logprobs == [{"Hel": -0.1, "He": -2.5}, {"x": -0.01, "lo": -9999.0}]


def test_completion_logprobs_offsets_continue() -> None:
    assert completion_logprobs(LOGPROBS, text_offset=10)["text_offset"] == [10, 13]


def test_chat_stream_chunks_parse() -> None:
    ids: dict[str, Any] = {"request_id": "abc", "model": "m", "created": 1700000000}
    first = Event(req_id="abc", index=0, seq=0, text="Hel", token_ids=[10],
                  logprobs=LOGPROBS[:1])
    last = Event(req_id="abc", index=0, seq=1, text="lo", token_ids=[12],
                 finish_reason="stop", stop_reason=None, usage=USAGE)
    chunks = (chat_event_chunks(first, first=True, **ids)
              + chat_event_chunks(last, first=False, **ids))
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert [p.choices[0].delta.role for p in parsed] == ["assistant", None, None, None]
    assert [p.choices[0].delta.content for p in parsed] == ["", "Hel", "lo", None]
    assert [p.choices[0].finish_reason for p in parsed] == [None, None, None, "stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    lp = parsed[1].choices[0].logprobs
    assert lp is not None and lp.content is not None and lp.content[0].token == "Hel"
    assert all(p.id == "chatcmpl-abc" and p.object == "chat.completion.chunk" for p in parsed)
    assert all("usage" not in c for c in chunks)

    tail = ChatCompletionChunk.model_validate(usage_chunk(kind="chat", usage=USAGE, **ids))
    assert tail.choices == [] and tail.usage is not None and tail.usage.completion_tokens == 2


def test_chat_chunk_with_continuous_usage() -> None:
    c = chat_chunk(request_id="a", model="m", created=1, index=2, content="x", usage=USAGE)
    assert ChatCompletionChunk.model_validate(c).usage is not None
    assert c["choices"][0]["index"] == 2


def test_completion_stream_chunks_parse() -> None:
    ids: dict[str, Any] = {"request_id": "abc", "model": "m", "created": 1700000000}
    c1 = completion_chunk(index=0, text="Hel", logprobs=LOGPROBS[:1], text_offset=0, **ids)
    c2 = completion_chunk(index=0, text="lo", logprobs=LOGPROBS[1:], text_offset=3,
                          finish_reason="length", **ids)
    # Mid-stream choices have finish_reason null, as OpenAI streams them; the client reads
    # stream chunks without validation, and its model insists on a reason, so one is put in to
    # check everything else.
    assert c1["choices"][0]["finish_reason"] is None
    p1 = Completion.model_validate({**c1, "choices": [{**c1["choices"][0],
                                                       "finish_reason": "stop"}]})
    p2 = Completion.model_validate(c2)
    assert p1.choices[0].text == "Hel"
    assert p2.choices[0].finish_reason == "length"
    assert p2.choices[0].logprobs is not None and p2.choices[0].logprobs.text_offset == [3]
    tail = usage_chunk(kind="completion", usage=USAGE, **ids)
    assert tail["object"] == "text_completion" and tail["choices"] == []
    assert Completion.model_validate(tail).usage is not None


def test_completions_from_events() -> None:
    events = [
        Event(req_id="r", index=1, seq=0, text="b", token_ids=[2]),
        Event(req_id="r", index=0, seq=1, text="y", token_ids=[4], logprobs=LOGPROBS[1:],
              finish_reason="stop", stop_reason="END", usage=USAGE),
        Event(req_id="r", index=0, seq=0, text="x", token_ids=[3], logprobs=LOGPROBS[:1]),
        Event(req_id="r", index=1, seq=1, text="c", token_ids=[5], finish_reason="length"),
    ]
    recs, usage = completions_from_events(events)
    assert usage == USAGE
    assert [(r.index, r.text, r.token_ids, r.finish_reason, r.stop_reason) for r in recs] == [
        (0, "xy", [3, 4], "stop", "END"), (1, "bc", [2, 5], "length", None)]
    assert recs[0].logprobs == LOGPROBS and recs[1].logprobs is None


def test_missing_content_names_the_role() -> None:
    [err] = errors_of(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user"}]})
    assert err["msg"] == "content is required for role 'user'"
