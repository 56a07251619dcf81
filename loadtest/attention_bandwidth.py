"""Decode attention bandwidth: how fast an attention backend reads the paged KV cache.

For each --shapes entry BxC (B sequences with C tokens of context each, one query token per
sequence: a decode step), builds a KV cache of exactly the blocks needed, filled with random
values and handed out in shuffled order (so nothing is contiguous by accident, and no block is
shared), with block tables, seq_lens and query_start_loc as the engine builds them. Then times
one attention call, i.e. one layer of one decode step, --iters times after warm-up: CUDA events
on a GPU, the wall clock on the CPU.

Bytes moved = B * C * num_kv_heads * head_dim * 2 (K and V) * dtype bytes, plus q and out. The
report gives GB/s at the median time and its fraction of --peak-bandwidth-tbs. Shapes whose KV
fits in the GPU's L2 cache (tens of MB) read from it and can beat the memory's bandwidth.

Backends (--backend, comma-separated):
  torch   worker.engine.attention.TorchAttentionBackend.forward: writes the step's K/V into the
          cache, then gathers each sequence's blocks and runs sdpa. The decode plan is built on
          the first call and reused, as the engine reuses it across a step's layers.
  triton  kernels.paged_attention.paged_attention: attention only, no KV write. Its output is
          checked once per shape against the torch backend (max_abs_err).

    python -m loadtest.attention_bandwidth --backend torch,triton
    python -m loadtest.attention_bandwidth --backend triton --shapes 256x2048 --model qwen3-0.6b
    python -m loadtest.attention_bandwidth --backend torch --shapes 2x64 --iters 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from loadtest.offline import _device_name, _sync, _versions, _write_json

BACKENDS = ("torch", "triton")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Geometry:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass
class DecodeBatch:
    """One decode step's attention inputs for B sequences of C tokens of context."""

    q: torch.Tensor  # [B, num_q_heads, head_dim]
    k: torch.Tensor  # [B, num_kv_heads, head_dim]: this step's keys (torch backend writes them)
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor  # [B, blocks_per_seq] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    slot_mapping: torch.Tensor  # [B] int64: the slot of each sequence's last position
    context: int


@dataclass
class ShapeResult:
    backend: str
    batch: int
    context: int
    median_us: float
    mean_us: float
    min_us: float
    bytes_moved: int
    gb_per_s: float  # at the median time
    fraction_of_peak: float
    max_abs_err: float | None  # triton against the torch backend; None when not checked
    iters: int


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'64x1024,16x4096' -> [(64, 1024), (16, 4096)]: batch x context tokens."""
    shapes = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            batch, context = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected BxC like 64x1024, got {item!r}") from None
        if batch < 1 or context < 1:
            raise argparse.ArgumentTypeError(f"batch and context must be >= 1, got {item!r}")
        shapes.append((batch, context))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def parse_backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in BACKENDS for n in names):
        raise argparse.ArgumentTypeError(f"backends are {', '.join(BACKENDS)}, got {text!r}")
    return list(dict.fromkeys(names))


def make_batch(batch: int, context: int, geom: Geometry, device: torch.device) -> DecodeBatch:
    blocks_per_seq = -(-context // geom.block_size)
    num_blocks = batch * blocks_per_seq
    # Exactly the blocks needed, each sequence's in shuffled physical order.
    order = torch.randperm(num_blocks).view(batch, blocks_per_seq)
    block_table = order.to(device=device, dtype=torch.int32)
    # Random values everywhere: a cache of zeros (or of uninitialized memory) is no real test.
    kv_cache = torch.randn(2, num_blocks, geom.block_size, geom.num_kv_heads, geom.head_dim,
                           device=device, dtype=geom.dtype)
    last = context - 1
    slots = order[:, last // geom.block_size] * geom.block_size + last % geom.block_size
    return DecodeBatch(
        q=torch.randn(batch, geom.num_q_heads, geom.head_dim, device=device, dtype=geom.dtype),
        k=torch.randn(batch, geom.num_kv_heads, geom.head_dim, device=device, dtype=geom.dtype),
        v=torch.randn(batch, geom.num_kv_heads, geom.head_dim, device=device, dtype=geom.dtype),
        kv_cache=kv_cache, block_table=block_table,
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        slot_mapping=slots.to(device=device, dtype=torch.int64), context=context)


def torch_attention(b: DecodeBatch, geom: Geometry) -> Callable[[], torch.Tensor]:
    from worker.engine.attention import AttentionMetadata, TorchAttentionBackend

    backend = TorchAttentionBackend(geom.num_q_heads, geom.num_kv_heads, geom.head_dim)
    batch = b.q.shape[0]
    meta = AttentionMetadata(
        slot_mapping=b.slot_mapping, query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
        block_table=b.block_table, query_lens_cpu=[1] * batch, seq_lens_cpu=[b.context] * batch,
        max_query_len=1, max_seq_len=b.context)
    return lambda: backend.forward(b.q, b.k, b.v, b.kv_cache, meta)


def triton_attention(b: DecodeBatch, geom: Geometry,
                     num_kv_splits: int | None) -> Callable[[], torch.Tensor]:
    from kernels.paged_attention import paged_attention
    from worker.engine.runner import kv_cache_tensor

    out = torch.empty_like(b.q)
    scale = geom.head_dim**-0.5
    # The layout the engine gives the Triton kernels: head-major blocks.
    _, num_blocks, block_size, num_kv_heads, head_dim = b.kv_cache.shape
    kv_cache = kv_cache_tensor(num_blocks, block_size, num_kv_heads, head_dim, b.kv_cache.dtype,
                               b.kv_cache.device, head_major=True)
    kv_cache.copy_(b.kv_cache)

    def call() -> torch.Tensor:
        paged_attention(b.q, kv_cache, out, b.block_table, b.seq_lens, b.query_start_loc,
                        max_query_len=1, scale=scale, num_kv_splits=num_kv_splits)
        return out

    return call


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device
               ) -> list[float]:
    """Seconds per call: CUDA events around each call on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):  # compiles kernels, settles the allocator
        fn()
    _sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def bytes_moved(batch: int, context: int, geom: Geometry) -> int:
    kv = batch * context * geom.num_kv_heads * geom.head_dim * 2 * geom.elem_bytes
    q_and_out = 2 * batch * geom.num_q_heads * geom.head_dim * geom.elem_bytes
    return kv + q_and_out


def run_shape(backend: str, batch: int, context: int, geom: Geometry, args: argparse.Namespace,
              device: torch.device) -> ShapeResult:
    torch.manual_seed(args.seed)
    b = make_batch(batch, context, geom, device)
    err = None
    if backend == "torch":
        fn = torch_attention(b, geom)
    else:
        # The torch backend writes this step's K/V first; the kernel then reads the same.
        ref = None if args.no_check else torch_attention(b, geom)().float()
        fn = triton_attention(b, geom, args.num_kv_splits)
        if ref is not None:
            err = float((fn().float() - ref).abs().max())
    times = time_calls(fn, args.iters, args.warmup_iters, device)
    median = statistics.median(times)
    moved = bytes_moved(batch, context, geom)
    gbs = moved / median / 1e9
    del b
    return ShapeResult(backend=backend, batch=batch, context=context, median_us=median * 1e6,
                       mean_us=statistics.fmean(times) * 1e6, min_us=min(times) * 1e6,
                       bytes_moved=moved, gb_per_s=gbs,
                       fraction_of_peak=gbs / (args.peak_bandwidth_tbs * 1e3),
                       max_abs_err=err, iters=len(times))


def geometry(args: argparse.Namespace) -> Geometry:
    """Llama-3.1-8B's attention by default; --model takes it from a model's config instead."""
    heads = (args.num_q_heads, args.num_kv_heads, args.head_dim)
    if args.model is not None:
        from worker.models.config import ModelConfig
        from worker.models.registry import resolve_model

        cfg = ModelConfig.from_dir(resolve_model(args.model))
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    return Geometry(*heads, block_size=args.block_size, dtype=DTYPES[args.dtype])


def _check_device(backends: list[str], device: torch.device) -> None:
    if "triton" in backends and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the triton backend needs a GPU, or TRITON_INTERPRET=1 in the "
                         "environment to interpret it on the CPU (slow: tiny shapes only)")


def _print_table(results: list[ShapeResult]) -> None:
    print(f"\n{'backend':<8}{'batch':>6}{'context':>9}{'median us':>11}{'min us':>10}"
          f"{'MB moved':>10}{'GB/s':>9}{'of peak':>9}{'max err':>10}")
    for r in results:
        err = "" if r.max_abs_err is None else f"{r.max_abs_err:.1e}"
        print(f"{r.backend:<8}{r.batch:>6}{r.context:>9}{r.median_us:>11.1f}{r.min_us:>10.1f}"
              f"{r.bytes_moved / 1e6:>10.1f}{r.gb_per_s:>9.1f}{r.fraction_of_peak:>9.1%}"
              f"{err:>10}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.attention_bandwidth", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", type=parse_backends, default=["torch"], metavar="LIST",
                   help="comma-separated: torch, triton (default: torch)")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("64x1024,16x4096,1x65536"),
                   metavar="BxC,...", help="batch x context tokens per sequence "
                                           "(default: 64x1024,16x4096,1x65536)")
    p.add_argument("--model", default=None,
                   help="take the head counts and head_dim from this model's config instead")
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=50, help="timed calls per shape")
    p.add_argument("--warmup-iters", type=int, default=10, help="untimed calls first")
    p.add_argument("--num-kv-splits", type=int, default=None,
                   help="triton: split-KV segments (a power of two; default: the kernel's choice)")
    p.add_argument("--no-check", action="store_true",
                   help="triton: skip the check of its output against the torch backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-bandwidth-tbs", type=float, default=4.26,
                   help="memory bandwidth in TB/s that GB/s is compared with (H200: ~4.26)")
    p.add_argument("--output-json", default="results/attention_bandwidth.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from worker.engine.engine import resolve_device

    device = resolve_device(args.device)
    _check_device(args.backend, device)
    geom = geometry(args)
    results = []
    for backend in args.backend:
        for batch, context in args.shapes:
            results.append(run_shape(backend, batch, context, geom, args, device))
            r = results[-1]
            print(f"{backend} {batch}x{context}: {r.median_us:.1f} us, {r.gb_per_s:.1f} GB/s",
                  flush=True)
    _print_table(results)
    report = {
        "config": {**vars(args), "shapes": [f"{b}x{c}" for b, c in args.shapes]},
        "geometry": {**asdict(geom), "dtype": str(geom.dtype)},
        "versions": _versions(), "device": _device_name(),
        "results": [asdict(r) for r in results],
    }
    _write_json(args.output_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
