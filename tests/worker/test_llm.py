"""The offline API end to end on the built-in tiny model: shapes, sampling, stops, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker import LLM, SamplingParams
from worker.engine.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    PromptTooLongError,
)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), device="cpu", max_model_len=512)


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_generate_returns_results_in_prompt_order(llm: LLM) -> None:
    results = llm.generate(["Sluice serves", [5, 6, 7], {"prompt": "KV blocks"}], greedy(8),
                           use_tqdm=False)
    assert [r.prompt for r in results] == ["Sluice serves", None, "KV blocks"]
    assert results[1].prompt_token_ids == [5, 6, 7]
    for r in results:
        out = r.outputs[0]
        assert len(out.token_ids) == 8 and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_batching_does_not_change_greedy_output(llm: LLM) -> None:
    prompts = ["a", "the scheduler hands out a token budget", "x" * 50, "KV"]
    alone = [llm.generate(p, greedy(24), use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    together = llm.generate(prompts, greedy(24), use_tqdm=False)
    assert [r.outputs[0].token_ids for r in together] == alone


def test_seed_gives_same_tokens_whatever_shares_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=32, ignore_eos=True)
    alone = llm.generate("seeded prompt", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.2, seed=7, max_tokens=40, ignore_eos=True),
              greedy(10)]
    batch = llm.generate(["noise one", "seeded prompt", "noise two", "noise three"],
                         [others[0], seeded, others[1], others[2]], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True)
    draws = {tuple(llm.generate("seeded prompt", unseeded, use_tqdm=False)[0].outputs[0].token_ids)
             for _ in range(3)}
    assert len(draws) > 1, "unseeded sampling should vary"


def test_seeded_sampling_survives_preemption(tiny_model_dir: Path) -> None:
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=60, ignore_eos=True)
    prompts = [[10 + i] * 20 for i in range(6)]
    roomy = LLM(str(tiny_model_dir), device="cpu")
    tight = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=12)
    expected = [r.outputs[0].token_ids for r in roomy.generate(prompts, params, use_tqdm=False)]
    got = [r.outputs[0].token_ids for r in tight.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert tight.engine.stats().num_preemptions > 0


def test_n_completions_share_prompt_blocks(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), device="cpu", enable_prefix_caching=False)
    prompt = list(range(20, 60))  # 40 tokens: two full blocks
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    result = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 for o in result.outputs)
    assert len({tuple(o.token_ids) for o in result.outputs}) == 3
    # Each of the two followers reads the leader's two full prompt blocks.
    assert llm.engine.stats().prefix_cache_hits == 2 * 32
    # The first completion is what the same seed gives alone.
    solo = llm.generate([prompt], params.clone(n=1), use_tqdm=False)[0].outputs[0]
    assert solo.token_ids == result.outputs[0].token_ids


def test_stop_string_cuts_text_and_ends_request(llm: LLM) -> None:
    full = llm.generate("stop strings", greedy(40), use_tqdm=False)[0].outputs[0]
    stop = full.text[15:18]
    cut = full.text.index(stop)
    out = llm.generate("stop strings", greedy(40, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < 40
    kept = llm.generate("stop strings", greedy(40, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:cut + len(stop)]


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    full = llm.generate("stop tokens", greedy(30), use_tqdm=False)[0].outputs[0].token_ids
    stop_id = full[5]
    first = full.index(stop_id)
    out = llm.generate("stop tokens", greedy(30, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    held = llm.generate("stop tokens", greedy(30, stop_token_ids=[stop_id], min_tokens=first + 2),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= first + 2
    assert stop_id not in held.token_ids[:first + 1]


def test_eos_ends_request_unless_ignored(llm: LLM) -> None:
    eos = sorted(llm.engine.eos_token_ids)[0]
    # Forcing the EOS token through a logits mask: the request ends on it.
    llm.engine.add_request("eos", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=10),
                           logits_mask=OnlyTokens({eos}))
    outputs = _drain(llm)
    assert outputs["eos"] == ([eos], "stop")


def test_logprobs_are_normalized_and_ranked(llm: LLM) -> None:
    out = llm.generate("logprobs", greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry[token_id].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        values = sorted((lp.logprob for lp in entry.values()), reverse=True)
        assert values[0] <= 0 and all(v == pytest.approx(v) for v in values)
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True)))


def test_chat_renders_template(llm: LLM) -> None:
    result = llm.chat([{"role": "user", "content": "hello"}], greedy(4), use_tqdm=False)[0]
    im_start = llm.tokenizer.hf.convert_tokens_to_ids("<|im_start|>")
    assert result.prompt_token_ids[0] == im_start
    assert len(result.outputs[0].token_ids) == 4


@pytest.mark.parametrize("make_params", [
    lambda: SamplingParams(max_tokens=0),
    lambda: SamplingParams(temperature=-1.0),
    lambda: SamplingParams(top_p=0.0),
    lambda: SamplingParams(top_k=-5),
    lambda: SamplingParams(min_p=1.5),
    lambda: SamplingParams(n=0),
    lambda: SamplingParams(logprobs=100),
    lambda: SamplingParams(max_tokens=4, min_tokens=8),
    lambda: SamplingParams(presence_penalty=3.0),
    lambda: SamplingParams(temperature=float("nan")),
    lambda: SamplingParams(stop=[""]),
])
def test_bad_sampling_params_raise_typed_errors(make_params: object) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        make_params()  # type: ignore[operator]
    assert info.value.param is not None


def test_bad_prompts_are_rejected_before_any_step(llm: LLM) -> None:
    good = [1, 2, 3]
    with pytest.raises(PromptTooLongError, match="context is 512 tokens"):
        llm.generate([good, [7] * 600], greedy(4), use_tqdm=False)
    with pytest.raises(PromptTooLongError, match="max_tokens"):
        llm.generate([[7] * 500], greedy(20), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, 99999]], greedy(4), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="at least one token"):
        llm.generate([[]], greedy(4), use_tqdm=False)
    with pytest.raises(InvalidSamplingParamsError, match="stop_token_ids"):
        llm.generate([good], greedy(4, stop_token_ids=[10**6]), use_tqdm=False)
    # All or nothing: the valid prompt of a rejected batch left nothing behind.
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_duplicate_request_id_is_rejected(llm: LLM) -> None:
    llm.engine.add_request("dup", [1, 2, 3], greedy(2))
    with pytest.raises(DuplicateRequestError):
        llm.engine.add_request("dup", [1, 2, 3], greedy(2))
    _drain(llm)


class OnlyTokens:
    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[list(self.allowed)] = True
        return mask

    def accept_token(self, token_id: int) -> None:
        assert token_id in self.allowed


class ExplodesAfter:
    def __init__(self, num_tokens: int) -> None:
        self.remaining = num_tokens

    def allowed_tokens(self, vocab_size: int) -> None:
        if self.remaining == 0:
            raise ValueError("grammar state corrupted")
        return None

    def accept_token(self, token_id: int) -> None:
        self.remaining -= 1


def _drain(llm: LLM) -> dict[str, tuple[list[int], str | None]]:
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    while llm.engine.has_unfinished_requests():
        for eo in llm.engine.step():
            tokens.setdefault(eo.request_id, []).extend(eo.new_token_ids)
            if eo.finished:
                reasons[eo.request_id] = eo.finish_reason
    return {rid: (tokens[rid], reasons.get(rid)) for rid in tokens}


def test_logits_mask_restricts_tokens(llm: LLM) -> None:
    llm.engine.add_request("masked", [9, 9, 9], greedy(12), logits_mask=OnlyTokens({40, 41, 42}))
    outputs = _drain(llm)
    assert set(outputs["masked"][0]) <= {40, 41, 42} and len(outputs["masked"][0]) == 12


def test_one_failing_request_does_not_take_down_the_others(llm: LLM) -> None:
    solo = {i: llm.generate([[30 + i] * 5], greedy(16), use_tqdm=False)[0].outputs[0].token_ids
            for i in range(3)}
    for i in range(3):
        llm.engine.add_request(f"ok{i}", [30 + i] * 5, greedy(16))
    llm.engine.add_request("bad", [1, 2, 3], greedy(16), logits_mask=ExplodesAfter(3))
    outputs = _drain(llm)
    assert outputs["bad"][1] == "error" and len(outputs["bad"][0]) == 3
    for i in range(3):
        assert outputs[f"ok{i}"] == (solo[i], "length")
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_abort_frees_blocks_at_once(llm: LLM) -> None:
    llm.engine.add_request("long", list(range(1, 100)), greedy(200))
    llm.engine.step()
    llm.engine.step()
    assert llm.engine.kv.num_free_blocks < llm.engine.kv.pool.num_blocks
    aborted = llm.engine.abort("long")
    assert [o.finish_reason for o in aborted] == ["abort"]
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_kv_cache_is_sized_from_a_memory_budget(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), device="cpu", kv_cache_memory_bytes=2**20)
    cfg = llm.engine.model_config
    # float32 keys and values of every layer for one block of 16 tokens.
    bytes_per_block = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 16
    assert llm.engine.kv.pool.num_blocks == 2**20 // bytes_per_block
    assert llm.engine.max_model_len == llm.engine.kv.pool.num_blocks * 16
