"""A worker whose engine core runs no model: the real Redis front over `worker.null_core`.

Everything but the engine is the production worker (`worker.service.WorkerService`): XREADGROUP
intake, tokenizing, detokenizing, one PUBLISH per reply channel per step, records and XACK,
heartbeats. The engine core is `run_null_core`, which gives every running completion one token
per step at a fixed interval, so what this process can deliver is the ceiling the worker front
and Redis put on a worker, whatever the GPU.

Settings come from SLUICE_* variables, as for `sluice worker` (SLUICE_REDIS_URL, SLUICE_MODEL for
the tokenizer, SLUICE_SERVED_MODEL_NAME, SLUICE_MAX_NUM_SEQS, ...):

    SLUICE_REDIS_URL=redis://127.0.0.1:6379/0 SLUICE_MAX_NUM_SEQS=1024 \\
        python -m loadtest.null_worker --null-step-s 0.005

--profile FILE runs the front's event loop under cProfile, timed by that thread's CPU clock, and
writes the stats there when the worker stops (SIGTERM or Ctrl-C, which drain as usual).
`loadtest/gateway_overhead.py --mode bus` starts this.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from shared.settings import WorkerSettings, load_settings
from worker.null_core import DEFAULT_TOKEN_ID, run_null_core
from worker.service import WorkerService, run_front


class NullWorkerService(WorkerService):
    """`WorkerService` with `run_null_core` in place of the engine core process."""

    def __init__(self, settings: WorkerSettings, null_step_s: float = 0.0,
                 null_token_id: int = DEFAULT_TOKEN_ID) -> None:
        super().__init__(settings)
        self.null_step_s = null_step_s
        self.null_token_id = null_token_id

    def _core_spec(self) -> tuple[Callable[[dict[str, Any], Any, Any], None], dict[str, Any], str]:
        _, args, _ = super()._core_spec()  # the real worker's engine args, which the null reads
        args.update(null_step_s=self.null_step_s, null_token_id=self.null_token_id)
        return run_null_core, args, "sluice-null-core"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.null_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--null-step-s", type=float, default=0.0,
                   help="seconds per engine step (default 0: as fast as the core loop turns)")
    p.add_argument("--null-token-id", type=int, default=DEFAULT_TOKEN_ID,
                   help=f"the token every step produces (default {DEFAULT_TOKEN_ID})")
    p.add_argument("--profile", metavar="FILE",
                   help="profile the front's event loop (thread CPU time) with cProfile and "
                        "write the stats to FILE")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.null_step_s < 0:
        raise SystemExit("--null-step-s must be >= 0")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = NullWorkerService(load_settings(WorkerSettings), args.null_step_s,
                                args.null_token_id)
    if not args.profile:
        run_front(service)  # the event loop the real worker runs on
        return 0
    # Thread CPU time: waiting in epoll, or preempted by other processes, counts as nothing.
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        asyncio.run(service.run())
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
