"""`python -m infra.probe`: a worker pod's readiness check, read from the worker's own heartbeat.

Exits 0 only while the heartbeat `sluice:w:{worker_id}` exists (the worker refreshes it every
second with a short TTL, so a wedged or dead worker loses it) and says state "ready". A worker
that is still loading its model ("starting"), or draining or drained before removal, fails the
check, so Kubernetes keeps it out of rotation and its ReplicaSet deletes it before any ready pod
on a scale-down. Used as the exec readiness probe of infra/k8s/worker.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import redis

from shared import names
from shared.settings import DEFAULT_REDIS_URL

READY_STATE = "ready"


class NotReady(Exception):
    """The worker is not ready to take jobs; the message says why."""


def check(redis_url: str, worker_id: str, timeout_s: float = 2.0) -> str:
    """The worker's heartbeat summary when it is ready; raises NotReady otherwise."""
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    try:
        raw = client.get(names.worker_heartbeat(worker_id))
    except redis.RedisError as e:
        raise NotReady(f"cannot read the heartbeat from Redis at {redis_url}: {e}") from e
    finally:
        client.close()
    if raw is None:
        raise NotReady(f"no heartbeat from worker {worker_id} (not started yet, or stopped)")
    try:
        beat = json.loads(raw)
        state = beat["state"]
    except (ValueError, TypeError, KeyError) as e:
        raise NotReady(f"unreadable heartbeat from worker {worker_id}: {raw!r}") from e
    if state != READY_STATE:
        raise NotReady(f"worker {worker_id} is {state}")
    return (f"worker {worker_id} is ready: model {beat.get('model')}, "
            f"{beat.get('running', 0)} running, kv usage {float(beat.get('kv_usage', 0)):.0%}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.probe",
        description="Exit 0 when this worker's heartbeat in Redis says it is ready, 1 when not "
                    "(starting, draining, drained, gone, or Redis unreachable), 2 when the "
                    "check is misconfigured. The reason goes to stdout, which Kubernetes shows "
                    "in the pod's events.")
    parser.add_argument("--worker-id", default=os.environ.get("SLUICE_WORKER_ID"),
                        help="the worker to check (default: $SLUICE_WORKER_ID, which the "
                             "manifest sets to the pod name)")
    parser.add_argument("--redis-url", default=os.environ.get("SLUICE_REDIS_URL",
                                                              DEFAULT_REDIS_URL),
                        help="default: $SLUICE_REDIS_URL, else %(default)s")
    parser.add_argument("--timeout-s", type=float, default=2.0,
                        help="Redis connect and read timeout (default %(default)s)")
    args = parser.parse_args(argv)
    if not args.worker_id:
        print("no worker id: set SLUICE_WORKER_ID (the worker's own id) or pass --worker-id")
        return 2
    try:
        print(check(args.redis_url, args.worker_id, args.timeout_s))
    except NotReady as e:
        print(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
