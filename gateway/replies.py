"""This gateway's one reply channel, demultiplexed to the requests waiting on it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError

from shared import resp, trace
from shared.messages import Event, Reply
from shared.resilient import run_resilient

log = logging.getLogger(__name__)


class ReplyRouter:
    """Subscribes once to `channel` and hands each event to the queue of its request.

    The subscription is a lean connection (`shared/resp.py`) whose read callback parses each
    message and puts its events on their queues: a reply reaches its stream with no listener
    task to wake and no client library in between.
    """

    def __init__(self, redis_url: str, channel: str,
                 on_message: Callable[[], None] = lambda: None) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self._on_message = on_message  # called for every message on the channel
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def wait_subscribed(self, timeout_s: float) -> bool:
        """True once the channel is subscribed (at once, but after Redis dropped it): a job
        queued while it is not would have its replies published to nobody."""
        if self._subscribed.is_set():
            return True
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            return False
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def register(self, req_id: str) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[req_id] = q
        return q

    def unregister(self, req_id: str) -> None:
        self._queues.pop(req_id, None)

    async def _run(self) -> None:
        # Redis may restart under a running gateway: subscribe again rather than go deaf.
        await run_resilient(self._listen, f"reply channel {self.channel}", log)

    async def _listen(self) -> None:
        conn = await resp.connect(self.redis_url, on_message=self._route)
        try:
            await conn.execute("SUBSCRIBE", self.channel)
            self._subscribed.set()
            await conn.wait_closed()
        finally:
            self._subscribed.clear()
            conn.close()
        raise RedisConnectionError(f"the subscription to {self.channel} was closed")

    def _route(self, channel: bytes, data: bytes) -> None:
        self._on_message()
        try:
            reply = Reply.model_validate_json(data)
        except Exception as e:
            log.error("dropping a malformed reply: %s", e)
            return
        for event in reply.events:
            if trace.ON and event.seq == 0 and event.token_ids:
                trace.point("g_reply", event.req_id)
            q = self._queues.get(event.req_id)
            if q is not None:
                q.put_nowait(event)


@dataclass
class Progress:
    """Per-completion sequence tracking: drops duplicates, notes gaps, knows when all ended."""

    n: int
    next_seq: list[int] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_seq = [0] * self.n
        self.finish = [None] * self.n

    def accept(self, ev: Event) -> bool:
        if ev.index >= self.n:
            return False
        if ev.token_ids and ev.seq < self.next_seq[ev.index]:
            return False  # a redelivery of tokens already passed on
        if ev.seq > self.next_seq[ev.index]:
            log.warning("request %s completion %d: tokens %d..%d never arrived", ev.req_id,
                        ev.index, self.next_seq[ev.index], ev.seq - 1)
        self.next_seq[ev.index] = ev.seq + len(ev.token_ids)
        if ev.finish_reason is not None:
            self.finish[ev.index] = ev.finish_reason
        return True

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)
