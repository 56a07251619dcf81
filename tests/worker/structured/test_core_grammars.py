"""The engine core process's loop with grammars: a request joins the engine once its grammar is
compiled, one aborted while compiling ends at once, a bad grammar fails only its own request."""

from __future__ import annotations

import queue
import re
import threading
from pathlib import Path
from typing import Any

from worker.core_process import Abort, AddRequest, Ready, Shutdown, StepResult, run_core
from worker.engine.sampling_params import SamplingParams
from worker.structured.spec import build_grammar
from worker.tokenizer import Tokenizer

PATTERN = r"[a-z]{2,5}-[0-9]{2}"


def test_core_runs_grammar_requests_beside_free_ones(tiny_model_dir: Path) -> None:
    commands: queue.Queue[Any] = queue.Queue()
    results: queue.Queue[Any] = queue.Queue()
    args = {"model_dir": str(tiny_model_dir), "device": "cpu",
            "config": {"num_kv_blocks": 64, "max_num_seqs": 8}}
    core = threading.Thread(target=run_core, args=(args, commands, results), daemon=True)
    core.start()
    assert isinstance(results.get(timeout=60), Ready)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=24)
    grammar = build_grammar("regex", PATTERN)
    commands.put(AddRequest("g", [5, 6, 7], params, grammar=grammar))
    commands.put(AddRequest("gone", [5, 6], params, grammar=build_grammar("regex", "x+y")))
    commands.put(Abort(["gone"]))
    commands.put(AddRequest("free", [5, 6, 7], params))
    # Not a grammar llguidance can build: validated grammars never look like this.
    commands.put(AddRequest("bad", [5], params, grammar="start: nowhere"))
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    rejected: dict[str, str] = {}
    while len(finished) + len(rejected) < 4:
        item = results.get(timeout=60)
        assert isinstance(item, StepResult)
        rejected.update({r.request_id: r.message for r in item.rejected})
        for out in item.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason:
                finished[out.request_id] = out.finish_reason
    commands.put(Shutdown())
    core.join(timeout=30)
    assert finished["gone"] == "abort"
    assert finished["g"] == "stop" and finished["free"] in ("stop", "length")
    assert "structured output" in rejected["bad"]
    text = Tokenizer.load(tiny_model_dir).decode(tokens["g"])
    assert re.fullmatch(PATTERN, text), text
