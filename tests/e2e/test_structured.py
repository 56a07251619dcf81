"""Structured outputs and tool calls end to end: the real service, the `openai` client, the tiny
model. Its weights are random, so its outputs are too; the grammar must still make every output
that finishes with "stop" valid against its spec."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import jsonschema
import lark
import openai
import pytest

if TYPE_CHECKING:  # the `service` fixture comes from tests/e2e/conftest.py
    from conftest import Service

NUM_REQUESTS = 4
MAX_TOKENS = 96
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "user", "guest"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "role", "age"],
    "additionalProperties": False,
}
CALC = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "Describe a person."}]


def _many(fn: Any) -> list[Any]:
    """NUM_REQUESTS requests at once: the worker batches them, grammars and all."""
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        return list(pool.map(lambda i: fn(i), range(NUM_REQUESTS)))


def _chat(service: Service, **kw: Any) -> list[Any]:
    client = service.client()
    return _many(lambda i: client.chat.completions.create(
        model="tiny", messages=MESSAGES, **{"max_tokens": MAX_TOKENS, "seed": i, **kw}
    ).choices[0])


def _completion(service: Service, **kw: Any) -> list[Any]:
    client = service.client()
    return _many(lambda i: client.completions.create(
        model="tiny", prompt="Answer:", **{"max_tokens": MAX_TOKENS, "seed": i, **kw}
    ).choices[0])


def _valid_when_stopped(texts_and_reasons: list[tuple[str, str]], check: Any) -> None:
    stopped = [text for text, reason in texts_and_reasons if reason == "stop"]
    assert len(stopped) >= len(texts_and_reasons) // 2, texts_and_reasons
    for text in stopped:
        check(text)


def test_json_schema_through_response_format(service: Service) -> None:
    choices = _chat(service, response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}})
    _valid_when_stopped([(c.message.content, c.finish_reason) for c in choices],
                        lambda t: jsonschema.validate(json.loads(t), PERSON))


def test_json_object_through_response_format(service: Service) -> None:
    choices = _completion(service, max_tokens=32,
                          extra_body={"response_format": {"type": "json_object"}})
    # Any object is allowed, so a random model may ramble: a few "length" endings are fine.
    for c in choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)


def test_structured_outputs_json_without_whitespace(service: Service) -> None:
    choices = _completion(service, extra_body={"structured_outputs": {
        "json": PERSON, "disable_any_whitespace": True}})

    def check(text: str) -> None:
        jsonschema.validate(json.loads(text), PERSON)
        assert not re.search(r'[:,]\s|\s[:,{}\]]', text.replace('\\"', "")
                             .split('"name"')[0])  # no whitespace between tokens of JSON

    _valid_when_stopped([(c.text, c.finish_reason) for c in choices], check)


def test_regex(service: Service) -> None:
    pattern = r"[a-z]{2,6}-[0-9]{3}( ok)?"
    choices = _completion(service, extra_body={"structured_outputs": {"regex": pattern}})
    _valid_when_stopped([(c.text, c.finish_reason) for c in choices],
                        lambda t: re.fullmatch(pattern, t) or pytest.fail(t))


def test_choice(service: Service) -> None:
    options = ["positive", "negative", "neutral"]
    choices = _chat(service, extra_body={"structured_outputs": {"choice": options}})
    _valid_when_stopped([(c.message.content, c.finish_reason) for c in choices],
                        lambda t: t in options or pytest.fail(t))


def test_lark_grammar(service: Service) -> None:
    parser = lark.Lark(CALC)
    choices = _completion(service, extra_body={"structured_outputs": {"grammar": CALC}})
    _valid_when_stopped([(c.text, c.finish_reason) for c in choices], parser.parse)


def test_structural_tag(service: Service) -> None:
    tag = {"structures": [{"begin": "<person>", "schema": PERSON, "end": "</person>"}],
           "triggers": ["<person>"]}
    choices = _completion(service, max_tokens=40,
                          extra_body={"structured_outputs": {"structural_tag": json.dumps(tag)}})
    for c in choices:  # free text, but every tag that opens holds a valid person
        for body in re.findall(r"<person>(.*?)</person>", c.text, flags=re.S):
            jsonschema.validate(json.loads(body), PERSON)


@pytest.mark.parametrize("stream", [False, True])
def test_guided_alias_is_honored_with_a_deprecation_header(service: Service,
                                                           stream: bool) -> None:
    client = service.client()
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="Answer:", max_tokens=MAX_TOKENS, stream=stream,
        extra_body={"guided_choice": ["yes", "no"]})
    assert raw.headers["Deprecation"] == "true"
    assert "guided_choice -> structured_outputs.choice" in raw.headers["X-Sluice-Deprecated"]
    result = raw.parse()
    text = "".join(c.choices[0].text for c in result if c.choices) if stream \
        else result.choices[0].text
    assert text in ("yes", "no")


@pytest.mark.parametrize(("body", "param", "reason"), [
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "regex"),
    ({"structured_outputs": {"json": {"type": "objekt"}}}, "structured_outputs.json",
     "objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
     "response_format", "nope"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar",
     "undefined_rule"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "structured_outputs",
     "one structured output"),
])
def test_invalid_specs_are_400_with_the_reason(service: Service, body: dict[str, Any],
                                              param: str, reason: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        service.client().completions.create(model="tiny", prompt="x", max_tokens=4,
                                            extra_body=body)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and reason in error["message"], error


def _check_calls(calls: list[Any], tools: list[dict[str, Any]]) -> None:
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_required_and_named(service: Service, tool_choice: Any) -> None:
    choices = _chat(service, tools=[WEATHER, TIME], tool_choice=tool_choice,
                    parallel_tool_calls=False)
    called = [c for c in choices if c.finish_reason == "tool_calls"]
    assert len(called) >= NUM_REQUESTS // 2, choices
    for c in called:
        assert c.message.content is None and len(c.message.tool_calls) == 1
        _check_calls(c.message.tool_calls, [WEATHER, TIME])
        if isinstance(tool_choice, dict):
            assert c.message.tool_calls[0].function.name == "get_time"


def test_tool_calls_auto(service: Service) -> None:
    choices = _chat(service, tools=[WEATHER, TIME], max_tokens=32)
    for c in choices:  # text or calls, at the model's choice; calls are always well formed
        _check_calls(c.message.tool_calls or [], [WEATHER, TIME])


def test_tool_calls_stream_as_deltas(service: Service) -> None:
    stream = service.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, tools=[WEATHER],
        tool_choice="required", stream=True)
    deltas, finish = [], None
    for chunk in stream:
        choice = chunk.choices[0]
        deltas += choice.delta.tool_calls or []
        assert not choice.delta.content
        finish = choice.finish_reason or finish
    if finish == "tool_calls":
        assert deltas and [d.index for d in deltas] == list(range(len(deltas)))
        _check_calls(deltas, [WEATHER])
    else:
        assert finish == "length"
