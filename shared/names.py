"""Every Redis key, stream, group and channel Sluice uses, built in one place.

Keys of one model share the hash tag `{model}`, so a model's stream, records and dead letters live
on one shard of a Redis Cluster and multi-key commands on them stay legal.
"""

from __future__ import annotations

PREFIX = "sluice"
WORKER_GROUP = "workers"  # consumer group of every model queue
JOB_FIELD = "job"  # the stream entry field that holds a job's JSON


def _tag(model: str) -> str:
    return f"{PREFIX}:{{{model}}}"


def queue(model: str) -> str:
    """Stream of jobs for one model, read by the workers' consumer group."""
    return f"{_tag(model)}:q"


def dead_letters(model: str) -> str:
    """Stream of jobs that failed on every delivery."""
    return f"{_tag(model)}:dead"


def request_record(model: str, request_id: str) -> str:
    """Hash-free JSON record of a finished request (final text, tokens, usage), with a TTL."""
    return f"{_tag(model)}:req:{request_id}"


def started(model: str, request_id: str) -> str:
    """Which worker first started a request, and when (`messages.Started`): the job view's
    "running" and its queue time."""
    return f"{_tag(model)}:started:{request_id}"


def checkpoint(model: str, request_id: str) -> str:
    """Tokens and text a request has produced so far, so another worker can resume it."""
    return f"{_tag(model)}:ckpt:{request_id}"


def cancelled(model: str, request_id: str) -> str:
    """Marks a request cancelled, so a worker that picks it up later drops it unrun."""
    return f"{_tag(model)}:cancelled:{request_id}"


def cancel_channel(model: str) -> str:
    """Pub/sub channel on which gateways ask a model's workers to drop a request."""
    return f"{_tag(model)}:cancel"


def gateway_channel(gateway_id: str) -> str:
    """Pub/sub channel one gateway reads every reply on."""
    return f"{PREFIX}:gw:{gateway_id}"


def worker_heartbeat(worker_id: str) -> str:
    return f"{PREFIX}:w:{worker_id}"


WORKER_HEARTBEAT_PATTERN = f"{PREFIX}:w:*"
# Hash of every worker's latest heartbeat (worker id -> JSON with an "expires" time), so readers
# find the fleet with one HGETALL instead of scanning the keyspace.
WORKERS = f"{PREFIX}:workers"


def worker_control(worker_id: str) -> str:
    """Pub/sub channel on which the scaler tells one worker to drain (`{"action": "drain"}`)."""
    return f"{PREFIX}:ctl:{worker_id}"


# Hash of the models the scaler manages (model -> JSON {state cold|warming|ready, desired, ...}),
# so the gateway knows a model that has no worker at all, and says whether it is warming up.
MODELS = f"{PREFIX}:models"


def idempotency(tenant: str, key: str) -> str:
    """Maps a client's Idempotency-Key to the request it created."""
    return f"{PREFIX}:idem:{tenant}:{key}"


def job_index(request_id: str) -> str:
    """Which model an async job belongs to, so GET /v1/jobs/{id} finds its record."""
    return f"{PREFIX}:job:{request_id}"
