"""The worker front's intake with a real Redis and a real worker process (a null engine core):
jobs queued before any worker exists, one of them cancelled while it waited."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from shared import names
from shared.messages import Job


def test_queued_jobs_all_end_and_one_cancelled_while_queued_ends_cancelled(
        redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    model = "intake"
    jobs = [Job(id=f"job-{i}", model=model, kind="completion", prompt_token_ids=[5, 6, 7],
                sampling={"max_tokens": 8 if i else 60_000, "temperature": 0.0})
            for i in range(12)]
    r.set(names.cancelled(model, "job-0"), 1)  # the long one: cancelled before any worker ran
    for job in jobs:
        r.xadd(names.queue(model), {names.JOB_FIELD: job.model_dump_json()})
    env = {**os.environ, "SLUICE_REDIS_URL": redis_url, "SLUICE_MODEL": str(tiny_model_dir),
           "SLUICE_SERVED_MODEL_NAME": model, "SLUICE_WORKER_ID": "intake-worker"}
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "loadtest.null_worker", "--null-step-s",
                               "0.01"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        keys = [names.request_record(model, j.id) for j in jobs]
        while not all(r.exists(k) for k in keys):
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not every job got a record"
            time.sleep(0.05)
        records = {j.id: json.loads(r.get(k)) for j, k in zip(jobs, keys, strict=True)}
        assert records["job-0"]["status"] == "cancelled", records["job-0"].get("error")
        assert all(records[j.id]["status"] == "completed" for j in jobs[1:])
        assert all(records[j.id]["usage"]["completion_tokens"] == 8 for j in jobs[1:])
        assert r.xlen(names.queue(model)) == 0  # every job acknowledged and removed
        assert not r.exists(names.cancelled(model, "job-0"))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        log.close()
        r.close()
