"""Structured outputs and tool calling at the gateway: the request surface to one grammar, and
tool calls in the model's text back to OpenAI `tool_calls`.

Three ways to ask for a constraint, at most one per request: OpenAI `response_format`, the
`structured_outputs` object (as vLLM names it), and the deprecated `guided_*` fields, which are
still honored and answered with a deprecation header. Tools with a `tool_choice` other than
"none" are a constraint too. Every spec is turned into an llguidance grammar and validated here,
without a tokenizer, so a bad one is a 400 naming the reason and never reaches a worker.
"""

from __future__ import annotations

import copy
from typing import Any

from shared.errors import BadRequestError
from worker.structured.spec import (
    KINDS,
    InvalidStructuredOutputError,
    Kind,
    build_grammar,
    tool_call_grammar,
)
from worker.structured.tool_calls import ToolCall, ToolCallParser

# Old name -> the field that replaces it, for the deprecation header.
DEPRECATED_FIELDS = {
    "guided_json": "structured_outputs.json",
    "guided_regex": "structured_outputs.regex",
    "guided_choice": "structured_outputs.choice",
    "guided_grammar": "structured_outputs.grammar",
    "guided_json_object": "structured_outputs.json_object",
    "guided_whitespace_pattern": "structured_outputs.whitespace_pattern",
    "guided_decoding_backend": "nothing (the backend is always llguidance)",
}


def deprecated_fields(req: Any) -> list[str]:
    return [name for name in DEPRECATED_FIELDS if getattr(req, name, None) is not None]


def deprecation_headers(req: Any) -> dict[str, str]:
    """`Deprecation` and a `Warning` naming each old field used and its replacement."""
    used = deprecated_fields(req)
    if not used:
        return {}
    advice = "; ".join(f"{name} -> {DEPRECATED_FIELDS[name]}" for name in used)
    return {"Deprecation": "true", "X-Sluice-Deprecated": advice,
            "Warning": f'299 - "deprecated fields: {advice}"'}


def tool_choice_name(req: Any) -> str:
    """"none", "auto", "required" or the named function; "none" without tools."""
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise BadRequestError("tool_choice needs tools", param="tool_choice")
        return "none"
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    name = choice.function.name
    if name not in {t.function.name for t in tools}:
        raise BadRequestError(f"tool_choice names {name!r}, which is not among the tools",
                              param="tool_choice")
    return name


def uses_tool_calls(req: Any) -> bool:
    return tool_choice_name(req) != "none"


def asks_for_grammar(req: Any) -> bool:
    """Whether the request names any constraint (cheap: nothing is built)."""
    rf = getattr(req, "response_format", None)
    return (rf is not None and rf.type != "text") \
        or getattr(req, "structured_outputs", None) is not None \
        or any(getattr(req, name, None) is not None for name in DEPRECATED_FIELDS) \
        or bool(getattr(req, "tools", None))


def request_grammar(req: Any) -> str | None:
    """The grammar every output of `req` must follow, or None. Raises `BadRequestError`."""
    specs = _specs(req)
    if len(specs) > 1:
        raise BadRequestError(
            f"ask for one structured output at a time; this request has {', '.join(specs)}",
            param=next(iter(specs)).split(".")[0])
    if not specs:
        return None
    _check_compatible(req)
    source, (kind, value, options) = next(iter(specs.items()))
    try:
        if kind == "tools":
            return tool_call_grammar(value, tool_choice_name(req),
                                     req.parallel_tool_calls is not False)
        return build_grammar(kind, value, param=source, **options)
    except InvalidStructuredOutputError as e:
        raise BadRequestError(e.message, param=e.param or source) from e
    except Exception as e:  # llguidance on input nobody foresaw: still the client's input
        raise BadRequestError(f"invalid structured output spec: {e}", param=source) from e


def _specs(req: Any) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """Each constraint the request asks for: source field -> (kind, value, options)."""
    specs: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type != "text":
        specs["response_format"] = _from_response_format(rf)
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        given = [k for k in KINDS if getattr(so, _attr(k)) not in (None, False)]
        if len(given) != 1:
            raise BadRequestError(
                "structured_outputs takes exactly one of " + ", ".join(KINDS)
                + (f"; got {', '.join(given)}" if given else ""), param="structured_outputs")
        kind: Kind = given[0]
        specs[f"structured_outputs.{kind}"] = (kind, getattr(so, _attr(kind)), {
            "disable_any_whitespace": bool(so.disable_any_whitespace),
            "disable_additional_properties": bool(so.disable_additional_properties),
            "whitespace_pattern": so.whitespace_pattern})
    for kind in ("json", "regex", "choice", "grammar", "json_object"):
        value = getattr(req, f"guided_{kind}", None)
        if value not in (None, False):
            specs[f"guided_{kind}"] = (kind, value, {
                "whitespace_pattern": getattr(req, "guided_whitespace_pattern", None)})
    if uses_tool_calls(req):
        specs["tools"] = ("tools", [t.model_dump(exclude_none=True) for t in req.tools], {})
    return specs


def _attr(kind: str) -> str:
    return "json_" if kind == "json" else kind  # `json` would shadow a pydantic method


def _from_response_format(rf: Any) -> tuple[Any, Any, dict[str, Any]]:
    if rf.type == "json_object":
        return "json_object", True, {}
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise BadRequestError('response_format of type "json_schema" needs a json_schema '
                                  'object: {"name": ..., "schema": {...}}',
                                  param="response_format.json_schema")
        schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {}
        return "json", schema, {}
    return "structural_tag", {"structures": rf.structures, "triggers": rf.triggers}, {}


def _check_compatible(req: Any) -> None:
    if (req.n or 1) > 1:
        raise BadRequestError("structured outputs and tool calls need n=1 (a grammar matcher "
                              "follows one sequence)", param="n")
    if req.ignore_eos:
        raise BadRequestError("ignore_eos cannot be combined with structured outputs: the "
                              "grammar decides where the output ends", param="ignore_eos")
    if req.min_tokens:
        raise BadRequestError("min_tokens cannot be combined with structured outputs: the "
                              "grammar decides where the output ends", param="min_tokens")


# ---------------------------------------------------------------------------------------------
# Tool calls back to the OpenAI shape


def tool_call_response(response: dict[str, Any]) -> dict[str, Any]:
    """A whole chat completion with each choice's text read for tool calls."""
    response = copy.copy(response)
    response["choices"] = [_tool_choice(c) for c in response["choices"]]
    return response


def _tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    parser = ToolCallParser()
    parser.feed(choice["message"].get("content") or "")
    parser.finish()
    if not parser.calls:
        return choice
    message = {**choice["message"], "content": parser.content or None,
               "tool_calls": [c.to_openai() for c in parser.calls]}
    finish = "tool_calls" if choice["finish_reason"] == "stop" else choice["finish_reason"]
    return {**choice, "message": message, "finish_reason": finish}


class ToolCallStream:
    """Rewrites a chat stream's chunks: text before a call stays content, each call becomes
    one `tool_calls` delta, and a stream that called tools ends with "tool_calls"."""

    def __init__(self) -> None:
        self._parsers: dict[int, ToolCallParser] = {}

    def rewrite(self, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for chunk in chunks:
            choice = chunk["choices"][0]
            parser = self._parsers.setdefault(choice["index"], ToolCallParser())
            delta = choice["delta"]
            calls: list[ToolCall] = []
            if delta.get("content"):
                delta["content"], calls = parser.feed(delta["content"])
            if choice["finish_reason"] is not None:
                rest = parser.finish()
                if rest:
                    delta["content"] = (delta.get("content") or "") + rest
                if parser.calls and choice["finish_reason"] == "stop":
                    choice["finish_reason"] = "tool_calls"
            if calls:
                first = len(parser.calls) - len(calls)
                delta["tool_calls"] = [c.to_openai(index=first + i) for i, c in enumerate(calls)]
            if delta.get("content") == "" and "role" not in delta:
                del delta["content"]
            if delta or choice["finish_reason"] is not None or choice.get("logprobs"):
                out.append(chunk)
        return out
