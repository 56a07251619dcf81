"""The engine core in a process of its own: commands in, one result per step out.

The worker's Redis front (tokenizing, detokenizing, publishing) runs in another process, so Python
work there never stalls the step loop here, and this loop never waits on the network.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from shared import trace
from shared.busy_poll import worker_window_s
from worker.engine.engine import EngineOutput, EngineStats
from worker.engine.sampling_params import SamplingParams
from worker.pipe import BlockingReader, BlockingWriter

log = logging.getLogger(__name__)


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    grammar: str | None = None  # llguidance grammar text: structured output
    grammar_prefix: list[int] = field(default_factory=list)  # output tokens of a resumed request


@dataclass
class Abort:
    request_ids: list[str]


@dataclass
class StopCompletion:
    request_id: str
    index: int
    stop_reason: str


@dataclass
class Shutdown:
    pass


@dataclass
class Ready:
    max_model_len: int
    vocab_size: int
    stats: EngineStats
    device_type: str = "cpu"  # where the engine runs: "cuda" or "cpu"


@dataclass
class Rejected:
    request_id: str
    message: str


@dataclass
class StepResult:
    outputs: list[EngineOutput]
    stats: EngineStats
    rejected: list[Rejected] = field(default_factory=list)
    step_s: float = 0.0


@dataclass
class Failed:
    message: str


def drain(commands: Any) -> list[Any]:
    """Every command already queued, without waiting."""
    out = []
    while True:
        try:
            out.append(commands.get_nowait())
        except queue.Empty:
            return out


def seed_unseeded_sampling(seed: int | None) -> int:
    """Seeds the generator that requests without a seed draw from; None picks a random seed.

    The engine seeds everything with a fixed value while it builds the model (dummy weights
    must match across replicas), which would leave every worker, and every restart of one,
    drawing the same "random" tokens for the same unseeded request.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    torch.manual_seed(seed)  # CPU and every CUDA device
    return seed


def core_main(target: Callable[[dict[str, Any], Any, Any], None], engine_args: dict[str, Any],
              command_conn: Any, result_conn: Any) -> None:
    """Process entry point: runs `target` (`run_core`, or a stand-in with its protocol) on the
    two pipe ends the front made (`worker/pipe.py`).

    The front owns this process's life: it sends Shutdown once drained, and its exit closes the
    pipe. A Ctrl-C or SIGTERM sent to the whole process group must not end the engine under
    requests the front is still finishing, so both are ignored here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        target(engine_args, BlockingReader(command_conn), BlockingWriter(result_conn))
    except (EOFError, BrokenPipeError):  # the front closed its end: nobody is left to serve
        log.warning("the worker front is gone; the engine core exits")


def run_core(engine_args: dict[str, Any], commands: Any, results: Any) -> None:
    """Process entry point: builds the engine, then steps while there is work."""
    from worker.engine.config import EngineConfig
    from worker.engine.engine import Engine
    from worker.engine.errors import InvalidRequestError
    from worker.structured.matcher import GrammarCompiler, build_tokenizer
    from worker.structured.pending import PendingGrammars
    from worker.tokenizer import Tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()  # before the slow engine start, during which the front may die
    sampling_seed = engine_args.pop("sampling_seed", None)
    busy_poll_s: float | None = engine_args.pop("busy_poll_s", None)
    try:
        config = EngineConfig(**engine_args.pop("config"))
        engine = Engine(config=config, **engine_args)
        seed_unseeded_sampling(sampling_seed)
    except Exception as e:  # the front reports it and exits
        log.exception("engine failed to start")
        results.put(Failed(f"{type(e).__name__}: {e}"))
        return
    # A core that drives a GPU and was given no window polls: its step to a first token is
    # shorter than after a sleep.
    busy_poll_s = worker_window_s(busy_poll_s, engine.device.type)
    if busy_poll_s > 0:
        log.info("the engine core polls for commands for %.0f ms after each step",
                 busy_poll_s * 1e3)
    results.put(Ready(engine.max_model_len, engine.vocab_size, engine.stats(),
                      engine.device.type))
    grammars: PendingGrammars[AddRequest] = PendingGrammars(GrammarCompiler(
        lambda: build_tokenizer(Tokenizer.load(engine_args["model_dir"]).hf, engine.vocab_size,
                                engine.eos_token_ids), engine.vocab_size,
        prefetch=engine.device.type == "cuda"))
    untraced: set[str] = set()  # requests whose first token is still to come, when tracing
    poll_until = 0.0
    while True:
        rejected: list[Rejected] = []
        outputs: list[EngineOutput] = []
        pending: list[Any] = []
        # Idle: block for the next command (after busy_poll_s of polling for it, when asked
        # for: shared/busy_poll.py), but notice a front that died without saying so (killed),
        # so the engine and its memory do not outlive it.
        while not engine.has_unfinished_requests() and not pending:
            if grammars.any_ready():
                break
            try:
                if time.monotonic() < poll_until:
                    pending.append(commands.get_nowait())
                    continue
                # While grammars compile, look back soon: their requests start when they are done.
                pending.append(commands.get(timeout=0.005 if len(grammars) else 1.0))
            except queue.Empty:
                if time.monotonic() < poll_until:
                    continue
                if os.getppid() != parent:
                    log.warning("the worker front is gone; the engine core exits")
                    return
        pending += drain(commands)
        for cmd in pending:
            if isinstance(cmd, Shutdown):
                return
            if isinstance(cmd, AddRequest) and cmd.grammar is not None:
                grammars.add(cmd.request_id, cmd, cmd.grammar, cmd.grammar_prefix)
            elif isinstance(cmd, AddRequest):
                trace.point("c_add", cmd.request_id)
                if trace.ON:
                    untraced.add(cmd.request_id)
                try:
                    engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params,
                                       priority=cmd.priority)
                except InvalidRequestError as e:
                    rejected.append(Rejected(cmd.request_id, str(e)))
            elif isinstance(cmd, Abort):
                outputs += engine.abort(cmd.request_ids)
                outputs += [EngineOutput(rid, 0, [], finish_reason="abort")
                            for rid in grammars.remove(cmd.request_ids)]
            elif isinstance(cmd, StopCompletion):
                engine.stop_completion(cmd.request_id, cmd.index, cmd.stop_reason)
        compiled = grammars.pop_ready()
        for rid, cmd, mask, why in compiled:
            try:
                if mask is None:
                    raise InvalidRequestError(f"structured output: {why}")
                engine.add_request(rid, cmd.prompt_token_ids, cmd.params, priority=cmd.priority,
                                   logits_mask=mask)
            except InvalidRequestError as e:
                rejected.append(Rejected(rid, str(e)))
        t0 = time.perf_counter()
        if engine.has_unfinished_requests():
            outputs += engine.step()
        if outputs or rejected or pending or compiled:
            # Requests still compiling their grammar wait too: the front counts them before it
            # takes more work from the queue.
            stats = engine.stats()
            stats = replace(stats, num_waiting=stats.num_waiting + len(grammars))
            if trace.ON:
                for o in outputs:
                    if o.request_id in untraced and o.new_token_ids:
                        untraced.discard(o.request_id)
                        trace.point("c_token", o.request_id)
            results.put(StepResult(outputs, stats, rejected, time.perf_counter() - t0))
            poll_until = time.monotonic() + busy_poll_s
