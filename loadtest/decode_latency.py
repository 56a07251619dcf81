"""Decode inter-token latency: one request (or a few of equal length) through the engine, every
step timed.

Builds an `Engine` for --model, sends --batch-size requests of --input-len random token ids that
each generate exactly --output-len tokens (greedy, EOS ignored), after --warmup untimed rounds of
the same shape. Every `engine.step()` is timed on its own (with CUDA synchronized around it):
TTFT is the time until every request has its first token (one step when the prompts fit one
step's token budget, which the default budget ensures); the inter-token latencies (ITL) are the
steps after that, each giving every request one token.

The floor is the time to stream the weights once at --peak-bandwidth-tbs: a batch-1 decode step
cannot beat it, whatever the kernels. The input embedding is left out when it is not the output
projection too, since a step reads only one row of it per request. `floor_with_kv_ms` adds
reading the batch's KV cache at the mean context of the decode steps.

    python -m loadtest.decode_latency --model tiny --input-len 32 --output-len 32
    python -m loadtest.decode_latency --model llama-3.1-8b --load-format dummy --dtype bfloat16
    python -m loadtest.decode_latency --model llama-3.1-8b --load-format dummy --dtype bfloat16 \\
        --batch-size 1,8,64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from loadtest.offline import _device_name, _sync, _versions, _write_json, add_model_args


@dataclass
class LatencyResult:
    batch_size: int
    ttft_ms: float
    ttft_steps: int
    itl_mean_ms: float
    itl_median_ms: float
    itl_p90_ms: float
    itl_p99_ms: float
    itl_min_ms: float
    itl_max_ms: float
    num_itl_samples: int
    output_tokens_per_s: float  # batch_size tokens per mean ITL
    floor_ms: float
    floor_with_kv_ms: float
    median_over_floor: float
    step_ms: list[float]


def parse_batch_sizes(text: str) -> list[int]:
    """'1' or '1,8,64' -> [1] or [1, 8, 64]."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1 or 1,8,64, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def build_engine(args: argparse.Namespace) -> Any:
    from worker.engine.config import EngineConfig
    from worker.engine.engine import Engine
    from worker.models.registry import resolve_model

    largest = max(args.batch_size)
    options: dict[str, Any] = {
        "max_num_seqs": largest,
        # Room for every prompt in one step, so TTFT is one prefill step.
        "max_num_batched_tokens": args.max_num_batched_tokens or max(2048,
                                                                     largest * args.input_len),
        "gpu_memory_utilization": args.gpu_memory_utilization,
    }
    if args.attention_backend is not None:  # otherwise the engine's own default
        options["attention_backend"] = args.attention_backend
    return Engine(resolve_model(args.model), EngineConfig(**options), device=args.device,
                  dtype=args.dtype, load_format=args.load_format, seed=args.seed)


def make_prompts(count: int, input_len: int, vocab_size: int,
                 gen: torch.Generator) -> list[list[int]]:
    # Fresh random prompts every round: a repeated prompt would hit the prefix cache.
    return [torch.randint(16, vocab_size, (input_len,), generator=gen).tolist()
            for _ in range(count)]


def run_round(engine: Any, prompts: list[list[int]], output_len: int, tag: str
              ) -> list[tuple[float, int]]:
    """Runs the requests to the end; (seconds, tokens produced) for every step."""
    from worker.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        _sync(engine.device)
        t0 = time.perf_counter()
        outputs = engine.step()
        _sync(engine.device)
        steps.append((time.perf_counter() - t0, sum(len(o.new_token_ids) for o in outputs)))
    produced = sum(n for _, n in steps)
    if produced != len(prompts) * output_len:
        raise RuntimeError(f"{tag}: produced {produced} tokens, expected "
                           f"{len(prompts) * output_len}")
    return steps


def split_ttft(steps: list[tuple[float, int]], batch_size: int) -> tuple[float, int, list[float]]:
    """TTFT (seconds, steps): until every request has its first token; then the ITL samples."""
    produced, elapsed = 0, 0.0
    for i, (dt, n) in enumerate(steps):
        produced += n
        elapsed += dt
        if produced >= batch_size:
            return elapsed, i + 1, [s for s, _ in steps[i + 1:]]
    raise RuntimeError("no step produced a first token for every request")


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameter bytes, bytes a decode step streams): an untied input embedding is left
    out, as a step reads one row of it per request."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if embed is None or head is None or head.weight is embed.weight:
        return total, total
    return total, total - embed.weight.numel() * embed.weight.element_size()


def summarize(batch_size: int, steps: list[tuple[float, int]], floor_s: float,
              kv_floor_s: float) -> LatencyResult:
    ttft, ttft_steps, itl = split_ttft(steps, batch_size)
    if not itl:  # output_len 1: nothing after the first token
        itl = [float("nan")]
    ms = np.asarray(itl) * 1e3
    median = float(np.median(ms))
    return LatencyResult(
        batch_size=batch_size, ttft_ms=ttft * 1e3, ttft_steps=ttft_steps,
        itl_mean_ms=float(ms.mean()), itl_median_ms=median,
        itl_p90_ms=float(np.percentile(ms, 90)), itl_p99_ms=float(np.percentile(ms, 99)),
        itl_min_ms=float(ms.min()), itl_max_ms=float(ms.max()), num_itl_samples=len(itl),
        output_tokens_per_s=batch_size / (statistics.fmean(itl)),
        floor_ms=floor_s * 1e3, floor_with_kv_ms=(floor_s + kv_floor_s) * 1e3,
        median_over_floor=median / (floor_s * 1e3),
        step_ms=[s * 1e3 for s, _ in steps])


def measure(engine: Any, args: argparse.Namespace, streamed_bytes: int) -> list[LatencyResult]:
    gen = torch.Generator().manual_seed(args.seed)
    bandwidth = args.peak_bandwidth_tbs * 1e12
    elem = torch.empty((), dtype=engine.dtype).element_size()
    kv_per_token = engine.model_config.kv_bytes_per_token(elem)
    # Mean context a decode step reads: the prompt plus half the output, per request.
    avg_context = args.input_len + args.output_len / 2
    results = []
    for batch in args.batch_size:
        for w in range(args.warmup):
            prompts = make_prompts(batch, args.input_len, engine.vocab_size, gen)
            run_round(engine, prompts, args.output_len, f"warmup{batch}-{w}")
        prompts = make_prompts(batch, args.input_len, engine.vocab_size, gen)
        steps = run_round(engine, prompts, args.output_len, f"timed{batch}")
        kv_floor = batch * avg_context * kv_per_token / bandwidth
        results.append(summarize(batch, steps, streamed_bytes / bandwidth, kv_floor))
        r = results[-1]
        print(f"batch {batch}: TTFT {r.ttft_ms:.2f} ms, ITL median {r.itl_median_ms:.3f} ms",
              flush=True)
    return results


def _print_table(results: list[LatencyResult]) -> None:
    print(f"\n{'batch':>5}{'TTFT ms':>10}{'ITL mean':>10}{'median':>9}{'p90':>9}{'p99':>9}"
          f"{'tok/s':>10}{'floor ms':>10}{'+kv ms':>9}{'median/floor':>14}")
    for r in results:
        print(f"{r.batch_size:>5}{r.ttft_ms:>10.2f}{r.itl_mean_ms:>10.3f}{r.itl_median_ms:>9.3f}"
              f"{r.itl_p90_ms:>9.3f}{r.itl_p99_ms:>9.3f}{r.output_tokens_per_s:>10.1f}"
              f"{r.floor_ms:>10.3f}{r.floor_with_kv_ms:>9.3f}{r.median_over_floor:>13.2f}x")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.decode_latency", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens per request")
    p.add_argument("--batch-size", type=parse_batch_sizes, default=[1], metavar="B[,B...]",
                   help="requests run together, all of the same lengths; a list measures each")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed rounds of the same shape before each timed one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"],
                   help="the engine's attention backend (default: the engine's own choice)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engine token budget per step (default: every prompt fits one step)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="fraction of GPU memory for the engine (weights and KV cache)")
    p.add_argument("--peak-bandwidth-tbs", type=float, default=4.26,
                   help="memory bandwidth in TB/s for the weight-streaming floor (H200: ~4.26)")
    p.add_argument("--output-json", default="results/decode_latency.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.input_len < 1 or args.output_len < 2:
        raise SystemExit("need --input-len >= 1 and --output-len >= 2 (ITL needs two tokens)")
    engine = build_engine(args)
    model = engine.runner.model
    total_bytes, streamed_bytes = weight_bytes(model)
    results = measure(engine, args, streamed_bytes)
    _print_table(results)
    report = {
        "config": vars(args), "versions": _versions(), "device": _device_name(),
        "model": {"architecture": engine.model_config.architecture,
                  "num_params": engine.model_config.num_params, "dtype": str(engine.dtype),
                  "weight_bytes": total_bytes, "streamed_weight_bytes": streamed_bytes,
                  "attention_backend": getattr(engine, "attention_backend", "torch")},
        "results": [asdict(r) for r in results],
    }
    _write_json(args.output_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
