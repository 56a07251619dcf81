"""A stand-in for the engine core that runs no model: for measuring the worker front and Redis.

`run_null_core` speaks the protocol of `worker/core_process.py` exactly (`Ready` first, then one
`StepResult` per step; it takes `AddRequest`, `Abort`, `StopCompletion` and `Shutdown`), so a
`WorkerService` whose `_start_core` starts it instead of `run_core` serves requests end to end.
Every step gives each running completion one token, `null_token_id` (65 unless set), and a
completion ends with finish reason "length" at its max_tokens (or at the context when max_tokens
is None); stop tokens and EOS are never produced. A step takes `null_step_s` seconds (default 0:
as fast as the loop turns), counted from the start of the previous one, so the offered rate is
running completions / null_step_s tokens per second. Requests beyond `max_num_seqs` wait, as they
would in the engine; there is no KV cache, so every block is always free.

engine_args is the dict `WorkerService._core_spec` builds (`config` holds max_num_seqs and
max_model_len; `model_dir`, when given, supplies the vocabulary size) plus `null_step_s` and
`null_token_id`.

Used by `loadtest/null_worker.py` and `loadtest/gateway_overhead.py --mode bus`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.core_process import (
    Abort,
    AddRequest,
    Ready,
    Rejected,
    Shutdown,
    StepResult,
    StopCompletion,
    drain,
)
from worker.engine.engine import EngineOutput, EngineStats

log = logging.getLogger(__name__)

DEFAULT_TOKEN_ID = 65
DEFAULT_MAX_NUM_SEQS = 4096
DEFAULT_MAX_MODEL_LEN = 1 << 16
DEFAULT_VOCAB_SIZE = 32000
# No KV cache: the front sees this many blocks, all free, so it never stops reading jobs for
# lack of blocks.
NUM_BLOCKS = 1 << 20


@dataclass
class _Request:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    produced: list[int]  # tokens given so far, per completion
    done: list[bool]  # per completion: finished (length, stop or abort)
    arrival: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(self.done)


class NullCore:
    """The bookkeeping of `run_null_core`, separate from the queues so it can be tested alone."""

    def __init__(self, max_num_seqs: int, max_model_len: int, vocab_size: int,
                 token_id: int = DEFAULT_TOKEN_ID) -> None:
        if max_num_seqs < 1 or max_model_len < 2:
            raise ValueError("max_num_seqs must be >= 1 and max_model_len >= 2")
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.token_id = token_id
        self.running: dict[str, _Request] = {}  # insertion order = admission order
        self.waiting: deque[_Request] = deque()
        self.num_steps = 0

    # -- commands --------------------------------------------------------------------------

    def add(self, cmd: AddRequest) -> Rejected | None:
        rid, prompt, params = cmd.request_id, cmd.prompt_token_ids, cmd.params
        if not rid or rid in self.running or any(r.request_id == rid for r in self.waiting):
            return Rejected(rid, f"request {rid!r} is already running")
        if not prompt:
            return Rejected(rid, "the prompt must contain at least one token")
        room = self.max_model_len - len(prompt)
        if room < 1:
            return Rejected(rid, f"the prompt has {len(prompt)} tokens; this model's context is "
                                 f"{self.max_model_len} tokens")
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            return Rejected(rid, f"this model's context is {self.max_model_len} tokens; the prompt "
                                 f"has {len(prompt)} and max_tokens asks for {max_tokens} more")
        n = max(1, int(params.n))
        self.waiting.append(_Request(rid, len(prompt), max_tokens, [0] * n, [False] * n))
        return None

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        outputs = []
        for rid in request_ids:
            req = self.running.pop(rid, None)
            if req is None:
                req = next((r for r in self.waiting if r.request_id == rid), None)
                if req is None:
                    continue
                self.waiting.remove(req)
            for index, done in enumerate(req.done):
                if not done:
                    outputs.append(EngineOutput(rid, index, [], finish_reason="abort",
                                                num_prompt_tokens=req.num_prompt_tokens))
        return outputs

    def stop_completion(self, request_id: str, index: int) -> None:
        """The front found a stop string: end that completion, silently, as the engine does."""
        req = self.running.get(request_id)
        if req is None or index >= len(req.done):
            return
        req.done[index] = True
        if req.finished:
            del self.running[request_id]

    # -- the step --------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[EngineOutput]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            self.running[req.request_id] = req
        outputs = []
        ended = []
        tok = self.token_id
        for rid, req in self.running.items():
            for index, done in enumerate(req.done):
                if done:
                    continue
                req.produced[index] += 1
                last = req.produced[index] >= req.max_tokens
                if last:
                    req.done[index] = True
                outputs.append(EngineOutput(rid, index, [tok],
                                            finish_reason="length" if last else None,
                                            num_prompt_tokens=req.num_prompt_tokens))
            if req.finished:
                ended.append(rid)
        for rid in ended:
            del self.running[rid]
        self.num_steps += 1
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           num_free_blocks=NUM_BLOCKS, num_total_blocks=NUM_BLOCKS,
                           kv_cache_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0,
                           num_preemptions=0)


def _vocab_size(engine_args: dict[str, Any]) -> int:
    if engine_args.get("vocab_size"):
        return int(engine_args["vocab_size"])
    model_dir = engine_args.get("model_dir")
    if model_dir:
        try:
            return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
        except (OSError, KeyError, ValueError):
            pass
    return DEFAULT_VOCAB_SIZE


def build_null_core(engine_args: dict[str, Any]) -> NullCore:
    config = engine_args.get("config") or {}
    return NullCore(max_num_seqs=int(config.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS),
                    max_model_len=int(config.get("max_model_len") or DEFAULT_MAX_MODEL_LEN),
                    vocab_size=_vocab_size(engine_args),
                    token_id=int(engine_args.get("null_token_id", DEFAULT_TOKEN_ID)))


def run_null_core(engine_args: dict[str, Any], commands: Any, results: Any) -> None:
    """Process entry point with `run_core`'s signature and protocol; see the module docstring."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    step_s = float(engine_args.get("null_step_s", 0.0))
    if step_s < 0:
        raise ValueError(f"null_step_s must be >= 0, got {step_s}")
    core = build_null_core(engine_args)
    log.info("null engine core: one token (id %d) per running completion every %.3g ms, "
             "max_num_seqs %d", core.token_id, step_s * 1e3, core.max_num_seqs)
    results.put(Ready(core.max_model_len, core.vocab_size, core.stats()))
    next_step = time.perf_counter()
    while True:
        rejected: list[Rejected] = []
        outputs: list[EngineOutput] = []
        idle = not core.has_unfinished()
        # Idle: block for the next command instead of spinning.
        pending = [commands.get()] if idle else []
        pending += drain(commands)
        for cmd in pending:
            if isinstance(cmd, Shutdown):
                return
            if isinstance(cmd, AddRequest):
                rej = core.add(cmd)
                if rej is not None:
                    rejected.append(rej)
            elif isinstance(cmd, Abort):
                outputs += core.abort(cmd.request_ids)
            elif isinstance(cmd, StopCompletion):
                core.stop_completion(cmd.request_id, cmd.index)
        t0 = time.perf_counter()
        if idle:  # work just arrived: the first step takes a full interval from now
            next_step = t0
        if core.has_unfinished():
            # The step "runs" for step_s: commands that arrive meanwhile wait for the next one,
            # as they do behind a real forward pass.
            next_step += step_s
            delay = next_step - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:  # fell behind (the put below was slow): no burst of catch-up steps
                next_step = time.perf_counter()
            outputs += core.step()
        if outputs or rejected or pending:
            results.put(StepResult(outputs, core.stats(), rejected, time.perf_counter() - t0))
