"""Structured outputs at the gateway: every way to ask becomes one validated grammar on the job,
bad specs are 400s that say why, old names are honored and flagged, and tool calls in the
model's text come back in the OpenAI shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.app import create_app
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_completion_response,
    chat_event_chunks,
    to_job,
)
from gateway.structured import ToolCallStream, deprecation_headers, tool_call_response
from shared.errors import BadRequestError
from shared.messages import CompletionRecord, Event, Job
from shared.settings import GatewaySettings
from worker.structured.spec import build_grammar

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}


def job(**fields: Any) -> Job:
    if "prompt" in fields:
        req: Any = CompletionRequest.model_validate({"model": "m", **fields})
    else:
        req = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})
    return to_job(req, model="m", request_id="r", tenant="t", reply_channel=None, deadline=None)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
     build_grammar("json", SCHEMA)),
    ({"response_format": {"type": "json_object"}}, build_grammar("json_object", True)),
    ({"structured_outputs": {"json": SCHEMA}}, build_grammar("json", SCHEMA)),
    ({"structured_outputs": {"json": json.dumps(SCHEMA), "disable_any_whitespace": True}},
     build_grammar("json", SCHEMA, disable_any_whitespace=True)),
    ({"guided_json": SCHEMA}, build_grammar("json", SCHEMA)),
    ({"structured_outputs": {"regex": "a+"}}, build_grammar("regex", "a+")),
    ({"guided_regex": "a+"}, build_grammar("regex", "a+")),
    ({"guided_choice": ["x", "y"]}, build_grammar("choice", ["x", "y"])),
    ({"guided_grammar": 'start: "a"'}, build_grammar("grammar", 'start: "a"')),
    ({"prompt": "p", "structured_outputs": {"choice": ["x"]}}, build_grammar("choice", ["x"])),
    ({"response_format": {"type": "structural_tag", "triggers": ["<f"], "structures": [
        {"begin": "<f>", "schema": SCHEMA, "end": "</f>"}]}},
     build_grammar("structural_tag", {"triggers": ["<f"], "structures": [
         {"begin": "<f>", "schema": SCHEMA, "end": "</f>"}]})),
])
def test_each_surface_becomes_the_same_grammar(fields: dict[str, Any], expected: str) -> None:
    assert job(**fields).grammar == expected


def test_disable_additional_properties_closes_objects() -> None:
    open_ = job(structured_outputs={"json": SCHEMA}).grammar
    closed = job(structured_outputs={"json": SCHEMA, "disable_additional_properties": True})
    assert closed.grammar != open_ and closed.grammar is not None
    assert '"additionalProperties": false' in closed.grammar.replace(
        '"additionalProperties":false', '"additionalProperties": false')


def test_tools_become_a_grammar_and_reach_the_template() -> None:
    j = job(tools=[TOOL], tool_choice="required")
    assert j.grammar is not None and "<tool_call>" in j.grammar and j.tools == [TOOL]
    off = job(tools=[TOOL], tool_choice="none")
    assert off.grammar is None and off.tools is None


@pytest.mark.parametrize(("fields", "param", "reason"), [
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format",
     "one structured output"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"guided_json": {"type": "objekt"}}, "guided_json", "objekt"),
    ({"guided_regex": "a", "n": 2}, "n", "n=1"),
    ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ({"guided_regex": "a", "min_tokens": 2}, "min_tokens", "min_tokens"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice", "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [TOOL], "tool_choice": "required", "guided_regex": "a"}, "guided_regex",
     "one structured output"),
])
def test_bad_requests_name_the_field_and_reason(fields: dict[str, Any], param: str,
                                                reason: str) -> None:
    with pytest.raises(BadRequestError) as info:
        job(**fields)
    assert info.value.param == param and reason in info.value.message, info.value


def test_deprecation_headers_name_the_replacement() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "guided_json": SCHEMA,
         "guided_decoding_backend": "xgrammar"})
    headers = deprecation_headers(req)
    assert headers["Deprecation"] == "true"
    assert "guided_json -> structured_outputs.json" in headers["X-Sluice-Deprecated"]
    assert "guided_decoding_backend" in headers["X-Sluice-Deprecated"]
    assert deprecation_headers(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "structured_outputs": {"json": SCHEMA}})) == {}


def test_bad_spec_is_a_400_from_the_real_app(redis_url: str) -> None:
    settings = GatewaySettings(redis_url=redis_url, api_keys=["sk-s"], models=["tiny"])
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/completions", headers={"Authorization": "Bearer sk-s"},
                        json={"model": "tiny", "prompt": "x",
                              "structured_outputs": {"grammar": "start: nowhere"}})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "structured_outputs.grammar" and "nowhere" in error["message"]
    assert error["type"] == "invalid_request_error"


CALL = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'


def test_whole_response_carries_tool_calls() -> None:
    record = CompletionRecord(index=0, text="ok " + CALL, token_ids=[1], finish_reason="stop")
    response = tool_call_response(chat_completion_response(
        request_id="r", model="m", completions=[record], usage=None))
    parsed = ChatCompletion.model_validate(response)
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "ok "
    assert choice.message.tool_calls is not None
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"a": 1}


def test_stream_turns_calls_into_deltas() -> None:
    stream = ToolCallStream()
    text = "hi " + CALL + CALL
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    chunks = []
    for seq, piece in enumerate(pieces):
        last = seq == len(pieces) - 1
        ev = Event(req_id="r", seq=seq, text=piece, finish_reason="stop" if last else None)
        chunks += stream.rewrite(chat_event_chunks(ev, request_id="r", model="m", created=0,
                                                   first=seq == 0))
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    content = "".join(c.choices[0].delta.content or "" for c in parsed)
    calls = [tc for c in parsed for tc in c.choices[0].delta.tool_calls or []]
    assert content == "hi " and [tc.index for tc in calls] == [0, 1]
    assert parsed[-1].choices[0].finish_reason == "tool_calls"
