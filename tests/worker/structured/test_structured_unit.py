"""Grammars from specs, matchers over the tiny model's tokenizer: masks allow exactly the valid
continuations, EOS only where the grammar accepts, compiled grammars are cached."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from worker.engine.config import EngineConfig
from worker.engine.engine import Engine
from worker.engine.errors import InvalidRequestError
from worker.engine.sampling_params import SamplingParams
from worker.structured.matcher import GrammarCompiler, GrammarError, GrammarMatcher, build_tokenizer
from worker.structured.pending import PendingGrammars
from worker.structured.spec import (
    InvalidStructuredOutputError,
    build_grammar,
    tool_call_grammar,
)
from worker.structured.tool_calls import ToolCallParser, parse_tool_calls
from worker.tokenizer import Tokenizer

EOS = 2  # the tiny model's


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(lambda: build_tokenizer(tokenizer.hf, tokenizer.vocab_size, [EOS]),
                           tokenizer.vocab_size)


def allowed(m: GrammarMatcher, vocab: int) -> set[int]:
    packed = m.allowed_tokens(vocab)
    bits = (packed[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(torch.nonzero(bits.reshape(-1)[:vocab]).reshape(-1).tolist())


def feed(m: GrammarMatcher, tok: Tokenizer, text: str) -> None:
    m.accept_tokens(tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize(("kind", "value"), [
    ("json", {"type": "object", "properties": {"a": {"type": "integer"}}}),
    ("json", '{"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}'),
    ("regex", r"\d{3}-[a-z]+"),
    ("choice", ["yes", "no"]),
    ("grammar", 'start: "a" B\nB: /[0-9]+/'),
    ("grammar", 'root ::= "a" [0-9]+'),  # GBNF
    ("json_object", True),
    ("structural_tag", {"structures": [{"begin": "<f>", "schema": {"type": "object"},
                                        "end": "</f>"}], "triggers": ["<f>"]}),
])
def test_every_mode_compiles(kind: str, value: object, compiler: GrammarCompiler) -> None:
    assert not compiler.compile(build_grammar(kind, value)).matcher.is_error()  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "value", "reason"), [
    ("regex", "[a-", "regex"),
    ("json", {"type": "objekt"}, "objekt"),
    ("json", "{not json", "not valid JSON"),
    ("json", {"properties": {"a": {"$ref": "#/defs/none"}}}, "none"),
    ("choice", [], "non-empty list"),
    ("grammar", "start: missing", "missing"),
    ("structural_tag", {"structures": [{"begin": "<f>", "schema": {}}], "triggers": ["<g>"]},
     "triggers"),
])
def test_invalid_specs_say_why(kind: str, value: object, reason: str) -> None:
    with pytest.raises(InvalidStructuredOutputError) as info:
        build_grammar(kind, value)  # type: ignore[arg-type]
    assert reason in info.value.message and info.value.param == f"structured_outputs.{kind}"


def test_mask_allows_only_valid_continuations(compiler: GrammarCompiler,
                                              tokenizer: Tokenizer) -> None:
    m = compiler.compile(build_grammar("regex", r"[0-9]{2}"))
    vocab = tokenizer.vocab_size
    first = allowed(m, vocab)
    assert first and EOS not in first
    assert all(re.fullmatch(r"[0-9]{1,2}", tokenizer.decode([t])) for t in first)
    feed(m, tokenizer, "4")
    second = allowed(m, vocab)
    assert all(re.fullmatch(r"[0-9]", tokenizer.decode([t])) for t in second)
    feed(m, tokenizer, "2")
    assert allowed(m, vocab) == {EOS} and m.is_finished  # complete: only EOS is left


def test_eos_only_where_the_grammar_accepts(compiler: GrammarCompiler,
                                            tokenizer: Tokenizer) -> None:
    m = compiler.compile(build_grammar("json", {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}, disable_any_whitespace=True))
    vocab = tokenizer.vocab_size
    feed(m, tokenizer, '{"a":1')
    assert EOS not in allowed(m, vocab)
    feed(m, tokenizer, "}")
    assert EOS in allowed(m, vocab)


def test_a_rejected_token_is_an_error(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    m = compiler.compile(build_grammar("choice", ["yes", "no"]))
    with pytest.raises(GrammarError):
        feed(m, tokenizer, "maybe")


def test_compiled_grammars_are_cached_and_matchers_independent(
        compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    grammar = build_grammar("regex", r"(ab)+")
    before = compiler.num_compiled
    a, b = compiler.compile(grammar), compiler.compile(grammar)
    assert compiler.num_compiled - before <= 1
    feed(a, tokenizer, "ab")
    assert a.matcher.is_accepting() and not b.matcher.is_accepting()


def test_pending_grammars_advance_over_a_resumed_prefix(compiler: GrammarCompiler,
                                                        tokenizer: Tokenizer) -> None:
    pending: PendingGrammars[str] = PendingGrammars(compiler)
    prefix = tokenizer.encode("12", add_special_tokens=False)
    pending.add("r1", "item", build_grammar("regex", r"[0-9]{3}"), prefix)
    pending.add("r2", "gone", build_grammar("regex", r"x"))
    assert pending.remove(["r2"]) == ["r2"]
    compiler.submit(build_grammar("regex", r"[0-9]{3}")).result()
    [(rid, item, m, why)] = pending.pop_ready()
    assert (rid, item, why) == ("r1", "item", None) and m is not None
    assert all(re.fullmatch(r"[0-9]", tokenizer.decode([t]))
               for t in allowed(m, tokenizer.vocab_size))


def test_engine_output_follows_the_grammar_to_a_stop(tiny_model_dir: Path,
                                                     compiler: GrammarCompiler,
                                                     tokenizer: Tokenizer) -> None:
    engine = Engine(tiny_model_dir, EngineConfig(num_kv_blocks=64), device="cpu")
    pattern = r"[a-z]{2,4}-[0-9]{2}"
    for i in range(4):
        engine.add_request(f"r{i}", [5, 6, 7], SamplingParams(temperature=1.0, seed=i,
                                                              max_tokens=40),
                           logits_mask=compiler.compile(build_grammar("regex", pattern)))
    tokens: dict[str, list[int]] = {}
    reasons = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
    assert set(reasons.values()) == {"stop"}
    for ids in tokens.values():
        assert ids[-1] == EOS and re.fullmatch(pattern, tokenizer.decode(ids))
    with pytest.raises(InvalidRequestError):  # a matcher follows one sequence
        engine.add_request("n2", [5], SamplingParams(n=2),
                           logits_mask=compiler.compile(build_grammar("regex", "a")))


def test_tool_call_grammar_enforces_the_choice(compiler: GrammarCompiler,
                                               tokenizer: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
        for n in ("f", "g")]
    call = '<tool_call>{"name": "g", "arguments": {"x": 1}}</tool_call>'
    named = compiler.compile(tool_call_grammar(tools, "f", parallel=True))
    with pytest.raises(GrammarError):
        feed(named, tokenizer, call)
    single = compiler.compile(tool_call_grammar(tools, "required", parallel=False))
    feed(single, tokenizer, call)
    assert allowed(single, tokenizer.vocab_size) == {EOS}
    auto = compiler.compile(tool_call_grammar(tools, "auto", parallel=True))
    feed(auto, tokenizer, "Let me check. " + call + "\n" + call)
    with pytest.raises(GrammarError):  # text that opens a call must make a valid one
        feed(compiler.compile(tool_call_grammar(tools, "auto", parallel=True)), tokenizer,
             "hi <tool_call>hello")


def test_tool_calls_parse_back_streamed_or_whole() -> None:
    text = ('Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Sure. " and [c.name for c in calls] == ["f", "g"]
    assert json.loads(calls[0].arguments) == {"x": 1}
    parser = ToolCallParser()
    released = [parser.feed(text[i:i + 3]) for i in range(0, len(text), 3)]
    assert "".join(r for r, _ in released) == "Sure. "
    assert [c.name for _, cs in released for c in cs] == ["f", "g"]
    assert parse_tool_calls("plain <tool") == ("plain <tool", [])


def test_prefetched_masks_match_masks_built_on_demand(compiler: GrammarCompiler,
                                                      tokenizer: Tokenizer) -> None:
    grammar = build_grammar("json", {"type": "object", "properties": {
        "k": {"enum": ["ab", "cd"]}}}, disable_any_whitespace=True)
    template = compiler.submit(grammar).result()
    ahead = GrammarMatcher(template.deep_copy(), tokenizer.vocab_size, prefetch=True)
    plain = GrammarMatcher(template.deep_copy(), tokenizer.vocab_size)
    for token in tokenizer.encode('{"k":"cd"}', add_special_tokens=False):
        assert allowed(ahead, tokenizer.vocab_size) == allowed(plain, tokenizer.vocab_size)
        ahead.accept_token(token)
        plain.accept_token(token)
    assert ahead.is_finished and plain.is_finished
