"""Cold start as a client sees it: one request to a fleet at zero, timed to its first token.

    python -m infra.scaler.coldstart --runs 3

Runs a private Redis, a gateway and the scaler with local workers (min 0, tiny model, CPU). Each
run waits until the fleet is at zero, sends one streaming completion with the `openai` client and
times its first token, then sends the same request to the now warm worker (the baseline). The
scaler's own record gives queued -> worker ready (seen at its 0.2 s poll, so up to 0.2 s late).
The idle timeout is short (--idle-timeout) so the fleet returns to zero between runs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import openai

from infra.scaler.policy import PolicyConfig
from infra.scaler.trace import API_KEY, local_stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.scaler.coldstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="cold starts to time")
    parser.add_argument("--idle-timeout", type=float, default=1.0, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = PolicyConfig(min_workers=0, max_workers=1, stabilization_s=0,
                          idle_timeout_s=args.idle_timeout)
    ttft: list[float] = []
    ready: list[float] = []
    warm: list[float] = []
    with local_stack(config, interval_s=0.2) as stack:
        stack.start()
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=API_KEY, max_retries=0,
                               timeout=600)
        for run in range(args.runs):
            if not stack.wait_for_zero(120):
                print("the fleet did not return to zero", file=sys.stderr)
                return 1
            time.sleep(args.idle_timeout)
            known = len(stack.loop.cold_starts)
            t0 = time.time()
            ttft.append(_first_token_s(client))
            warm.append(_first_token_s(client))  # the same again, now that a worker is ready
            deadline = time.monotonic() + 5  # the scaler notices at its next poll
            while len(stack.loop.cold_starts) == known and time.monotonic() < deadline:
                time.sleep(0.05)
            cold = stack.loop.cold_starts[-1] if len(stack.loop.cold_starts) > known else None
            ready_s = cold.ready_at - t0 if cold and cold.ready_at else float("nan")
            ready.append(ready_s)
            print(f"run {run + 1}: worker ready {ready_s:.2f} s after the request, "
                  f"first token {ttft[-1]:.2f} s; warm first token {warm[-1]:.3f} s", flush=True)
    print(f"median of {args.runs}: worker ready {statistics.median(ready):.2f} s, "
          f"first token {statistics.median(ttft):.2f} s; warm first token "
          f"{statistics.median(warm):.3f} s")
    return 0


def _first_token_s(client: openai.OpenAI) -> float:
    t0 = time.time()
    for _ in client.completions.create(model="tiny", prompt="Cold start", max_tokens=8,
                                       stream=True):
        return time.time() - t0
    raise RuntimeError("the request returned no token")


if __name__ == "__main__":
    sys.exit(main())
