"""The gateway's reply router against a real Redis: events reach their request's queue, and the
subscription comes back after Redis drops it."""

from __future__ import annotations

import asyncio
import time

import redis

from gateway.replies import ReplyRouter
from shared.messages import Event, Reply


def _reply(*events: Event) -> str:
    return Reply(events=list(events)).model_dump_json()


def test_events_reach_their_queues_and_the_subscription_survives_a_drop(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    kicks = []

    async def main() -> None:
        router = ReplyRouter(redis_url, "gw:test", on_message=lambda: kicks.append(1))
        await router.start()
        a, b = router.register("a"), router.register("b")
        r.publish("gw:test", "not json")  # logged and dropped
        r.publish("gw:test", _reply(Event(req_id="a", seq=0, text="x"),
                                    Event(req_id="gone", seq=0),  # no longer waited for
                                    Event(req_id="b", seq=0, text="y")))
        assert (await asyncio.wait_for(a.get(), 5)).text == "x"
        assert (await asyncio.wait_for(b.get(), 5)).text == "y"
        assert len(kicks) == 2

        router.unregister("b")
        assert r.client_kill_filter(_type="pubsub") == 1  # Redis restarts, say
        deadline = time.monotonic() + 10
        while r.pubsub_numsub("gw:test")[0][1] == 0:  # subscribed again, after a short delay
            assert time.monotonic() < deadline, "the router did not subscribe again"
            await asyncio.sleep(0.05)
        r.publish("gw:test", _reply(Event(req_id="a", seq=1, text="z"),
                                    Event(req_id="b", seq=1, text="w")))
        assert (await asyncio.wait_for(a.get(), 5)).text == "z"
        assert b.empty()
        await router.stop()
    asyncio.run(main())
