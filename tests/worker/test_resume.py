"""The worker front's resume from a checkpoint, without an engine: which engine requests it
starts and how each completion's outputs find their way back."""

from __future__ import annotations

from pathlib import Path

from shared.messages import Job
from shared.settings import WorkerSettings
from worker.checkpoint import CompletionProgress
from worker.engine.engine import EngineOutput
from worker.engine.sampling_params import SamplingParams
from worker.service import Active, WorkerService


def test_each_unfinished_completion_resumes_as_its_own_request(tiny_model_dir: Path) -> None:
    service = WorkerService(WorkerSettings(model=str(tiny_model_dir), served_model_name="tiny"))
    service.max_model_len = 2048
    prompt = service.tokenizer.encode("resume me")
    words = service.tokenizer.encode(" one two three four five six")
    params = SamplingParams(n=3, seed=7, max_tokens=10, min_tokens=4)
    job = Job(id="r", model="tiny", kind="completion", prompt="resume me",
              sampling={"n": 3, "seed": 7, "max_tokens": 10, "min_tokens": 4})
    active = Active(job, "1-0", prompt)
    service.processor.add_request("r", job.prompt, prompt, params)
    adds = service._resume(active, params, [
        CompletionProgress([words[:2], words[2:3]], "stop", 0),  # ended before the crash
        CompletionProgress([words[:1], words[1:3]]),
        CompletionProgress(),  # nothing published yet
    ])

    assert [a.request_id for a in adds] == ["r#1", "r#2"]
    assert active.num_sent == {0: 3, 1: 3, 2: 0}
    one, two = adds
    assert one.prompt_token_ids == prompt + words[:3] and one.grammar_prefix == words[:3]
    assert (one.params.n, one.params.seed, one.params.max_tokens, one.params.min_tokens) == (
        1, 8, 7, 1)
    assert two.prompt_token_ids == prompt and (two.params.seed, two.params.max_tokens) == (9, 10)

    # The resumed completion 1 gets the engine's outputs of "r#1"; completion 0 stays ended.
    deltas, _ = service.processor.process([EngineOutput("r#1", 0, words[3:4]),
                                           EngineOutput("r#2", 0, words[:1])])
    assert [(d.request_id, d.index) for d in deltas] == [("r", 1), ("r", 2)]
    result = service.processor.get("r")
    assert result is not None
    first = service.tokenizer.decode(words[:3])
    assert result.outputs[0].text == first and result.outputs[0].finish_reason == "stop"
    assert result.outputs[1].text == service.tokenizer.decode(words[:4])
    assert result.outputs[1].token_ids == words[:4] and not result.finished


def test_a_request_that_had_ended_resumes_nothing(tiny_model_dir: Path) -> None:
    service = WorkerService(WorkerSettings(model=str(tiny_model_dir), served_model_name="tiny"))
    service.max_model_len = 2048
    params = SamplingParams(n=1, max_tokens=2)
    job = Job(id="s", model="tiny", kind="completion", prompt="x", sampling={"max_tokens": 2})
    active = Active(job, "1-0", [5])
    service.processor.add_request("s", job.prompt, [5], params)
    assert service._resume(active, params, [CompletionProgress([[6], [7]], "length")]) == []
    result = service.processor.get("s")
    assert result is not None and result.finished and result.outputs[0].token_ids == [6, 7]
