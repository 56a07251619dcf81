"""The worker's Redis front: jobs from the model's stream into the engine, tokens out by pub/sub.

Jobs are read (XREADGROUP) only while the engine has room, so unstarted work stays in Redis where
any worker can take it. Each engine step becomes one PUBLISH per reply channel carrying every
event for that channel. A request's record is written before its job is acknowledged, so a worker
that dies mid-request leaves the job pending for another worker to claim.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared import names, resp, trace
from shared.busy_poll import LoopPoller, run_loop, worker_window_s
from shared.messages import (
    Cancel,
    CompletionRecord,
    Event,
    Job,
    Reply,
    RequestRecord,
    Started,
    Usage,
)
from shared.resilient import run_resilient
from shared.settings import WorkerSettings
from worker import checkpoint
from worker.core_process import (
    Abort,
    AddRequest,
    Failed,
    Ready,
    Shutdown,
    StepResult,
    StopCompletion,
    core_main,
    run_core,
)
from worker.engine.engine import EngineStats
from worker.engine.errors import InvalidRequestError
from worker.engine.sampling_params import SamplingParams
from worker.metrics import WorkerMetrics
from worker.models.registry import resolve_model
from worker.outputs import CompletionDelta, Logprob, OutputProcessor, merge_deltas
from worker.pipe import LoopReader, LoopWriter, make_pipe
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Ends requests: KEYS = the stream, then per request its record, checkpoint and cancel-mark
# keys; ARGV = the group, the records' TTL, then per request its entry id and record JSON. All
# records are written before any job is acknowledged, so a failed write (out of memory, say)
# leaves every job pending. Acknowledged entries leave the stream, whose length is then the
# unfinished backlog that admission reads (Redis 6.2 reports no consumer-group lag); a cancel
# that raced the record is moot, and no marker should outlive the request.
_FINISH_SCRIPT = resp.Script("""
local n = (#KEYS - 1) / 3
for i = 0, n - 1 do
  redis.call('SET', KEYS[2 + 3 * i], ARGV[4 + 2 * i], 'EX', ARGV[2])
end
for i = 0, n - 1 do
  local id = ARGV[3 + 2 * i]
  redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
  redis.call('DEL', KEYS[3 + 3 * i], KEYS[4 + 3 * i])
end
return n""")


# Waits before sending a step's events again after losing Redis: about 4 s in all, the time an
# embedded Redis takes to restart and load its append-only file.
_PUBLISH_RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)


@dataclass
class Active:
    job: Job
    entry_id: str
    prompt_token_ids: list[int]  # the request's own prompt, without resumed tokens
    num_sent: dict[int, int] = field(default_factory=dict)  # tokens published per completion
    # Its requests in the engine: its own id, or one per completion resumed from a checkpoint.
    engine_ids: list[str] = field(default_factory=list)
    started: float | None = None  # when a worker first started it, for its record


class WorkerService:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.model_dir = resolve_model(settings.model)
        self.model_name = settings.served_model_name or Path(settings.model).name
        self.tokenizer = Tokenizer.load(self.model_dir)
        self.processor = OutputProcessor(self.tokenizer)
        self.metrics = WorkerMetrics(self.model_name)
        self.active: dict[str, Active] = {}
        self.stats: EngineStats | None = None
        self.state = "starting"
        self.stream = names.queue(self.model_name)
        self._ctx = mp.get_context("spawn")
        self._commands: Any = None  # a LoopWriter once the core starts
        self._core: Any = None
        self._core_lost = False  # the core process ended under us
        self._core_stopping = False  # Shutdown sent
        self._step_results: asyncio.Queue[Any] = asyncio.Queue()
        self._draining = asyncio.Event()
        self._exit = asyncio.Event()  # set by SIGTERM: exit once drained
        self._in_flight_adds = 0
        self._read_at = 0.0  # when the last XREADGROUP returned (trace points)
        self._poller = LoopPoller(0.0)  # its window is set once the core says where it runs
        self.max_model_len = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain)
        self._start_core(loop)
        ready = await self._step_results.get()
        if isinstance(ready, Failed):
            raise RuntimeError(f"engine failed to start: {ready.message}")
        assert isinstance(ready, Ready)
        self.max_model_len, self.stats = ready.max_model_len, ready.stats
        given = self.settings.busy_poll_ms
        self._poller.window_s = worker_window_s(None if given is None else given / 1e3,
                                                ready.device_type)
        if self._poller.window_s > 0:
            log.info("the front polls for %.0f ms after each job or step",
                     self._poller.window_s * 1e3)
        self.redis = aioredis.from_url(self.settings.redis_url)
        # The commands on every request's path (its read, lookups, tokens and end) go over
        # lean connections (shared/resp.py): redis-py's client work costs more than their round
        # trips. The blocking read has one of its own, or it would hold up the others.
        self._lane = resp.RespClient(self.settings.redis_url)
        self._reader = resp.RespClient(self.settings.redis_url)
        await self._lane.connection()
        await self._reader.connection()
        await self._ensure_group()
        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", self.settings.metrics_port)
        self.state = "ready"
        log.info("worker %s serving %s from %s (queue %s)", self.settings.worker_id,
                 self.model_name, self.model_dir, self.stream)
        # Each loop restarts after an error (Redis restarted, say) rather than leaving the
        # worker alive but deaf.
        tasks = [asyncio.create_task(run_resilient(loop_fn, loop_fn.__name__, log))
                 for loop_fn in (self._pull_loop, self._result_loop, self._heartbeat_loop,
                                 self._cancel_loop, self._claim_loop, self._control_loop)]
        tasks.append(asyncio.create_task(self._poller.run()))
        await self._draining.wait()
        self.state = "draining"
        await self._heartbeat()
        log.info("draining: %d requests in flight", len(self.active))
        while self.active and not self._core_lost:
            await asyncio.sleep(0.05)
        if not self._exit.is_set():
            # Drained on the scaler's request: stay, idle and visible as "drained", until the
            # backend removes this worker (a Deployment would restart a process that exited).
            self.state = "drained"
            await self._heartbeat()
            log.info("drained; waiting to be removed")
            await self._exit.wait()
        for t in tasks:
            t.cancel()
        await self.redis.delete(names.worker_heartbeat(self.settings.worker_id))
        await self.redis.hdel(names.WORKERS, self.settings.worker_id)
        self._core_stopping = True  # its exit is no loss now
        self._commands.put(Shutdown())
        self._core.join(timeout=10)
        await self._reader.aclose()
        await self._lane.aclose()
        await self.redis.aclose()
        if self._core_lost:
            # Its unfinished jobs stay pending in the stream: another worker claims them.
            raise RuntimeError(f"worker {self.settings.worker_id}: the engine core exited")
        log.info("worker %s stopped", self.settings.worker_id)

    def drain(self) -> None:
        """Stop reading jobs, finish what is running, exit."""
        self._exit.set()
        self._draining.set()

    def _core_spec(self) -> tuple[Callable[[dict[str, Any], Any, Any], None], dict[str, Any], str]:
        """What the core process runs: its loop, that loop's engine_args, the process name."""
        s = self.settings
        config: dict[str, Any] = {"max_num_seqs": s.max_num_seqs,
                                  "max_num_batched_tokens": s.max_num_batched_tokens,
                                  "max_model_len": s.max_model_len}
        if s.kv_cache_memory_bytes is not None:
            config["kv_cache_memory_bytes"] = s.kv_cache_memory_bytes
        args = {"model_dir": str(self.model_dir), "device": s.device, "dtype": s.dtype,
                "load_format": s.load_format, "config": config, "sampling_seed": s.seed,
                "busy_poll_s": _core_busy_poll_s(s)}
        return run_core, args, "sluice-engine-core"

    def _start_core(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts the core process, linked by two pipes that this event loop reads and writes
        itself: no thread between them, so a message costs one wake-up (`worker/pipe.py`)."""
        target, args, name = self._core_spec()
        cmd_r, cmd_w = make_pipe(self._ctx)
        res_r, res_w = make_pipe(self._ctx)
        self._core = self._ctx.Process(target=core_main, args=(target, args, cmd_r, res_w),
                                       name=name, daemon=True)
        self._core.start()
        # The child holds its own copies: closing ours lets each side see the other's exit.
        cmd_r.close()
        res_w.close()
        self._commands = LoopWriter(cmd_w, loop)
        LoopReader(res_r, loop, self._step_results.put_nowait, self._on_core_exit)

    def _on_core_exit(self) -> None:
        if self._core_stopping:
            return
        self._core_lost = True
        self._step_results.put_nowait(Failed("the engine core process exited"))

    async def _ensure_group(self) -> None:
        try:
            # From the stream's start: jobs queued before any worker existed must be served.
            await self.redis.xgroup_create(self.stream, names.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- intake ----------------------------------------------------------------------------

    def _has_room(self) -> bool:
        st = self.stats
        if st is None:
            return False
        waiting = st.num_waiting + self._in_flight_adds
        free_frac = st.num_free_blocks / max(st.num_total_blocks, 1)
        return waiting < self.settings.max_waiting and free_frac >= self.settings.min_free_blocks_frac

    async def _pull_loop(self) -> None:
        while not self._draining.is_set():
            if not self._has_room():
                await asyncio.sleep(0.002)
                continue
            st = self.stats
            room = self.settings.max_waiting - (st.num_waiting if st else 0) - self._in_flight_adds
            reply = await self._reader.execute(
                "XREADGROUP", "GROUP", names.WORKER_GROUP, self.settings.worker_id,
                "COUNT", max(1, min(self.settings.read_batch, room)), "BLOCK", 200,
                "STREAMS", self.stream, ">")
            self._read_at = time.time()
            if reply:
                self._poller.kick()
            # Each job goes to the engine before the round trip for its lookups, and that
            # round trip overlaps the next job's: a burst's last job does not wait for the
            # lookups of all the others.
            jobs = resp.stream_entries(reply)
            if len(jobs) == 1:  # the usual read while not busy: no task to wait a loop turn for
                await self._admit(*jobs[0], first_delivery=True)
            elif jobs:
                await asyncio.gather(*(self._admit(entry_id, fields, first_delivery=True)
                                       for entry_id, fields in jobs))

    async def _admit(self, entry_id: str, fields: dict[bytes, bytes],
                     first_delivery: bool = False) -> None:
        """Starts a job read from the stream. `first_delivery`: read with ">", so no worker
        ever had it, and it has no checkpoint and no earlier start to look up first."""
        try:
            job = Job.model_validate_json(fields[names.JOB_FIELD.encode()])
        except Exception as e:  # not ours to retry: record nothing, drop it
            log.error("dropping malformed job %s: %s", entry_id, e)
            await self.redis.xack(self.stream, names.WORKER_GROUP, entry_id)
            return
        if first_delivery:
            trace.point("f_read", job.id, self._read_at)
        # One round trip for the lookups and the start mark. NX: a redelivered job keeps its
        # first start, so its queue time stays the time it queued.
        now = time.time()
        if first_delivery:
            # The round trip sits between a job's arrival and its first token: the engine
            # starts first (even the round trip's commands are built after), and a job
            # cancelled while it queued is aborted after.
            running = await self._prepare_and_start(job, entry_id, None, now)
            is_cancelled, _ = await self._lane.pipeline(self._lookups(job.id, now))
            active = self.active.get(job.id)
            if running and is_cancelled and active is not None:
                self._commands.put(Abort(list(active.engine_ids)))
            return
        is_cancelled, _, ckpt, first_start = await self._lane.pipeline([
            *self._lookups(job.id, now),
            ("GET", names.checkpoint(self.model_name, job.id)),
            ("GET", names.started(self.model_name, job.id))])
        if is_cancelled:
            record = RequestRecord(id=job.id, model=self.model_name, kind=job.kind,
                                   status="cancelled", created=job.created, finished=time.time())
            await self._write_record_then_ack(record, entry_id)
            return
        started = Started.model_validate_json(first_start).started if first_start else None
        await self._prepare_and_start(job, entry_id, ckpt, started)

    def _lookups(self, req_id: str, now: float) -> list[tuple[str | int, ...]]:
        """Commands for one round trip: is the request cancelled, and mark its start unless
        one is marked."""
        return [("EXISTS", names.cancelled(self.model_name, req_id)),
                ("SET", names.started(self.model_name, req_id),
                 Started(worker_id=self.settings.worker_id, started=now).model_dump_json(),
                 "NX", "EX", self.settings.record_ttl_s)]

    async def _prepare_and_start(self, job: Job, entry_id: str, ckpt: bytes | None,
                                 started: float | None) -> bool:
        """Checks and tokenizes a job and hands it to the engine; False if it failed instead."""
        if job.deadline is not None and time.time() > job.deadline:
            await self._fail(job, entry_id, [], "the request's deadline passed before it started",
                             "timeout")
            return False
        try:
            prompt_ids = self._tokenize(job)
            params = SamplingParams(**job.sampling)
            if len(prompt_ids) >= self.max_model_len:
                raise InvalidRequestError(
                    f"this model's context is {self.max_model_len} tokens and the prompt has "
                    f"{len(prompt_ids)}", param="messages" if job.kind == "chat" else "prompt")
            vocab = self.tokenizer.vocab_size
            bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"prompt token id {bad} is outside the vocabulary [0, {vocab})",
                    param="prompt")
        except (InvalidRequestError, ValueError, TypeError, OverflowError) as e:
            await self._fail(job, entry_id, [], str(e), "invalid_request_error")
            return False
        try:
            await self._start(job, entry_id, prompt_ids, params, ckpt, started)
        except Exception as e:  # one job's failure must never stop this worker reading jobs
            log.exception("job %s failed to start", job.id)
            self.active.pop(job.id, None)
            self.processor.pop(job.id)
            await self._fail(job, entry_id, [], f"{type(e).__name__}: {e}", "server_error")
            return False
        return True

    async def _start(self, job: Job, entry_id: str, prompt_ids: list[int],
                     params: SamplingParams, ckpt: bytes | None, started: float | None) -> None:
        active = Active(job, entry_id, prompt_ids, started=started)
        adds = [AddRequest(job.id, prompt_ids, params, job.priority, job.grammar)]
        if ckpt:  # the output processor replays what the client has before the engine goes on
            self.processor.add_request(job.id, job.prompt, prompt_ids, params)
            adds = self._resume(active, params, checkpoint.parse(ckpt, params.n))
        active.engine_ids = [add.request_id for add in adds]
        self.active[job.id] = active
        self._in_flight_adds += len(adds)
        # Timed before the write: the core may take the request before this process goes on.
        trace.point("f_engine", job.id)
        for add in adds:
            self._commands.put(add)
        if not ckpt:
            # After the engine has the request, so the front's own set-up overlaps the
            # engine's step; no result is read before this returns to the event loop.
            try:
                self.processor.add_request(job.id, job.prompt, prompt_ids, params)
            except Exception:
                self._commands.put(Abort(active.engine_ids))
                raise
        self.metrics.admitted(job.id, job.created, len(prompt_ids))
        if not adds:  # every completion had ended; the worker died before writing the record
            await self._write_records_then_ack([self._finish(job.id)])

    def _resume(self, active: Active, params: SamplingParams,
                progress: list[checkpoint.CompletionProgress]) -> list[AddRequest]:
        """Continues each completion from the tokens its client already has, so a sampled
        completion stays one generation; one that had ended stays as it ended.

        Completions with different prefixes cannot share one engine request: with n > 1 each
        unfinished one runs as a single-completion request of its own (seed + index when
        seeded, as the engine seeds its n children) whose outputs the processor routes back.
        """
        job, adds = active.job, []
        for index, p in enumerate(progress):
            out = self.processor.replay(job.id, index, p.chunks, p.finish_reason, p.stop_reason)
            active.num_sent[index] = num_done = len(out.token_ids)
            if out.finished:
                continue
            engine_id = job.id if params.n == 1 else f"{job.id}#{index}"
            if params.n > 1:
                self.processor.route(engine_id, job.id, index)
            left = (params.max_tokens or self.max_model_len) - num_done
            part = params.clone(
                n=1, seed=None if params.seed is None else params.seed + index,
                max_tokens=max(left, 1),
                min_tokens=max(0, min(params.min_tokens - num_done, left)))
            # A resumed request's matcher is advanced over the tokens it already produced.
            adds.append(AddRequest(engine_id, active.prompt_token_ids + out.token_ids, part,
                                   job.priority, job.grammar, list(out.token_ids)))
        log.info("resuming %s after %s tokens", job.id,
                 "+".join(str(active.num_sent[i]) for i in range(len(progress))))
        return adds

    def _tokenize(self, job: Job) -> list[int]:
        if job.kind == "chat":
            extra: dict[str, Any] = {"tools": job.tools} if job.tools else {}
            return self.tokenizer.apply_chat_template(
                job.messages or [], add_generation_prompt=job.add_generation_prompt,
                **extra, **job.chat_template_kwargs)
        if job.prompt_token_ids is not None:
            return list(job.prompt_token_ids)
        return self.tokenizer.encode(job.prompt or "")

    # -- output ----------------------------------------------------------------------------

    async def _result_loop(self) -> None:
        while True:
            items = [await self._step_results.get()]
            # A front that fell behind the core takes every step already waiting and publishes
            # them as one: a completion's tokens from several steps go out in one event, one
            # checkpoint line and one PUBLISH per channel, so the backlog shrinks instead of
            # growing with every step the core makes meanwhile.
            while not self._step_results.empty():
                items.append(self._step_results.get_nowait())
            got = time.perf_counter()
            self._poller.kick()
            deltas: list[CompletionDelta] = []
            steps: list[tuple[EngineStats, int]] = []
            for item in items:
                if isinstance(item, Failed):
                    log.error("engine core failed: %s", item.message)
                    self.drain()
                elif isinstance(item, StepResult):
                    deltas += await self._take_step(item)
                    steps.append((item.stats, sum(len(o.new_token_ids) for o in item.outputs)))
            if deltas:
                await self._publish(deltas if len(steps) == 1 else merge_deltas(deltas), got)
            for stats, num_tokens in steps:
                self.metrics.step(stats, num_tokens)

    async def _take_step(self, item: StepResult) -> list[CompletionDelta]:
        """One step's results through the output processor: its rejections failed, its
        completions' text and stop strings worked out; returns their deltas."""
        if trace.ON:
            for o in item.outputs:
                active = self.active.get(o.request_id)
                if o.new_token_ids and active is not None and not active.num_sent.get(0):
                    trace.point("f_result", o.request_id)
        self.stats = item.stats
        self._in_flight_adds = 0
        for rej in item.rejected:
            rid, _ = self.processor.owner(rej.request_id)
            active = self.active.get(rid)
            if active is not None:
                self.processor.pop(rid)
                others = [e for e in active.engine_ids if e != rej.request_id]
                if others:  # the request's other resumed completions end with it
                    self._commands.put(Abort(others))
                await self._fail(active.job, active.entry_id, active.prompt_token_ids,
                                 rej.message, "invalid_request_error")
        deltas, stops = self.processor.process(item.outputs)
        for rid, index, stop in stops:
            self._commands.put(StopCompletion(rid, index, stop))
        return deltas

    async def _publish(self, deltas: list[CompletionDelta], got: float) -> None:
        """One pipeline for the step's checkpoints and PUBLISHes, then its metrics (timed at
        `got`, when the step's results arrived: their cost stays off the tokens' path), then
        the records of the requests it ended."""
        by_channel: dict[str, list[dict[str, Any]]] = {}
        finished: list[str] = []
        ckpt_keys: list[str] = []
        ckpt_lines: list[str] = []
        for d in deltas:
            active = self.active.get(d.request_id)
            if active is None:
                continue
            seq = active.num_sent.get(d.index, 0)
            if trace.ON and seq == 0 and d.index == 0 and d.token_ids:
                trace.point("f_publish", d.request_id)
            active.num_sent[d.index] = seq + len(d.token_ids)
            if d.token_ids or d.finish_reason is not None:
                ckpt_keys.append(names.checkpoint(self.model_name, d.request_id))
                ckpt_lines.append(checkpoint.line(d.index, d.token_ids, d.finish_reason,
                                                  d.stop_reason, seq))
            result = self.processor.get(d.request_id)
            done = result is not None and result.finished
            # An `Event` as plain JSON: built for every completion on every step, where model
            # objects cost more than the rest of the publish. Fields left out take their defaults.
            event: dict[str, Any] = {"req_id": d.request_id, "index": d.index, "seq": seq,
                                     "text": d.text, "token_ids": d.token_ids}
            if seq == 0:
                event["prompt_tokens"] = len(active.prompt_token_ids)
            lps = self._logprobs(d, active.job)
            if lps is not None:
                event["logprobs"] = lps
            if d.finish_reason is not None:
                event["finish_reason"] = d.finish_reason
                event["stop_reason"] = d.stop_reason
                if done:
                    event["usage"] = self._usage(result, active).model_dump()
            if d.error is not None:
                event["error"] = d.error
            if active.job.reply_channel:
                by_channel.setdefault(active.job.reply_channel, []).append(event)
            if done and d.request_id not in finished:
                finished.append(d.request_id)
        # The checkpoint lines go ahead of the PUBLISHes in one pipeline: a client never holds
        # tokens that a resumed request would not continue from.
        commands: list[tuple[str | int, ...]] = []
        if ckpt_keys:
            commands.append(("EVAL", checkpoint.APPEND_SCRIPT, len(ckpt_keys), *ckpt_keys,
                             "".join(ckpt_lines), self.settings.record_ttl_s))
        for channel, events in by_channel.items():
            commands.append(("PUBLISH", channel,
                             json.dumps({"events": events}, separators=(",", ":"))))
        if commands:
            # A Redis restart is waited out, not turned into a gap in every stream: a resend
            # may repeat events and checkpoint lines, both told apart by their seq.
            await self._lane.pipeline(commands, retry_delays_s=_PUBLISH_RETRY_DELAYS_S)
        for d in deltas:
            self.metrics.tokens(d.request_id, len(d.token_ids), got)
        if finished:  # one round trip for every request this step ended
            await self._write_records_then_ack([self._finish(rid) for rid in finished])

    def _logprobs(self, d: CompletionDelta, job: Job) -> list[dict[str, Any]] | None:
        if d.logprobs is None:
            return None
        k = int(job.sampling.get("logprobs") or 0)
        out = []
        for token_id, entry in zip(d.token_ids, d.logprobs, strict=False):
            chosen: Logprob = entry[token_id]
            top = sorted(((lp.decoded_token or "", tid, lp.logprob) for tid, lp in entry.items()
                          if lp.rank is not None and lp.rank <= k), key=lambda t: -t[2])
            out.append({"token": chosen.decoded_token or "", "token_id": token_id,
                        "logprob": chosen.logprob, "top": [list(t) for t in top[:k]]})
        return out

    def _finish(self, rid: str) -> tuple[RequestRecord, str] | None:
        """Forgets an ended request; its record and stream entry, for the caller to write."""
        active = self.active.pop(rid, None)
        result = self.processor.pop(rid)
        if active is None or result is None:
            return None
        reasons = {o.finish_reason for o in result.outputs}
        self.metrics.finished(rid, result.outputs[0].finish_reason or "abort",
                              sum(len(o.token_ids) for o in result.outputs))
        status: Literal["completed", "failed", "cancelled"] = (
            "cancelled" if reasons == {"abort"} else "failed" if "error" in reasons
            else "completed")
        record = RequestRecord(
            id=rid, model=self.model_name, kind=active.job.kind, status=status,
            created=active.job.created, started=active.started, finished=time.time(),
            prompt_token_ids=active.prompt_token_ids,
            completions=[CompletionRecord(
                index=o.index, text=o.text, token_ids=o.token_ids,
                logprobs=None, finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                for o in result.outputs],
            usage=self._usage(result, active),
            error=next((o.error for o in result.outputs if o.error), None))
        return record, active.entry_id

    def _usage(self, result: Any, active: Active) -> Usage:
        completion = sum(len(o.token_ids) for o in result.outputs)
        prompt = len(active.prompt_token_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion, cached_tokens=result.num_cached_tokens)

    async def _fail(self, job: Job, entry_id: str, prompt_ids: list[int], message: str,
                    error_type: str) -> None:
        self.active.pop(job.id, None)
        if job.reply_channel:
            event = Event(req_id=job.id, seq=0, finish_reason="error", error=message,
                          error_type=error_type)
            await self.redis.publish(job.reply_channel, Reply(events=[event]).model_dump_json())
        record = RequestRecord(id=job.id, model=self.model_name, kind=job.kind, status="failed",
                               created=job.created, finished=time.time(),
                               prompt_token_ids=prompt_ids, error=message, error_type=error_type)
        await self._write_record_then_ack(record, entry_id)

    async def _write_record_then_ack(self, record: RequestRecord, entry_id: str) -> None:
        await self._write_records_then_ack([(record, entry_id)])

    async def _write_records_then_ack(self, ended: list[tuple[RequestRecord, str] | None]
                                      ) -> None:
        """Writes each record, then acknowledges its job: one script call for them all.

        Records first: a crash between the two leaves the job pending, never lost; a record that
        Redis refuses (out of memory) stops the script before any acknowledgement.
        """
        done = [e for e in ended if e is not None]
        if not done:
            return
        keys = [self.stream]
        args: list[Any] = [names.WORKER_GROUP, self.settings.record_ttl_s]
        for record, entry_id in done:
            keys += [names.request_record(self.model_name, record.id),
                     names.checkpoint(self.model_name, record.id),
                     names.cancelled(self.model_name, record.id)]
            args += [entry_id, record.model_dump_json()]
        await self._lane.run_script(_FINISH_SCRIPT, keys, args)

    # -- recovery --------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        """Takes over jobs whose worker stopped refreshing them (it died mid-request)."""
        while not self._draining.is_set():
            await asyncio.sleep(self.settings.heartbeat_s)
            if not self._has_room():
                continue
            autoclaim: Any = await self.redis.xautoclaim(
                self.stream, names.WORKER_GROUP, self.settings.worker_id,
                min_idle_time=self.settings.claim_idle_ms, start_id="0-0",
                count=self.settings.read_batch)
            claimed = autoclaim[1]  # [next id, entries] on Redis 6.2; a third item on 7
            for entry_id, fields in claimed:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if not fields:  # deleted from the stream meanwhile
                    await self.redis.xack(self.stream, names.WORKER_GROUP, eid)
                    continue
                info: Any = await self.redis.xpending_range(
                    self.stream, names.WORKER_GROUP, min=eid, max=eid, count=1)
                deliveries = int(info[0]["times_delivered"]) if info else 1
                if deliveries > self.settings.max_deliveries:
                    await self._dead_letter(eid, fields, deliveries)
                    continue
                log.warning("claimed job %s from a silent worker (delivery %d)", eid, deliveries)
                await self._admit(eid, fields)

    async def _dead_letter(self, entry_id: str, fields: dict[bytes, bytes],
                           deliveries: int) -> None:
        """A job that keeps killing workers is set aside instead of taking down the fleet."""
        raw = fields[names.JOB_FIELD.encode()]
        await self.redis.xadd(names.dead_letters(self.model_name),
                              {names.JOB_FIELD: raw, "deliveries": deliveries,
                               "worker": self.settings.worker_id})
        try:
            job = Job.model_validate_json(raw)
        except Exception:
            await self.redis.xack(self.stream, names.WORKER_GROUP, entry_id)
            return
        log.error("job %s failed on %d deliveries; moved to %s", job.id, deliveries,
                  names.dead_letters(self.model_name))
        await self._fail(job, entry_id, [],
                         f"the request failed on {deliveries} workers and was set aside",
                         "server_error")

    # -- control ---------------------------------------------------------------------------

    async def _cancel_loop(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(names.cancel_channel(self.model_name))
        async for message in pubsub.listen():
            if message.get("type") != "message":
                continue
            try:
                cancel = Cancel.model_validate_json(message["data"])
            except Exception:
                continue
            active = self.active.get(cancel.req_id)
            if active is not None:
                self._commands.put(Abort(list(active.engine_ids)))

    async def _control_loop(self) -> None:
        """The scaler's orders: "drain" stops intake and finishes in-flight work, then the
        worker reports "drained" and waits for SIGTERM."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(names.worker_control(self.settings.worker_id))
        async for message in pubsub.listen():
            if message.get("type") != "message":
                continue
            try:
                action = json.loads(message["data"]).get("action")
            except (ValueError, AttributeError):
                continue
            if action == "drain" and not self._draining.is_set():
                log.info("drain requested by the scaler")
                self._draining.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat()
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _heartbeat(self) -> None:
        st = self.stats
        now = time.time()
        beat: dict[str, Any] = {"worker_id": self.settings.worker_id, "model": self.model_name, "state": self.state,
                "kv_usage": st.kv_cache_usage if st else 0.0,
                "running": st.num_running if st else 0, "waiting": st.num_waiting if st else 0,
                "free_blocks": st.num_free_blocks if st else 0,
                "capacity": self.settings.max_num_seqs, "active": len(self.active),
                "pid": os.getpid(), "ts": now, "expires": now + self.settings.heartbeat_ttl_s}
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(names.worker_heartbeat(self.settings.worker_id), json.dumps(beat), px=ttl_ms)
        pipe.hset(names.WORKERS, self.settings.worker_id, json.dumps(beat))
        await pipe.execute()
        if self.active:  # keep our pending jobs fresh so no live request is claimed away
            await self.redis.xclaim(self.stream, names.WORKER_GROUP, self.settings.worker_id, 0,
                                    [a.entry_id for a in self.active.values()], justid=True)


def _core_busy_poll_s(s: WorkerSettings) -> float | None:
    """The engine core's polling window: core_busy_poll_ms, else busy_poll_ms, else None, which
    lets the core choose by its device (worker/core_process.py)."""
    ms = s.busy_poll_ms if s.core_busy_poll_ms is None else s.core_busy_poll_ms
    return None if ms is None else ms / 1e3


def serve(settings: WorkerSettings) -> None:
    run_front(WorkerService(settings))


def run_front(service: WorkerService) -> None:
    """Runs a worker front to its end, on uvloop where it is installed (a faster event loop)."""
    run_loop(service.run())
