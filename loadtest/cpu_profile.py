"""Run a module as `__main__` under cProfile, timed by the main thread's CPU clock.

    python -m loadtest.cpu_profile OUT.prof infra.cli gateway --port 8000

The clock is `time.thread_time`: CPU seconds of the profiled (main) thread, so time spent
waiting in epoll or preempted by other processes counts as nothing, and the total is what the
thread really used. The stats are written to OUT.prof when the module returns or raises, SIGTERM
included (it becomes SystemExit, also after a server such as uvicorn re-raises it). Read them
with `python -m pstats OUT.prof` or `pstats.Stats(path).sort_stats("tottime")`.

`loadtest/gateway_overhead.py --profile` runs the gateway this way.
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time
from typing import Any


def profile_module(out: str, module: str, argv: list[str]) -> int:
    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    sys.argv = [module, *argv]
    profiler = cProfile.Profile(time.thread_time)
    code = 0
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        code = 130
    finally:
        profiler.disable()
        profiler.dump_stats(out)
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    return profile_module(args[0], args[1], args[2:])


if __name__ == "__main__":
    sys.exit(main())
