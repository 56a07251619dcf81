"""Continuous batching: which tokens of which requests run in the next step.

There are no prefill and decode phases. Each request has `num_computed_tokens` and
`num_tokens`; a step hands out a token budget, running requests first, and a request whose
computed count catches up with its length gets a token sampled. Chunked prefill, prefix caching
and recompute after preemption all fall out of that one rule.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from worker.engine.block_manager import KVCacheManager
from worker.engine.config import EngineConfig
from worker.engine.request import PLACEHOLDER_TOKEN, Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int  # num_computed_tokens before this step
    block_ids: list[int]
    output_index: int = -1  # where this step's sampled token goes; set when the step launches

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so a new one follows."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class WaitingQueue:
    """FCFS order, or (priority, arrival) order under the priority policy."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        yield from self._fifo
        yield from (entry[-1] for entry in self._heap)

    def push(self, req: Request) -> None:
        if self.policy == "priority":
            heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._counter), req))
        else:
            self._fifo.append(req)

    def push_front(self, reqs: list[Request]) -> None:
        """Returns requests that were popped but not admitted, keeping their order first."""
        if self.policy == "priority":
            for req in reqs:
                self.push(req)
        else:
            self._fifo.extendleft(reversed(reqs))

    def pop(self) -> Request:
        if self.policy == "priority":
            return heapq.heappop(self._heap)[-1]
        return self._fifo.popleft()

    def remove(self, reqs: Iterable[Request]) -> None:
        gone = {id(r) for r in reqs}
        if self.policy == "priority":
            self._heap = [e for e in self._heap if id(e[-1]) not in gone]
            heapq.heapify(self._heap)
        else:
            self._fifo = deque(r for r in self._fifo if id(r) not in gone)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting = WaitingQueue(config.scheduling_policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.push(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        # After a preemption memory is short: admitting new work would only thrash.
        if not out.preempted:
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._awaits_final_token(req):
                i += 1
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if self._allocate_or_preempt(req, num_new, i, out):
                out.scheduled.append(ScheduledRequest(
                    req, num_new, req.num_computed_tokens, self.kv.block_ids(req.request_id)))
                budget -= num_new
                i += 1
            # Otherwise `req` was preempted and left `running`: index i is the next request.
        return budget

    def _allocate_or_preempt(self, req: Request, num_new: int, first_unscheduled: int,
                             out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(req, num_new):
            victim = self._pick_victim(first_unscheduled)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _pick_victim(self, first_unscheduled: int) -> Request:
        """The request to preempt, among those not yet scheduled this step."""
        candidates = self.running[first_unscheduled:]
        if self.config.scheduling_policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push_front([req])

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        held: list[Request] = []
        while len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.pop()
            if self._waits_for_sibling(req):
                held.append(req)
                continue
            computed, num_hit = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                held.append(req)
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, computed):
                held.append(req)
                break
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
                self.kv.record_prefix_lookup(req.num_tokens, num_hit)
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(
                req, num_new, num_hit, self.kv.block_ids(req.request_id)))
            budget -= num_new
        self.waiting.push_front(held)

    def _waits_for_sibling(self, req: Request) -> bool:
        """n > 1: a child waits until its leader has computed the prompt's full blocks."""
        leader = req.share_prompt_with
        if leader is None:
            return False
        boundary = (req.num_prompt_tokens - 1) // self.kv.block_size * self.kv.block_size
        if leader.is_finished or leader.num_computed_tokens >= boundary:
            req.share_prompt_with = None
            return False
        return True

    def _awaits_final_token(self, req: Request) -> bool:
        """Its last token is a placeholder that will end it (length): nothing left to run."""
        return req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len

    def update(self, out: SchedulerOutput, sampled: dict[str, int],
               errors: dict[str, str]) -> list[Request]:
        """Advances requests past a finished step; returns those that finished in it."""
        self.advance(out)
        return self.resolve(out, sampled, errors)

    def advance(self, out: SchedulerOutput) -> None:
        """The step was launched: its tokens count as computed, and each request that samples
        holds a placeholder for its new token, so the next step can be scheduled (and its input
        taken from the device) before this step's tokens reach the host."""
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted before the step was launched
                continue
            req.num_computed_tokens = s.start + s.num_new_tokens
            if s.samples:
                s.output_index = req.num_output_tokens
                req.append_output_token(PLACEHOLDER_TOKEN)

    def resolve(self, out: SchedulerOutput, sampled: dict[str, int],
                errors: dict[str, str]) -> list[Request]:
        """Fills in an advanced step's tokens; returns the requests that finished in it."""
        finished: list[Request] = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted, stopped, or ended by the step before this one
                continue
            if req.request_id in errors:
                if s.output_index >= 0:
                    req.truncate_output(s.output_index)
                req.error = errors[req.request_id]
                self.finish(req, RequestStatus.FINISHED_ERROR)
                finished.append(req)
                continue
            token_id = sampled.get(req.request_id)
            if s.output_index >= 0 and token_id is not None:
                req.set_output_token(s.output_index, token_id)
            # Only now are all computed tokens real, so only now may full blocks be named.
            self.kv.cache_computed_blocks(req)
            if token_id is None:
                continue
            status = self._stop_status(req, token_id, s.output_index + 1)
            if status is not None:
                req.truncate_output(s.output_index + 1)
                self.finish(req, status)
                finished.append(req)
        return finished

    def _stop_status(self, req: Request, token_id: int,
                     num_output: int) -> RequestStatus | None:
        """Whether the request ends with `token_id`, its `num_output`-th output token."""
        params = req.sampling_params
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if num_output >= req.max_tokens or req.num_prompt_tokens + num_output >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Ends a request wherever it is and frees its blocks. Idempotent."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove([req])
        req.status = status
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
