"""Structured-output specs to llguidance grammars, checked without a tokenizer.

A grammar string is what travels in a job: the gateway builds and validates it once, and every
worker compiles the same string against its own tokenizer. Building needs no model, so a bad
schema, regex or grammar is a 400 at the gateway, never a failure on a worker.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from llguidance import LLMatcher, StructTag
from llguidance.gbnf_to_lark import any_to_lark

from worker.structured.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

if TYPE_CHECKING:  # a typing-only name of the extension module's stubs
    from llguidance._lib import JsonCompileOptions

Kind = Literal["json", "regex", "choice", "grammar", "json_object", "structural_tag"]
KINDS: tuple[Kind, ...] = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# Lark's way to say "any text", for the free text around tool calls and structural tags.
_ANY_TEXT = r"(.|\n)*"


class InvalidStructuredOutputError(ValueError):
    """The spec cannot become a grammar; `message` says why, `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def build_grammar(kind: Kind, value: Any, *, disable_any_whitespace: bool = False,
                  disable_additional_properties: bool = False,
                  whitespace_pattern: str | None = None, param: str | None = None) -> str:
    """The llguidance grammar for one spec, validated. Raises `InvalidStructuredOutputError`."""
    param = param or f"structured_outputs.{kind}"
    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else _schema(value)
            if disable_additional_properties:
                schema = _closed_objects(schema)
            options: JsonCompileOptions = {}
            if disable_any_whitespace:
                options["whitespace_flexible"] = False
            if whitespace_pattern is not None:
                options["whitespace_pattern"] = whitespace_pattern
            grammar = LLMatcher.grammar_from_json_schema(schema, overrides=options or None)
        elif kind == "regex":
            if not isinstance(value, str):
                raise InvalidStructuredOutputError("the regex must be a string", param)
            grammar = LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            grammar = LLMatcher.grammar_from_lark(_choice_lark(value, param))
        elif kind == "grammar":
            if not isinstance(value, str) or not value.strip():
                raise InvalidStructuredOutputError("the grammar must be a non-empty string", param)
            grammar = LLMatcher.grammar_from_lark(any_to_lark(value))
        elif kind == "structural_tag":
            grammar = structural_tag_grammar(value, param)
        else:
            raise InvalidStructuredOutputError(f"unknown structured output kind {kind!r}", param)
    except InvalidStructuredOutputError as e:
        e.param = e.param or param
        raise
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        # any_to_lark and the llguidance builders raise these for malformed input.
        raise InvalidStructuredOutputError(f"invalid {kind}: {e}", param) from e
    return checked(grammar, param)


def checked(grammar: str, param: str | None) -> str:
    """`grammar` if llguidance can build it, else `InvalidStructuredOutputError` with its reason
    (bad regex, unknown rule, unsupported JSON-schema keyword...)."""
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise InvalidStructuredOutputError(f"unsupported or invalid spec: {problem.strip()}", param)
    return grammar


def _schema(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidStructuredOutputError(f"the JSON schema is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise InvalidStructuredOutputError("the JSON schema must be an object")
    return value


def _closed_objects(schema: Any) -> Any:
    """A copy of the schema where every object without an additionalProperties rule gets
    `additionalProperties: false`, so the model writes only the declared properties."""
    def close(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: close(v) for k, v in node.items()}
            if (node.get("type") == "object" or "properties" in node) \
                    and "additionalProperties" not in node:
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [close(v) for v in node]
        return node
    return close(copy.deepcopy(schema))


def _choice_lark(value: Any, param: str) -> str:
    if not isinstance(value, list) or not value \
            or not all(isinstance(c, str) and c for c in value):
        raise InvalidStructuredOutputError("choice must be a non-empty list of non-empty strings",
                                           param)
    # JSON string syntax is Lark's string-literal syntax.
    return "start: " + " | ".join(json.dumps(c) for c in value)


def structural_tag_grammar(value: Any, param: str) -> str:
    """vLLM's structural tag: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}.
    Free text, in which each structure starts when its begin string appears (the begin must
    start with one of the triggers) and then follows its JSON schema up to its end string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidStructuredOutputError(f"structural_tag is not valid JSON: {e}",
                                               param) from e
    if not isinstance(value, dict) or not isinstance(value.get("structures"), list) \
            or not value["structures"] or not isinstance(value.get("triggers"), list) \
            or not value["triggers"]:
        raise InvalidStructuredOutputError(
            'structural_tag must be {"structures": [{"begin", "schema", "end"}, ...], '
            '"triggers": [...]} with at least one of each', param)
    triggers = [t for t in value["triggers"] if isinstance(t, str) and t]
    tags = []
    for i, s in enumerate(value["structures"]):
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) \
                or not isinstance(s.get("end", ""), str):
            raise InvalidStructuredOutputError(
                f"structures[{i}] must have a string begin, a schema and a string end", param)
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise InvalidStructuredOutputError(
                f"structures[{i}].begin {s['begin']!r} starts with none of the triggers", param)
        tags.append(StructTag(trigger=trigger, begin=s["begin"],
                              grammar=_schema(s.get("schema", {})), end=s.get("end", "")))
    return StructTag.to_grammar(tags, assume_special=False, text_regex=_ANY_TEXT)


# ---------------------------------------------------------------------------------------------
# Tool calls


ToolChoice = Literal["auto", "required"] | str  # or the name of one function


def tool_call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of one call: {"name": <one of the tools>, "arguments": <its parameters>}."""
    options = []
    for tool in tools:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {
            "name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    # The layout templates show models (json.dumps'): ", " and ": ", no other whitespace, so a
    # call cannot drift into endless whitespace.
    return {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                     "key_separator": ": "}}


def tool_call_grammar(tools: Sequence[dict[str, Any]], choice: ToolChoice,
                      parallel: bool) -> str:
    """Output that calls tools as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

    required / a named function: nothing but calls (at least one); auto: free text, or text and
    then calls, where text that reaches the opening tag commits to a well-formed call. With
    `parallel` false there is at most one call.
    """
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t["function"]["name"] == choice]
    args = f"%json {json.dumps(tool_call_schema(tools))} {json.dumps(TOOL_CALL_CLOSE)}"
    more = "(SEP? call)*" if parallel else ""
    if choice == "auto":
        # The lazy head ends at the first opening tag, so text cannot carry a malformed call.
        lark = (f"%llguidance {{}}\nstart: TEXT | head args {more}\n"
                f"head[lazy]: TEXT {json.dumps(TOOL_CALL_OPEN)}\nargs: {args}\n")
    else:
        lark = f"%llguidance {{}}\nstart: call {more}\n"
    lark += (f"call: {json.dumps(TOOL_CALL_OPEN)} {args}\nTEXT: /{_ANY_TEXT}/\n"
             f"SEP: /[ \\n]+/\n")
    return checked(LLMatcher.grammar_from_lark(lark), "tools")
