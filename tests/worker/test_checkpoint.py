"""Checkpoint lines and the resume they drive: a replayed completion continues the text its
client already has, whatever the held-back text or the stop strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import names
from worker import checkpoint
from worker.engine.engine import EngineOutput
from worker.engine.sampling_params import SamplingParams
from worker.outputs import CompletionDelta, Logprob, OutputProcessor, merge_deltas
from worker.tokenizer import Tokenizer

VOCAB = 2048


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_model_dir)


def test_lines_parse_back_per_completion() -> None:
    raw = (checkpoint.line(0, [5, 6], None, None, 0) + checkpoint.line(1, [7], None, None, 0)
           + checkpoint.line(0, [8], "stop", 2, 2) + checkpoint.line(3, [9], None, None, 0))
    p0, p1 = checkpoint.parse(raw.encode(), n=2)  # index 3 belongs to no completion: ignored
    assert (p0.chunks, p0.finish_reason, p0.stop_reason) == ([[5, 6], [8]], "stop", 2)
    assert (p1.chunks, p1.finish_reason) == ([[7]], None)


def test_a_step_appended_twice_is_read_once() -> None:
    """The front sends a step again after losing Redis, which may have run the first send."""
    step1 = checkpoint.line(0, [5, 6], None, None, 0) + checkpoint.line(1, [7], None, None, 0)
    step2 = checkpoint.line(0, [8], None, None, 2) + checkpoint.line(1, [], "stop", None, 1)
    step3 = checkpoint.line(0, [], "length", None, 3)
    raw = step1 + step1 + step2 + step2 + step3 + step3
    p0, p1 = checkpoint.parse(raw, n=2)
    assert (p0.chunks, p0.finish_reason) == ([[5, 6], [8], []], "length")
    assert (p1.chunks, p1.finish_reason) == ([[7], []], "stop")


def test_lines_without_seq_of_earlier_workers_still_parse() -> None:
    raw = "[0,[5,6]]\n[0,[5,6]]\n[0,[8],\"stop\",2]\n"  # no seq: nothing is taken as a copy
    (p,) = checkpoint.parse(raw, n=1)
    assert (p.chunks, p.finish_reason, p.stop_reason) == ([[5, 6], [5, 6], [8]], "stop", 2)


def test_an_earlier_workers_checkpoint_is_read_as_completion_0() -> None:
    (p,) = checkpoint.parse(json.dumps({"token_ids": [1, 2, 3], "text": "abc"}), n=1)
    assert p.chunks == [[1, 2, 3]] and p.finish_reason is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=2, max_size=30),
       cut=st.integers(min_value=1, max_value=29), stop=st.sampled_from([[], ["e"], ["th", "a "]]))
def test_replay_then_continue_gives_the_clients_text(tokenizer: Tokenizer, ids: list[int],
                                                    cut: int, stop: list[str]) -> None:
    """Completion 1 of request "r" runs uninterrupted; a second processor replays its first
    `cut` tokens (one step each, as published) and gets the rest from a separate engine request
    routed to it: the client's text is the uninterrupted text."""
    cut = min(cut, len(ids) - 1)
    params = SamplingParams(n=2, max_tokens=len(ids), stop=stop)
    whole = OutputProcessor(tokenizer)
    whole.add_request("r", None, [1, 2, 3], params)
    client: list[str] = []
    for i, t in enumerate(ids):
        deltas, _ = whole.process([EngineOutput("r", 1, [t], finish_reason="length"
                                                if i == len(ids) - 1 else None)])
        client += [d.text for d in deltas if i < cut]
    full = whole.get("r")
    assert full is not None
    if full.outputs[1].finished and len(full.outputs[1].token_ids) <= cut:
        return  # a stop string ended it before the cut: nothing to resume

    resumed = OutputProcessor(tokenizer)
    resumed.add_request("r", None, [1, 2, 3], params)
    out = resumed.replay("r", 1, [[t] for t in ids[:cut]], None, None)
    assert out.text == "".join(client) and out.token_ids == ids[:cut]
    resumed.route("r#1", "r", 1)
    for i, t in enumerate(ids[cut:], start=cut):
        deltas, stops = resumed.process([EngineOutput("r#1", 0, [t], finish_reason="length"
                                                      if i == len(ids) - 1 else None)])
        assert all(d.request_id == "r" and d.index == 1 for d in deltas)
        assert all(s[:2] == ("r#1", 0) for s in stops)  # the engine's ids, to end it there
        client += [d.text for d in deltas]
    assert "".join(client) == full.outputs[1].text
    done = resumed.pop("r")
    assert done is not None and done.outputs[1].finish_reason == full.outputs[1].finish_reason
    assert resumed.owner("r#1") == ("r#1", 0)  # the route went with the request


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=30),
       groups=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=4),
       stop=st.sampled_from([[], ["e"], ["th", "a "]]))
def test_steps_merged_by_a_lagging_front_give_the_same_stream_and_checkpoint(
        tokenizer: Tokenizer, ids: list[int], groups: list[int], stop: list[str]) -> None:
    """A front that fell behind publishes several steps' deltas as one per completion: the
    client gets the same text, tokens and end in fewer pieces, and the checkpoint lines those
    pieces make replay to that text."""
    params = SamplingParams(n=2, max_tokens=len(ids), stop=stop)
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", None, [1, 2, 3], params)
    steps = []
    for i in range(len(ids)):
        end = "length" if i == len(ids) - 1 else None
        deltas, _ = proc.process([EngineOutput("r", 0, [ids[i]], finish_reason=end),
                                  EngineOutput("r", 1, [ids[-1 - i]], finish_reason=end)])
        steps.append(deltas)
    merged, k = [], 0
    for size in (groups * len(ids))[:len(ids)]:
        if k < len(steps):
            group = merge_deltas([d for step in steps[k:k + size] for d in step])
            assert len({d.index for d in group}) == len(group)  # one delta per completion
            merged.append(group)
        k += size
    replayed = OutputProcessor(tokenizer)
    replayed.add_request("r", None, [1, 2, 3], params)
    for index in (0, 1):
        one = [d for step in steps for d in step if d.index == index]
        joined = [d for group in merged for d in group if d.index == index]
        assert "".join(d.text for d in joined) == "".join(d.text for d in one)
        assert [t for d in joined for t in d.token_ids] == [t for d in one for t in d.token_ids]
        assert (joined[-1].finish_reason, joined[-1].stop_reason) == (one[-1].finish_reason,
                                                                      one[-1].stop_reason)
        assert all(d.finish_reason is None for d in joined[:-1])
        out = replayed.replay("r", index, [d.token_ids for d in joined if d.token_ids],
                              joined[-1].finish_reason, joined[-1].stop_reason)
        assert out.text == "".join(d.text for d in one)
        assert (out.finish_reason, out.stop_reason) == (one[-1].finish_reason, one[-1].stop_reason)


def test_merged_deltas_join_logprobs_in_step_order() -> None:
    def delta(rid: str, tokens: list[int], logprobs: bool, end: str | None = None
              ) -> CompletionDelta:
        lps = [{t: Logprob(-float(t))} for t in tokens] if logprobs else None
        return CompletionDelta(rid, 0, "".join(map(str, tokens)), tokens, lps, end, None, None)

    a, b = merge_deltas([delta("a", [1], True), delta("b", [7], False), delta("a", [2, 3], True),
                         delta("b", [8], False, "length"), delta("a", [4], True, "stop")])
    assert (a.request_id, a.text, a.token_ids, a.finish_reason) == ("a", "1234", [1, 2, 3, 4],
                                                                    "stop")
    assert a.logprobs is not None and [next(iter(e)) for e in a.logprobs] == [1, 2, 3, 4]
    assert (b.text, b.token_ids, b.logprobs, b.finish_reason) == ("78", [7, 8], None, "length")


def test_one_script_call_appends_a_step_for_every_request(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = [names.checkpoint("tiny", "a"), names.checkpoint("tiny", "b")]
    r.eval(checkpoint.APPEND_SCRIPT, 3, keys[0], keys[1], keys[0],
           checkpoint.line(0, [1], None, None, 0) + checkpoint.line(1, [2, 3], None, None, 0)
           + checkpoint.line(1, [4], "length", None, 0), 60)
    r.eval(checkpoint.APPEND_SCRIPT, 1, keys[1], checkpoint.line(1, [5], "stop", "\n", 2), 60)
    a0, a1 = checkpoint.parse(r.get(keys[0]) or b"", n=2)
    assert a0.chunks == [[1]] and (a1.chunks, a1.finish_reason) == ([[4]], "length")
    (b,) = checkpoint.parse(r.get(keys[1]) or b"", n=2)[1:]
    assert (b.chunks, b.finish_reason, b.stop_reason) == ([[2, 3], [5]], "stop", "\n")
    assert all(0 < r.ttl(k) <= 60 for k in keys)
    r.close()
