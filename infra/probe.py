"""`python -m infra.probe`: a worker pod's probes, read from the worker's own heartbeat in Redis.

The worker refreshes `sluice:w:{worker_id}` every second with a short TTL, so a wedged or dead
worker loses it. Three uses in infra/k8s/base/worker.yaml:

- readiness (no flag): passes only while the heartbeat says "ready". A worker still loading its
  model, or draining or drained before removal, fails it, so its ReplicaSet deletes it before
  any ready pod on a scale-down.
- startup (`--alive`): passes once the heartbeat exists in any state, i.e. the model is loaded.
  Kubernetes holds the liveness probe back until then, however long loading takes.
- liveness (`--alive --redis-down-ok`): fails when Redis answers and this worker has no
  heartbeat: its front has hung or its heartbeat stopped, and a restart is what helps. An
  unreachable Redis passes, because then no worker can beat and restarting them all would only
  add a cold start to the outage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import redis

from shared import names

READY_STATE = "ready"


class NotReady(Exception):
    """The check failed; the message says why."""


class RedisUnreachable(NotReady):
    """Redis did not answer, so the worker's state is unknown."""


def read_heartbeat(redis_url: str, worker_id: str, timeout_s: float = 2.0) -> dict[str, object]:
    """The worker's latest heartbeat; NotReady when it has none."""
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    try:
        raw = client.get(names.worker_heartbeat(worker_id))
    except redis.RedisError as e:
        raise RedisUnreachable(f"cannot read the heartbeat from Redis at {redis_url}: {e}") from e
    finally:
        client.close()
    if raw is None:
        raise NotReady(f"no heartbeat from worker {worker_id} (not started yet, or stopped)")
    try:
        beat = json.loads(raw)
    except ValueError:
        beat = None
    if not isinstance(beat, dict) or "state" not in beat:
        raise NotReady(f"unreadable heartbeat from worker {worker_id}: {raw!r}")
    return beat


def check(redis_url: str, worker_id: str, timeout_s: float = 2.0, *,
          any_state: bool = False) -> str:
    """A summary when the worker is ready (or, with `any_state`, alive); NotReady otherwise."""
    beat = read_heartbeat(redis_url, worker_id, timeout_s)
    state = beat["state"]
    if state != READY_STATE and not any_state:
        raise NotReady(f"worker {worker_id} is {state}")
    return (f"worker {worker_id} is {state}: model {beat.get('model')}, "
            f"{beat.get('running', 0)} running")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.probe",
        description="Exit 0 when this worker's heartbeat in Redis says it is ready (with "
                    "--alive: when it has one, in any state), 1 when not (starting, draining, "
                    "drained, gone, or Redis unreachable), 2 when the check is misconfigured. "
                    "The reason goes to stdout, which Kubernetes shows in the pod's events.")
    parser.add_argument("--worker-id", default=os.environ.get("SLUICE_WORKER_ID"),
                        help="the worker to check (default: $SLUICE_WORKER_ID, which the "
                             "manifest sets to the pod name)")
    parser.add_argument("--redis-url", default=os.environ.get("SLUICE_REDIS_URL"),
                        help="default: $SLUICE_REDIS_URL, else the settings' default")
    parser.add_argument("--alive", action="store_true",
                        help="pass on a heartbeat in any state, not only ready (startup and "
                             "liveness probes)")
    parser.add_argument("--redis-down-ok", action="store_true",
                        help="pass when Redis does not answer (liveness: do not restart "
                             "every worker for a Redis outage)")
    parser.add_argument("--timeout-s", type=float, default=2.0,
                        help="Redis connect and read timeout (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.redis_url is None:
        # Imported only here: the settings module is half of this check's start-up time, and
        # the kubelet runs it every few seconds in every worker pod.
        from shared.settings import DEFAULT_REDIS_URL

        args.redis_url = DEFAULT_REDIS_URL
    if not args.worker_id:
        print("no worker id: set SLUICE_WORKER_ID (the worker's own id) or pass --worker-id")
        return 2
    try:
        print(check(args.redis_url, args.worker_id, args.timeout_s, any_state=args.alive))
    except RedisUnreachable as e:
        print(e)
        return 0 if args.redis_down_ok else 1
    except NotReady as e:
        print(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
