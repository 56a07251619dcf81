"""Where a first token's time goes in the service, hop by hop.

Runs a private redis-server, a worker (front and engine core) and a gateway with the trace
points of `shared/trace.py` on (SLUICE_TRACE_DIR), streams --requests completions one at a time
as `loadtest.gateway_overhead --mode latency` does (same prompts' shape, same minimal client),
and lines up each request's trace points with the client's send and first-token times. Prints
each hop's p50 and p90 (ms); "outside the engine" is the first token's whole time minus the
core's step (c_add -> c_token), which is what the service adds to the engine's own TTFT.
Compare it with `loadtest.hop_floor`: the same hops with no work at any of them.

    python -m loadtest.first_token
    python -m loadtest.first_token --device cuda --kv-cache-memory-bytes 1073741824
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.gateway_overhead import Stream, run_http, running_service, service_env

# The path in order: the client's send, the trace points (shared/trace.py), its first token.
HOPS = ["send", "g_in", "g_xadd", "f_read", "f_engine", "c_add", "c_token", "f_result",
        "f_publish", "g_reply", "g_sse", "first token"]


def read_points(trace_dir: Path) -> dict[str, dict[str, float]]:
    """request id -> tag -> the first time that tag was written for it (epoch seconds)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for path in trace_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            at, tag, rid = line.split(" ", 2)
            out[rid].setdefault(tag, float(at))
    return out


def hop_table(streams: list[Stream], points: dict[str, dict[str, float]]
              ) -> tuple[dict[str, dict[str, float]], int, dict[str, int]]:
    """Per hop (and in all, and outside the engine) p50/p90 in ms, how many requests had
    every point, and how many lacked each point."""
    spans: dict[str, list[float]] = defaultdict(list)
    complete = 0
    missing: dict[str, int] = defaultdict(int)
    for s in streams:
        at = {**points.get(s.request_id, {}), "send": s.submit_wall,
              "first token": s.wall(s.token_times[0])}
        if not all(h in at for h in HOPS):
            for h in HOPS:
                missing[h] += h not in at
            continue
        complete += 1
        for a, b in itertools.pairwise(HOPS):
            spans[f"{a} -> {b}"].append((at[b] - at[a]) * 1e3)
        whole = at["first token"] - at["send"]
        spans["in all"].append(whole * 1e3)
        spans["outside the engine"].append((whole - (at["c_token"] - at["c_add"])) * 1e3)
    table = {k: {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}
             for k, v in spans.items()}
    return table, complete, {h: n for h, n in missing.items() if n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.first_token", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=60, help="timed requests (60)")
    p.add_argument("--warmup", type=int, default=8, help="untimed requests first (8)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="the engine core's OMP_NUM_THREADS (default 1)")
    p.add_argument("--redis-aof", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--busy-poll-ms", type=float, default=None,
                   help="the gateway's and the worker's busy polling (default: theirs: off on "
                        "the gateway; on the worker 20 with a GPU engine, else off)")
    p.add_argument("--core-busy-poll-ms", type=float, default=None,
                   help="the worker's engine core alone (default: as the worker's "
                        "busy polling)")
    p.add_argument("--output-json", default="results/first_token.json")
    args = p.parse_args(argv)

    from loadtest.offline import _write_json, make_workload
    from worker.models.config import ModelConfig
    from worker.models.registry import resolve_model

    model_dir = resolve_model("tiny")
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    prompts, _ = make_workload(args.warmup + args.requests, args.input_len, args.output_len, 0.0,
                               vocab, seed=0)
    with tempfile.TemporaryDirectory(prefix="sluice-trace-") as trace_dir:
        env = {"SLUICE_TRACE_DIR": trace_dir, **service_env(args)}
        with running_service(args.redis_aof, startup_timeout_s=180, process_env=env) as svc:
            svc.start_gateway(total_jobs=len(prompts))
            svc.spawn("worker", ["-m", "infra.cli", "worker", "--model", str(model_dir),
                                 "--served-model-name", "tiny"],
                      svc.env(device=args.device,
                              kv_cache_memory_bytes=args.kv_cache_memory_bytes),
                      threads=args.torch_threads)
            svc.wait_ready("tiny", "worker")
            streams, _ = asyncio.run(run_http(svc.base_url, "tiny", prompts, args.output_len,
                                              1, parse=True, client="raw"))
        table, complete, missing = hop_table(streams[args.warmup:],
                                             read_points(Path(trace_dir)))
    print(f"first token, one request at a time: {complete} of {args.requests} requests traced "
          f"end to end, ms" + (f" (points missing: {missing})" if missing else ""))
    print(f"{'':32s} {'p50':>8s} {'p90':>8s}")
    for name, q in table.items():
        print(f"{name:32s} {q['p50']:8.3f} {q['p90']:8.3f}")
    report: dict[str, Any] = {"config": vars(args), "hops_ms": table, "traced": complete,
                              "missing_points": missing}
    _write_json(args.output_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
