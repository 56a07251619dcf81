"""Long-running loops that outlive a Redis restart instead of dying with it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

# A loop that ran this long before failing had recovered: its next failure backs off from the
# start again.
_HEALTHY_S = 30.0


async def run_resilient(loop_fn: Callable[[], Awaitable[None]], what: str,
                        log: logging.Logger) -> None:
    """Runs `loop_fn` until it returns, restarting it after any error with a growing delay
    (0.1 s doubling up to 5 s), so a process keeps serving once Redis is back."""
    delay_s = 0.1
    while True:
        started = time.monotonic()
        try:
            await loop_fn()
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if time.monotonic() - started > _HEALTHY_S:
                delay_s = 0.1
            log.warning("%s stopped (%s: %s); restarting it in %.1f s", what, type(e).__name__,
                        e, delay_s, exc_info=not isinstance(e, RedisError))
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)
