"""Offline throughput: the engine against Hugging Face `generate` on the same prompts, same run.

Prompts are random token ids with fixed (or ranged) input and output lengths; every request
generates exactly its output length (EOS ignored), so both sides do the same work. Prints a
table and writes JSON.

    python -m loadtest.offline --model tiny --num-prompts 64 --input-len 128 --output-len 128
    python -m loadtest.offline --model llama-3.1-8b --load-format dummy --dtype bfloat16 \\
        --num-prompts 1000 --input-len 1024 --output-len 128 --baseline none
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Result:
    name: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "requests_per_s": self.requests_per_s,
                "output_tokens_per_s": self.output_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s}


def make_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                  vocab_size: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Random prompts; lengths uniform in [len * (1 - r), len * (1 + r)] when r > 0."""
    gen = torch.Generator().manual_seed(seed)

    def lengths(mean: int) -> list[int]:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return torch.randint(lo, hi + 1, (num_prompts,), generator=gen).tolist()

    in_lens, out_lens = lengths(input_len), lengths(output_len)
    # Skip the lowest ids, which are special tokens in most vocabularies.
    prompts = [torch.randint(16, vocab_size, (n,), generator=gen).tolist() for n in in_lens]
    return prompts, out_lens


def run_sluice(args: argparse.Namespace, prompts: list[list[int]], out_lens: list[int]) -> Result:
    from worker import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=not args.no_prefix_caching)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    # Warm-up on a few prompts: first-call allocations and kernel selection are not throughput.
    llm.generate(prompts[:4], params[:4], use_tqdm=False)
    llm.engine.kv.reset_prefix_cache()
    _sync(llm.engine.device)
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=True)
    _sync(llm.engine.device)
    elapsed = time.perf_counter() - t0
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    if produced != sum(out_lens):
        raise RuntimeError(f"engine produced {produced} tokens, expected {sum(out_lens)}")
    del llm
    gc.collect()
    return Result("sluice", elapsed, len(prompts), sum(map(len, prompts)), produced)


def run_hf_generate(args: argparse.Namespace, prompts: list[list[int]], out_lens: list[int],
                    model_dir: Path) -> Result:
    """Static batches through `generate` (sdpa), left-padded, as a user of the library runs it."""
    import transformers

    from worker.engine.engine import resolve_device
    from worker.models.config import ModelConfig
    from worker.models.loader import resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, ModelConfig.from_dir(model_dir), device)
    if args.load_format == "dummy":
        config = transformers.AutoConfig.from_pretrained(model_dir)
        with device:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    batch = args.hf_batch_size or len(prompts)
    # Grouping equal output lengths keeps `generate` honest: a static batch runs to its longest.
    order = sorted(range(len(prompts)), key=lambda i: (out_lens[i], len(prompts[i])))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    _hf_batch(model, [prompts[i] for i in batches[0][:4]], 4, device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    produced = 0
    for idx in batches:
        max_new = max(out_lens[i] for i in idx)
        produced += _hf_batch(model, [prompts[i] for i in idx], max_new, device)
    _sync(device)
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    return Result("hf_generate", elapsed, len(prompts), sum(map(len, prompts)),
                  min(produced, sum(out_lens)))


def _hf_batch(model: Any, prompts: list[list[int]], max_new: int, device: torch.device) -> int:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                             min_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return (out.shape[1] - width) * len(prompts)


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.offline", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny', a shipped config name (llama-3.1-8b, qwen3-0.6b, ...) or a folder")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--baseline", choices=["hf", "none"], default="hf",
                   help="also run Hugging Face generate on the same prompts (default)")
    p.add_argument("--hf-batch-size", type=int, default=0, help="0: one static batch of all")
    p.add_argument("--output-json", default="results/offline.json")
    args = p.parse_args(argv)

    from worker.models.config import ModelConfig
    from worker.models.registry import resolve_model

    model_dir = resolve_model(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    prompts, out_lens = make_workload(args.num_prompts, args.input_len, args.output_len,
                                      args.random_range_ratio, cfg.vocab_size, args.seed)
    results = [run_sluice(args, prompts, out_lens)]
    if args.baseline == "hf":
        results.append(run_hf_generate(args, prompts, out_lens, model_dir))
    print(f"\n{'engine':<14}{'time s':>9}{'req/s':>10}{'out tok/s':>12}{'total tok/s':>13}")
    for r in results:
        print(f"{r.name:<14}{r.elapsed_s:>9.2f}{r.requests_per_s:>10.2f}"
              f"{r.output_tokens_per_s:>12.1f}{r.total_tokens_per_s:>13.1f}")
    report: dict[str, Any] = {
        "config": vars(args), "model_architecture": cfg.architecture,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "device": _device_name(),
        "results": [r.as_dict() for r in results],
    }
    if len(results) == 2:
        ratio = results[0].output_tokens_per_s / results[1].output_tokens_per_s
        report["speedup_vs_hf_generate"] = ratio
        print(f"\nsluice / hf_generate output throughput: {ratio:.2f}x")
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
