"""Offline throughput: the engine against Hugging Face `generate` on the same prompts, same run.

Prompts are random token ids with fixed (or ranged) input and output lengths; every request
generates exactly its output length (EOS ignored), so both sides do the same work. After one
untimed pass each, the two sides alternate for --repeats timed passes; medians are reported.
Prints a table and writes JSON.

    python -m loadtest.offline --model tiny --num-prompts 64 --input-len 128 --output-len 128
    python -m loadtest.offline --model llama-3.1-8b --load-format dummy --dtype bfloat16 \\
        --num-prompts 1000 --input-len 1024 --output-len 128 --baseline none
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Result:
    name: str
    elapsed_s: float  # median over repeats
    elapsed_runs_s: list[float]
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


class SluiceRunner:
    name = "sluice"

    def __init__(self, args: argparse.Namespace, out_lens: list[int]) -> None:
        from worker import LLM, SamplingParams

        self.llm = LLM(args.model, dtype=args.dtype, device=args.device,
                       load_format=args.load_format, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=not args.no_prefix_caching,
                       gpu_memory_utilization=args.gpu_memory_utilization)
        self.device = self.llm.engine.device
        self.params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                       for n in out_lens]

    def run(self, prompts: list[list[int]], show_progress: bool) -> int:
        # Every run starts cold: cached prompt blocks from the last run would flatter it.
        self.llm.engine.kv.reset_prefix_cache()
        results = self.llm.generate(prompts, self.params, use_tqdm=show_progress)
        return sum(len(r.outputs[0].token_ids) for r in results)


class HFGenerateRunner:
    """Static batches through `generate` (sdpa), left-padded, as a user of the library runs it."""

    name = "hf_generate"

    def __init__(self, args: argparse.Namespace, out_lens: list[int], model_dir: Path) -> None:
        import transformers

        from worker.engine.engine import resolve_device
        from worker.models.config import ModelConfig
        from worker.models.loader import resolve_dtype

        self.device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, ModelConfig.from_dir(model_dir), self.device)
        if args.load_format == "dummy":
            config = transformers.AutoConfig.from_pretrained(model_dir)
            with self.device:
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            model = model.to(self.device)  # type: ignore[arg-type]
        self.model = model.eval()
        self.out_lens = out_lens
        self.batch_size = args.hf_batch_size

    def run(self, prompts: list[list[int]], show_progress: bool) -> int:
        batch = self.batch_size or len(prompts)
        # Grouping equal output lengths keeps `generate` honest: a static batch runs to its
        # longest member.
        order = sorted(range(len(prompts)), key=lambda i: (self.out_lens[i], len(prompts[i])))
        produced = 0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            max_new = max(self.out_lens[i] for i in idx)
            produced += _hf_batch(self.model, [prompts[i] for i in idx], max_new, self.device)
        return min(produced, sum(self.out_lens))


def measure(runners: list[Any], prompts: list[list[int]], out_lens: list[int],
            repeats: int) -> list[Result]:
    """Alternates the runners `repeats` times, so drift in machine speed hits both alike.

    Each side first runs the whole workload once untimed: the first pass at full size grows the
    allocator's pools and picks matmul algorithms for the large shapes, which is start-up cost.
    """
    for runner in runners:
        print(f"warm-up {runner.name}", flush=True)
        runner.run(prompts, show_progress=False)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    produced: dict[str, int] = {}
    for rep in range(repeats):
        for runner in runners:
            _sync(runner.device)
            t0 = time.perf_counter()
            produced[runner.name] = runner.run(prompts, show_progress=rep == 0)
            _sync(runner.device)
            times[runner.name].append(time.perf_counter() - t0)
            print(f"run {rep + 1}/{repeats} {runner.name}: {times[runner.name][-1]:.2f} s",
                  flush=True)
    expected = sum(out_lens)
    if produced.get("sluice", expected) != expected:
        raise RuntimeError(f"engine produced {produced['sluice']} tokens, expected {expected}")
    return [Result(r.name, statistics.median(times[r.name]), times[r.name], len(prompts),
                   sum(map(len, prompts)), produced[r.name]) for r in runners]


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
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each side, alternating; the median is reported")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="fraction of GPU memory the engine may use (the baseline needs the rest)")
    p.add_argument("--output-json", default="results/offline.json")
    args = p.parse_args(argv)

    from worker.models.config import ModelConfig
    from worker.models.registry import resolve_model

    model_dir = resolve_model(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    prompts, out_lens = make_workload(args.num_prompts, args.input_len, args.output_len,
                                      args.random_range_ratio, cfg.vocab_size, args.seed)
    runners: list[Any] = [SluiceRunner(args, out_lens)]
    if args.baseline == "hf":
        runners.append(HFGenerateRunner(args, out_lens, model_dir))
    results = measure(runners, prompts, out_lens, args.repeats)
    print(f"\n{'engine':<14}{'median s':>9}{'min..max s':>14}{'req/s':>9}{'out tok/s':>12}"
          f"{'total tok/s':>13}")
    for r in results:
        spread = f"{min(r.elapsed_runs_s):.2f}..{max(r.elapsed_runs_s):.2f}"
        print(f"{r.name:<14}{r.elapsed_s:>9.2f}{spread:>14}{r.requests_per_s:>9.2f}"
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
        per_run = [h / e for e, h in zip(results[0].elapsed_runs_s, results[1].elapsed_runs_s,
                                          strict=True)]
        report["speedup_per_run"] = per_run
        print(f"\nsluice / hf_generate output throughput: {ratio:.2f}x (median of {args.repeats}; "
              f"per run {min(per_run):.2f}..{max(per_run):.2f}x)")
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
