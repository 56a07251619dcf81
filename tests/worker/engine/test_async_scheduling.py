"""Async scheduling (step N+1 planned while step N runs) gives exactly what plain stepping gives.

The CPU has nothing to overlap, but the code path is the same one CUDA takes: placeholders for
unread tokens, inputs filled in from the previous step's sampled tensor, steps that run on for a
request that had in fact finished, and their results thrown away.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from worker.engine.config import EngineConfig
from worker.engine.engine import Engine, EngineOutput
from worker.engine.request import PLACEHOLDER_TOKEN, LogitsMask
from worker.engine.sampling_params import SamplingParams
from worker.structured.matcher import GrammarCompiler, build_tokenizer
from worker.structured.spec import build_grammar
from worker.tokenizer import Tokenizer

PROMPTS = [[(7 * i + 3 * j) % 200 + 5 for j in range(4 + 9 * i)] for i in range(8)]


def build(model_dir: Path, async_scheduling: bool, device: str = "cpu", **config: Any) -> Engine:
    cfg = EngineConfig(async_scheduling=async_scheduling, max_model_len=512, **config)
    return Engine(model_dir, cfg, device=device)


def run(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]],
        abort_after: dict[str, int] | None = None,
        masks: dict[str, Callable[[], LogitsMask]] | None = None
        ) -> dict[tuple[str, int], dict[str, Any]]:
    """Steps to the end; returns each completion's tokens, logprobs and finish reason."""
    for rid, prompt, params in requests:
        mask = (masks or {}).get(rid)
        engine.add_request(rid, prompt, params, logits_mask=mask() if mask else None)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            _collect(out, o)
        steps += 1
        for rid, at in (abort_after or {}).items():
            if steps == at:
                for o in engine.abort(rid):
                    _collect(out, o)
        assert steps < 10_000
    for req in engine.scheduler.requests.values():
        assert PLACEHOLDER_TOKEN not in req.output_token_ids
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks, "blocks leaked"
    return out


def _collect(out: dict[tuple[str, int], dict[str, Any]], o: EngineOutput) -> None:
    entry = out.setdefault((o.request_id, o.index), {"tokens": [], "logprobs": [], "finish": None})
    assert entry["finish"] is None, f"{o.request_id} reported after it finished"
    assert PLACEHOLDER_TOKEN not in o.new_token_ids
    entry["tokens"] += o.new_token_ids
    entry["logprobs"] += [round(lp.logprob, 4) for lp in o.new_logprobs]
    entry["finish"] = o.finish_reason


def mixed_requests(stop_token: int) -> list[tuple[str, list[int], SamplingParams]]:
    reqs = []
    for i, prompt in enumerate(PROMPTS):
        if i % 4 == 0:
            params = SamplingParams(temperature=0.0, max_tokens=20 + i, stop_token_ids=[stop_token])
        elif i % 4 == 1:
            params = SamplingParams(temperature=0.8, seed=100 + i, max_tokens=17, logprobs=2,
                                    ignore_eos=True)
        elif i % 4 == 2:
            params = SamplingParams(temperature=0.0, max_tokens=1 + i, min_tokens=1)
        else:
            params = SamplingParams(temperature=1.0, seed=i, n=2, max_tokens=12, ignore_eos=True)
        reqs.append((f"r{i}", prompt, params))
    return reqs


@pytest.fixture(scope="module")
def stop_token(tiny_model_dir: Path) -> int:
    """A token greedy decoding of PROMPTS[0] reaches mid-way, so a stop on it ends early."""
    engine = build(tiny_model_dir, False)
    out = run(engine, [("probe", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24,
                                                            ignore_eos=True))])
    return out[("probe", 0)]["tokens"][6]


def test_same_tokens_and_finish_reasons_as_plain_stepping(tiny_model_dir: Path,
                                                          stop_token: int) -> None:
    sync = run(build(tiny_model_dir, False), mixed_requests(stop_token))
    asyn = run(build(tiny_model_dir, True), mixed_requests(stop_token))
    assert asyn == sync
    assert sync[("r0", 0)]["finish"] == "stop" and len(sync[("r0", 0)]["tokens"]) == 7


def test_same_under_preemption_and_chunked_prefill(tiny_model_dir: Path, stop_token: int) -> None:
    small = {"num_kv_blocks": 12, "block_size": 16, "max_num_batched_tokens": 32}
    sync_engine = build(tiny_model_dir, False, **small)
    sync = run(sync_engine, mixed_requests(stop_token))
    async_engine = build(tiny_model_dir, True, **small)
    asyn = run(async_engine, mixed_requests(stop_token))
    assert asyn == sync
    assert async_engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_give_the_same_tokens(tiny_model_dir: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    long_prompt = PROMPTS[7] * 3
    sync_engine, async_engine = build(tiny_model_dir, False), build(tiny_model_dir, True)
    for engine in (sync_engine, async_engine):
        first = run(engine, [("a", long_prompt, greedy)])
        # The second request's prompt is the first's prompt and output: a deep cache hit,
        # over blocks that were named while placeholders were in flight.
        again = long_prompt + first[("a", 0)]["tokens"][:32]
        second = run(engine, [("b", again, greedy)])
        engine.results = (first, second)  # type: ignore[attr-defined]
    assert async_engine.results == sync_engine.results  # type: ignore[attr-defined]
    assert async_engine.kv.prefix_cache_hits > 16


def test_penalties_and_aborts(tiny_model_dir: Path) -> None:
    reqs = [
        ("pen", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                           repetition_penalty=1.3, frequency_penalty=0.5)),
        ("plain", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)),
        ("gone", PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)),
    ]
    sync = run(build(tiny_model_dir, False), reqs, abort_after={"gone": 5})
    asyn = run(build(tiny_model_dir, True), reqs, abort_after={"gone": 5})
    for key in [("pen", 0), ("plain", 0)]:
        assert asyn[key] == sync[key]
    # An abort lands between steps; async reports a step later, so it may have fewer tokens.
    assert asyn[("gone", 0)]["finish"] == sync[("gone", 0)]["finish"] == "abort"
    assert sync[("gone", 0)]["tokens"][:len(asyn[("gone", 0)]["tokens"])] == \
        asyn[("gone", 0)]["tokens"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grammar_rows_sample_after_the_previous_tokens(tiny_model_dir: Path, device: str) -> None:
    """Masked rows have their forward pass queued before the previous step's tokens are read;
    only their sampling waits for the grammar to take those tokens. Rows that end on the
    grammar's EOS while the next step is already queued, preemption and free rows alongside
    give exactly what plain stepping gives."""
    tok = Tokenizer.load(tiny_model_dir)
    compiler = GrammarCompiler(build_tokenizer(tok.hf, tok.vocab_size, [2]), tok.vocab_size)
    grammars = [build_grammar("regex", r"[a-z]{2,5}-[0-9]{1,3}"),
                build_grammar("choice", ["yes", "no", "maybe later"]),
                build_grammar("json", {"type": "object", "properties": {
                    "n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
                    "required": ["n", "tag"]}, disable_any_whitespace=True)]
    reqs, masks = [], {}
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=30 + i)
        if i % 3 == 2:
            params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        else:
            grammar = grammars[i % len(grammars)]
            masks[f"r{i}"] = lambda g=grammar: compiler.compile(g)
        reqs.append((f"r{i}", prompt, params))
    small = {"num_kv_blocks": 12, "block_size": 16, "max_num_batched_tokens": 32}
    sync = run(build(tiny_model_dir, False, device, **small), reqs, masks=masks)
    async_engine = build(tiny_model_dir, True, device, **small)
    asyn = run(async_engine, reqs, masks=masks)
    assert asyn == sync
    assert async_engine.scheduler.num_preemptions > 0
    assert sum(v["finish"] == "stop" for k, v in sync.items() if k[0] in masks) >= 3
