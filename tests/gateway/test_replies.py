"""The gateway's reply router against a real Redis: events reach their request's queue, and the
subscription comes back after Redis drops it."""

from __future__ import annotations

import asyncio

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
        assert await router.wait_subscribed(0)
        assert r.client_kill_filter(_type="pubsub") == 1  # Redis restarts, say
        await asyncio.sleep(0.02)  # the drop is seen; the new subscription comes after a delay
        assert not await router.wait_subscribed(0)  # no job may be queued meanwhile
        assert await router.wait_subscribed(10), "the router did not subscribe again"
        assert r.pubsub_numsub("gw:test")[0][1] == 1
        r.publish("gw:test", _reply(Event(req_id="a", seq=1, text="z"),
                                    Event(req_id="b", seq=1, text="w")))
        assert (await asyncio.wait_for(a.get(), 5)).text == "z"
        assert b.empty()
        await router.stop()
    asyncio.run(main())
