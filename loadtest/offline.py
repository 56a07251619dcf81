"""Offline throughput: the engine against Hugging Face transformers on the same prompts, same run.

Prompts are random token ids with fixed (or ranged) input and output lengths, or any dataset of
the serving benchmark (--dataset-name: sharegpt-synthetic, prefix_repetition, ...; see
loadtest/datasets.py); every request generates exactly its output length (EOS ignored), so every
side does the same work. After one
untimed pass each, the sides alternate for --repeats timed passes; medians are reported.
Prints a table and writes JSON.

Baselines (--baseline, comma-separated):
  hf        `model.generate`: static batches, sdpa attention, left padding
  hf_batch  `model.generate_batch`: transformers' continuous batching over a paged KV cache
  none      the engine alone

--roofline adds the ideal time of the workload on a GPU with the given peak bandwidth and
matmul throughput (H200 by default) and the fraction of it the engine reaches:
  prefill = 2 * params * prompt_tokens / peak_flops            (attention FLOPs left out)
  decode  = sum(output_len) / B steps at a full batch B = min(num_prompts, max_num_seqs),
            each max(weight_bytes / bw, B * 2 * params / flops) + B * avg_context * kv_bytes / bw

    python -m loadtest.offline --model tiny --num-prompts 64 --input-len 128 --output-len 128
    python -m loadtest.offline --model llama-3.1-8b --load-format dummy --dtype bfloat16 \\
        --num-prompts 256 --input-len 512 --output-len 128 --baseline hf,hf_batch --roofline
    python -m loadtest.offline --model qwen3-0.6b --load-format dummy --dtype bfloat16 \\
        --num-prompts 256 --input-len-range 100:1024 --output-len-range 100:1024
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loadtest.datasets import add_dataset_arguments

BASELINE_RUNNERS = {"hf": "hf_generate", "hf_batch": "hf_generate_batch"}
# With both HF baselines in one process, generate_batch's paged cache stays allocated between
# its runs, so it takes only this share of the free memory and leaves the rest to `generate`.
SHARED_HF_BATCH_KV_FRACTION = 0.45


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
                  vocab_size: int, seed: int, input_range: tuple[int, int] | None = None,
                  output_range: tuple[int, int] | None = None
                  ) -> tuple[list[list[int]], list[int]]:
    """Random prompts; lengths uniform in [len * (1 - r), len * (1 + r)] when r > 0.

    An explicit (lo, hi) range replaces that rule for its side: lengths uniform in [lo, hi].
    """
    gen = torch.Generator().manual_seed(seed)

    def lengths(mean: int, explicit: tuple[int, int] | None) -> list[int]:
        if explicit is not None:
            lo, hi = explicit
        else:
            lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return torch.randint(lo, hi + 1, (num_prompts,), generator=gen).tolist()

    in_lens, out_lens = lengths(input_len, input_range), lengths(output_len, output_range)
    # Skip the lowest ids, which are special tokens in most vocabularies.
    prompts = [torch.randint(16, vocab_size, (n,), generator=gen).tolist() for n in in_lens]
    return prompts, out_lens


def dataset_workload(args: argparse.Namespace, model_dir: Path, vocab_size: int
                     ) -> tuple[list[list[int]], list[int]]:
    """The prompts (token ids) and output lengths: the built-in random workload, or one of the
    serving benchmark's datasets (--dataset-name) tokenized by the model's tokenizer."""
    if args.dataset_name is None:
        return make_workload(args.num_prompts, args.input_len, args.output_len,
                             args.random_range_ratio, vocab_size, args.seed,
                             args.input_len_range, args.output_len_range)
    from loadtest.datasets import VocabOnly, config_from_args, load_tokenizer, sample_requests

    if args.input_len_range or args.output_len_range:
        raise SystemExit("--input-len-range/--output-len-range size the built-in workload only; "
                         "use --random-range-ratio with --dataset-name")
    has_tokenizer = any((model_dir / f).is_file()
                        for f in ("tokenizer.json", "tokenizer_config.json"))
    if args.tokenizer or has_tokenizer:
        tok: Any = load_tokenizer(args.tokenizer or str(model_dir))
    elif args.dataset_name == "token-ids":
        tok = VocabOnly(vocab_size)
    else:
        raise SystemExit(f"{model_dir} has no tokenizer to build {args.dataset_name} prompts "
                         "with; pass --tokenizer, or use --dataset-name token-ids")
    cfg = config_from_args(args, random_input_len=args.input_len,
                           random_output_len=args.output_len)
    samples = sample_requests(cfg, tok)
    prompts = [s.prompt if isinstance(s.prompt, list) else tok.encode(s.prompt)
               for s in samples]
    return prompts, [s.expected_output_len for s in samples]


class SluiceRunner:
    name = "sluice"

    def __init__(self, args: argparse.Namespace) -> None:
        from worker import LLM

        # Passed only when given, so the engine's own default applies otherwise.
        extra = {} if args.attention_backend is None else {
            "attention_backend": args.attention_backend}
        self.llm = LLM(args.model, dtype=args.dtype, device=args.device,
                       load_format=args.load_format, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=not args.no_prefix_caching,
                       gpu_memory_utilization=args.gpu_memory_utilization, **extra)
        self.device = self.llm.engine.device
        backend = getattr(self.llm.engine, "attention_backend", "torch")
        self.note = f"{backend} attention backend"

    def run(self, prompts: list[list[int]], out_lens: list[int], show_progress: bool) -> int:
        # Every run starts cold: cached prompt blocks from the last run would flatter it.
        from worker import SamplingParams

        self.llm.engine.kv.reset_prefix_cache()
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
        results = self.llm.generate(prompts, params, use_tqdm=show_progress)
        return sum(len(r.outputs[0].token_ids) for r in results)


def _load_hf_model(args: argparse.Namespace, model_dir: Path, device: torch.device,
                   attn_implementation: str | None = None) -> Any:
    """The transformers model for the baselines: dummy weights from the config, or the checkpoint."""
    import transformers

    from worker.models.config import ModelConfig
    from worker.models.loader import resolve_dtype

    dtype = resolve_dtype(args.dtype, ModelConfig.from_dir(model_dir), device)
    # Only passed when asked for: None keeps the library's default choice (sdpa).
    attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if args.load_format == "dummy":
        config = transformers.AutoConfig.from_pretrained(model_dir)
        with device:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **attn)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **attn)
        model = model.to(device)  # type: ignore[arg-type]
    return model.eval()


class HFGenerateRunner:
    """Static batches through `generate` (sdpa), left-padded, as a user of the library runs it."""

    name = "hf_generate"

    def __init__(self, args: argparse.Namespace, out_lens: list[int], model_dir: Path) -> None:
        from worker.engine.engine import resolve_device

        self.device = resolve_device(args.device)
        self.model = _load_hf_model(args, model_dir, self.device)
        self.out_lens = out_lens
        self.batch_size = args.hf_batch_size
        self.note = ("one static batch of all prompts" if not self.batch_size else
                     f"static batches of {self.batch_size}, grouped by output length")

    def run(self, prompts: list[list[int]], out_lens: list[int], show_progress: bool) -> int:
        batch = self.batch_size or len(prompts)
        # Grouping equal output lengths keeps `generate` honest: a static batch runs to its
        # longest member.
        order = sorted(range(len(prompts)), key=lambda i: (out_lens[i], len(prompts[i])))
        produced = 0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            max_new = max(out_lens[i] for i in idx)
            produced += _hf_batch(self.model, [prompts[i] for i in idx], max_new, self.device)
        return min(produced, sum(out_lens))


class HFGenerateBatchRunner:
    """Transformers' continuous batching: `generate_batch` over a paged KV cache.

    Requests join and leave the running batch every step, as in the engine. Output lengths are
    forced by disabling EOS (`eos_token_id=-1`): each request then stops at exactly its
    `max_new_tokens`, and its token count is `len(output.generated_tokens)`.

    `generate_batch` takes one `max_new_tokens` for all prompts. When the workload's output
    lengths differ, this runner drives the manager `generate_batch` wraps
    (`continuous_batching_context_manager` + `add_request(max_new_tokens=n)`) with each request's
    own length: grouping by length instead would serialize the batch into one call per length.

    The manager is persistent (`persistent_manager=True`): its cache and CUDA graphs are built in
    the untimed warm-up pass, as the engine's are at construction, so timed passes measure
    generation only. When the `hf` baseline also runs, the two share one copy of the weights and
    the model is switched to the paged attention implementation for the length of each run.
    """

    name = "hf_generate_batch"

    def __init__(self, args: argparse.Namespace, out_lens: list[int], model_dir: Path,
                 model: Any = None) -> None:
        import transformers

        from worker.engine.engine import resolve_device

        self.device = resolve_device(args.device)
        self.attn_implementation = args.hf_batch_attn_implementation
        if model is None:
            model = _load_hf_model(args, model_dir, self.device, self.attn_implementation)
        self.model = model
        self.out_lens = out_lens
        self.uniform = len(set(out_lens)) == 1
        self.generation_config = transformers.GenerationConfig(
            max_new_tokens=max(out_lens), do_sample=False, eos_token_id=-1)
        self.cb_config, sizing = _cb_config(args.hf_batch_kv_fraction)
        self.short_requests = 0
        self._runs = 0
        self._paged_name: str | None = None  # what the library stores for the paged choice
        how = (f"generate_batch(max_new_tokens={out_lens[0]})" if self.uniform else
               "per-request max_new_tokens through continuous_batching_context_manager + "
               "add_request (generate_batch takes one max_new_tokens for all prompts)")
        self.note = (f"{how}; attn_implementation={self.attn_implementation!r}; "
                     f"persistent manager built in the warm-up pass; KV cache: {sizing}")

    def run(self, prompts: list[list[int]], out_lens: list[int], show_progress: bool) -> int:
        if self._runs == 0 and self.device.type == "cuda":
            # The manager sizes its cache from the memory torch has not reserved: release what
            # other runners' warm-up passes left cached, or the cache comes out too small.
            torch.cuda.empty_cache()
        self._runs += 1
        with self._paged_attention(), torch.no_grad():
            if self.uniform:
                outputs = list(self.model.generate_batch(
                    inputs=prompts, generation_config=self.generation_config,
                    continuous_batching_config=self.cb_config, progress_bar=show_progress,
                    persistent_manager=True).values())
            else:
                outputs = self._per_request(prompts, out_lens, show_progress)
        return self._count(outputs, out_lens)

    @contextlib.contextmanager
    def _paged_attention(self) -> Iterator[None]:
        """Switches a shared model to the paged implementation for one run, then back."""
        before = self.model.config._attn_implementation
        if before not in (self.attn_implementation, self._paged_name):
            self.model.set_attn_implementation(self.attn_implementation)
            # Newer versions store "paged|sdpa" as "sdpa": remember it, so no switch is repeated.
            self._paged_name = self.model.config._attn_implementation
        try:
            yield
        finally:
            if self.model.config._attn_implementation != before:
                self.model.set_attn_implementation(before)

    def _per_request(self, prompts: list[list[int]], out_lens: list[int],
                     show_progress: bool) -> list[Any]:
        from tqdm import tqdm

        ids = [f"run{self._runs}-{i}" for i in range(len(prompts))]
        results: dict[str, Any] = {}
        with self.model.continuous_batching_context_manager(
                generation_config=self.generation_config, block=True, timeout=5,
                continuous_batching_config=self.cb_config, persistent_manager=True,
                **self._workload_hints(prompts, out_lens)) as manager, \
                tqdm(total=len(prompts), disable=not show_progress, unit="req") as bar:
            for rid, prompt, n in zip(ids, prompts, out_lens, strict=True):
                manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=n)
            while len(results) < len(prompts):
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    results[out.request_id] = out
                    bar.update(1)
                elif out is None and not manager.is_running():
                    raise RuntimeError(f"generate_batch's manager stopped after "
                                       f"{len(results)} of {len(prompts)} requests")
        return [results[rid] for rid in ids]

    def _workload_hints(self, prompts: list[list[int]], out_lens: list[int]) -> dict[str, Any]:
        """The sizing hints `generate_batch` itself passes, where this version takes them."""
        params = inspect.signature(self.model.continuous_batching_context_manager).parameters
        if "workload_hints" not in params:
            return {}
        try:
            from transformers.generation.continuous_batching.utils import WorkloadHints

            hints = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                                  max_generated_length=max(out_lens),
                                  num_requests=len(prompts))
        except (ImportError, TypeError):
            return {}
        return {"workload_hints": hints}

    def _count(self, outputs: list[Any], out_lens: list[int]) -> int:
        if len(outputs) != len(out_lens):
            raise RuntimeError(f"generate_batch returned {len(outputs)} of "
                               f"{len(out_lens)} requests")
        failed = [o for o in outputs if o.error is not None]
        if failed:
            raise RuntimeError(f"generate_batch failed {len(failed)} requests, e.g. "
                               f"{failed[0].request_id}: {failed[0].error}")
        # The output order matches the input order for per-request lengths; with one length
        # for all, order does not matter.
        counts = [min(len(o.generated_tokens), n)
                  for o, n in zip(outputs, out_lens, strict=True)]
        self.short_requests = sum(c < n for c, n in zip(counts, out_lens, strict=True))
        return sum(counts)


def _cb_config(kv_fraction: float | None) -> tuple[Any, str]:
    """A continuous-batching config capping the KV cache's share of free memory, if asked."""
    if kv_fraction is None:
        return None, "transformers' default share of free memory"
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        config = ContinuousBatchingConfig(max_memory_percent=kv_fraction)
    except (ImportError, TypeError):
        return None, "transformers' default (this version takes no max_memory_percent)"
    return config, f"{kv_fraction:.2f} of free memory (max_memory_percent)"


def build_runners(args: argparse.Namespace, baselines: list[str], out_lens: list[int],
                  model_dir: Path) -> list[Any]:
    """The engine, then the baselines in the order given; HF baselines share one model.

    The engine is built first: it sizes its KV cache from the memory still free.
    """
    engine = SluiceRunner(args)
    runners: dict[str, Any] = {}
    if "hf" in baselines:
        runners["hf"] = HFGenerateRunner(args, out_lens, model_dir)
    if "hf_batch" in baselines:
        shared = runners["hf"].model if "hf" in runners else None
        if shared is not None and args.hf_batch_kv_fraction is None:
            args.hf_batch_kv_fraction = SHARED_HF_BATCH_KV_FRACTION
        runners["hf_batch"] = HFGenerateBatchRunner(args, out_lens, model_dir, model=shared)
    return [engine] + [runners[b] for b in baselines]


def measure(runners: list[Any], prompts: list[list[int]], out_lens: list[int],
            repeats: int, warmup_prompts: int | None = None) -> list[Result]:
    """Alternates the runners `repeats` times, so drift in machine speed hits both alike.

    Each side first runs the workload (or its first `warmup_prompts` prompts) once untimed: the
    first pass at full size grows the allocator's pools and picks matmul algorithms for the large
    shapes, which is start-up cost.
    """
    k = len(prompts) if warmup_prompts is None else min(warmup_prompts, len(prompts))
    for runner in runners:
        print(f"warm-up {runner.name} ({k} prompts)", flush=True)
        runner.run(prompts[:k], out_lens[:k], show_progress=False)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    produced: dict[str, int] = {}
    for rep in range(repeats):
        for runner in runners:
            _sync(runner.device)
            t0 = time.perf_counter()
            produced[runner.name] = runner.run(prompts, out_lens, show_progress=rep == 0)
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


# -- roofline -------------------------------------------------------------------------------


@dataclass
class Roofline:
    """Ideal time of a workload on a device; see `roofline`."""

    roofline_s: float
    prefill_s: float
    decode_s: float
    decode_step_s: float
    decode_steps: float
    batch: int
    avg_context: float
    params: int
    weight_bytes: int
    kv_bytes_per_token: int
    peak_bandwidth_tbs: float
    peak_tflops: float
    requests_per_s: float
    output_tokens_per_s: float
    assumptions: str


def roofline(cfg: Any, dtype_bytes: int, in_lens: list[int], out_lens: list[int],
             max_num_seqs: int, peak_bandwidth_tbs: float = 4.26,
             peak_tflops: float = 810.0) -> Roofline:
    """Ideal time for the workload on a device with the given peak bandwidth and matmul rate.

    With P = model parameters (`cfg.num_params`, embeddings included), W = P * dtype_bytes,
    BW = peak bytes/s and F = peak FLOP/s:

      prefill = 2 * P * sum(prompt tokens) / F
          Matmul FLOPs only: attention's own FLOPs (QK^T, PV) are left out, so this is a
          lower bound that is loose for long prompts.

      decode: all requests run concurrently, B = min(num_prompts, max_num_seqs) at a time,
      the batch always full; each request takes output_len steps (the step that produces its
      first token is counted as a decode step, as in the engine). Steps = sum(output_len) / B,
      each costing
          max(W / BW, B * 2 * P / F) + B * avg_context * kv_bytes_per_token / BW
      where the first term is streaming the weights once or the batch's matmuls, whichever
      bounds, and the second is reading the batch's KV cache; avg_context is the mean
      context over all decode steps, prompt_len + (j - 1) / 2 averaged over tokens j.

      roofline = prefill + steps * step time. Nothing overlaps prefill with decode, and
      everything else (sampling, norms, host work) is taken as free.
    """
    params = int(cfg.num_params)
    weight_bytes = params * dtype_bytes
    kv_per_token = int(cfg.kv_bytes_per_token(dtype_bytes))
    bw, flops = peak_bandwidth_tbs * 1e12, peak_tflops * 1e12
    batch = max(1, min(len(in_lens), max_num_seqs))
    decode_tokens = sum(out_lens)
    context_sum = sum(n * p + n * (n - 1) / 2 for p, n in zip(in_lens, out_lens, strict=True))
    avg_context = context_sum / decode_tokens if decode_tokens else 0.0
    prefill_s = 2 * params * sum(in_lens) / flops
    step_s = max(weight_bytes / bw, batch * 2 * params / flops) \
        + batch * avg_context * kv_per_token / bw
    steps = decode_tokens / batch
    total = prefill_s + steps * step_s
    return Roofline(
        roofline_s=total, prefill_s=prefill_s, decode_s=steps * step_s, decode_step_s=step_s,
        decode_steps=steps, batch=batch, avg_context=avg_context, params=params,
        weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token,
        peak_bandwidth_tbs=peak_bandwidth_tbs, peak_tflops=peak_tflops,
        requests_per_s=len(in_lens) / total, output_tokens_per_s=decode_tokens / total,
        assumptions=("prefill = 2*params*prompt_tokens/peak_flops (no attention FLOPs); decode "
                     "steps = sum(output_len)/B at a full batch B = min(num_prompts, "
                     "max_num_seqs), each max(weight_bytes/bw, B*2*params/flops) + "
                     "B*avg_context*kv_bytes_per_token/bw; nothing else costs time"))


# -- shared by the loadtest scripts ---------------------------------------------------------


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


def _versions() -> dict[str, str]:
    """Versions that decide the figures: the numeric stack and, where present, the kernels'."""
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": str(torch.version.cuda)}
    for module in ("transformers", "triton", "numpy"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = "not installed"
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_json(path: str, report: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


# -- command line ---------------------------------------------------------------------------


def parse_baselines(text: str) -> list[str]:
    """'hf,hf_batch' -> ['hf', 'hf_batch']; 'none' alone means the engine only."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in (*BASELINE_RUNNERS, "none")]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown baseline {', '.join(bad) or repr(text)}; use a comma-separated list of "
            f"{', '.join(BASELINE_RUNNERS)}, or none")
    if "none" in names and len(names) > 1:
        raise argparse.ArgumentTypeError("'none' cannot be combined with other baselines")
    return list(dict.fromkeys(n for n in names if n != "none"))


def parse_range(text: str) -> tuple[int, int]:
    """'100:1024' -> (100, 1024), both ends included."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI, e.g. 100:1024, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
    return lo, hi


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags every engine benchmark takes."""
    p.add_argument("--model", default="tiny",
                   help="'tiny', a shipped config name (llama-3.1-8b, qwen3-0.6b, ...) or a folder")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.offline", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--input-len-range", type=parse_range, metavar="LO:HI",
                   help="prompt lengths uniform in [LO, HI] (replaces --input-len and the ratio)")
    p.add_argument("--output-len-range", type=parse_range, metavar="LO:HI",
                   help="output lengths uniform in [LO, HI] (replaces --output-len and the ratio)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group(
        "datasets of the serving benchmark (default: the random token-id prompts above); "
        "--input-len, --output-len and --random-range-ratio size the random ones")
    add_dataset_arguments(g, default=None, with_lengths=False)
    g.add_argument("--tokenizer", help="for text datasets: 'tiny' or a model folder (default: "
                                       "the model's own)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"],
                   help="the engine's attention backend (default: the engine's own choice)")
    p.add_argument("--baseline", type=parse_baselines, default=["hf"], metavar="LIST",
                   help="comma-separated: hf (generate, static batches), hf_batch "
                        "(generate_batch, continuous batching), or none (default: hf)")
    p.add_argument("--hf-batch-size", type=int, default=0,
                   help="hf: prompts per static batch; 0: one batch of all (its KV cache must "
                        "fit: e.g. 128 for 1000 prompts of 1k tokens, 8B model, H200)")
    p.add_argument("--hf-batch-attn-implementation", default="paged|sdpa",
                   help="hf_batch: attention implementation for generate_batch")
    p.add_argument("--hf-batch-kv-fraction", type=float, default=None,
                   help="hf_batch: share of free GPU memory its paged KV cache may take "
                        f"(default: transformers' own, or {SHARED_HF_BATCH_KV_FRACTION} when the "
                        "hf baseline also runs and needs the rest)")
    p.add_argument("--warmup-prompts", type=int, default=None,
                   help="untimed warm-up on the first N prompts (default: the whole workload)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each side, alternating; the median is reported")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="fraction of GPU memory the engine may use (the baselines need the rest)")
    p.add_argument("--roofline", action="store_true",
                   help="also report the workload's ideal time on a GPU with the peaks below")
    p.add_argument("--peak-bandwidth-tbs", type=float, default=4.26,
                   help="roofline: memory bandwidth in TB/s (H200: 4.8 spec, ~4.26 measured)")
    p.add_argument("--peak-tflops", type=float, default=810.0,
                   help="roofline: dense matmul TFLOP/s in the model's dtype")
    p.add_argument("--output-json", default="results/offline.json")
    return p


def _print_table(results: list[Result], rl: Roofline | None) -> None:
    print(f"\n{'engine':<19}{'median s':>9}{'min..max s':>14}{'req/s':>9}{'out tok/s':>12}"
          f"{'total tok/s':>13}")
    for r in results:
        spread = f"{min(r.elapsed_runs_s):.2f}..{max(r.elapsed_runs_s):.2f}"
        print(f"{r.name:<19}{r.elapsed_s:>9.2f}{spread:>14}{r.requests_per_s:>9.2f}"
              f"{r.output_tokens_per_s:>12.1f}{r.total_tokens_per_s:>13.1f}")
    if rl is not None:
        print(f"{'roofline':<19}{rl.roofline_s:>9.2f}{'':>14}{rl.requests_per_s:>9.2f}"
              f"{rl.output_tokens_per_s:>12.1f}")


def _speedups(results: list[Result]) -> dict[str, dict[str, Any]]:
    """Engine output throughput over each baseline's: the median's ratio and each pass's."""
    engine = results[0]
    out = {}
    for base in results[1:]:
        per_run = [b / e for e, b in zip(engine.elapsed_runs_s, base.elapsed_runs_s, strict=True)]
        ratio = engine.output_tokens_per_s / base.output_tokens_per_s
        out[base.name] = {"ratio": ratio, "per_run": per_run}
        print(f"sluice / {base.name} output throughput: {ratio:.2f}x (median; per run "
              f"{min(per_run):.2f}..{max(per_run):.2f}x)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from worker.models.config import ModelConfig
    from worker.models.loader import resolve_dtype
    from worker.models.registry import resolve_model

    model_dir = resolve_model(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    prompts, out_lens = dataset_workload(args, model_dir, cfg.vocab_size)
    runners = build_runners(args, args.baseline, out_lens, model_dir)
    results = measure(runners, prompts, out_lens, args.repeats, args.warmup_prompts)
    rl = None
    if args.roofline:
        dtype = resolve_dtype(args.dtype, cfg, runners[0].device)
        rl = roofline(cfg, torch.empty((), dtype=dtype).element_size(),
                      [len(p) for p in prompts], out_lens, args.max_num_seqs,
                      args.peak_bandwidth_tbs, args.peak_tflops)
    _print_table(results, rl)
    print()
    speedups = _speedups(results)
    report: dict[str, Any] = {
        "config": vars(args), "model_architecture": cfg.architecture,
        "versions": _versions(), "device": _device_name(),
        "workload": {"num_prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                     "output_tokens": sum(out_lens),
                     "input_len_min_max": [min(map(len, prompts)), max(map(len, prompts))],
                     "output_len_min_max": [min(out_lens), max(out_lens)]},
        "runners": {r.name: getattr(r, "note", "") for r in runners},
        "results": [r.as_dict() for r in results],
        "speedups": speedups,
    }
    for r in runners:
        if isinstance(r, HFGenerateBatchRunner) and r.short_requests:
            report["runners"][r.name] += (f"; WARNING: {r.short_requests} requests ended before "
                                          "their output length")
    for name, s in speedups.items():
        report[f"speedup_vs_{name}"] = s["ratio"]
    if "hf_generate" in speedups:  # the key earlier reports used
        report["speedup_per_run"] = speedups["hf_generate"]["per_run"]
    if rl is not None:
        fraction = rl.roofline_s / results[0].elapsed_s
        for entry, r in zip(report["results"], results, strict=True):
            entry["fraction_of_roofline"] = rl.roofline_s / r.elapsed_s
        report["roofline"] = {**asdict(rl), "fraction_of_roofline": fraction}
        print(f"roofline {rl.roofline_s:.3g} s (prefill {rl.prefill_s:.3g} s + decode "
              f"{rl.decode_s:.3g} s at batch {rl.batch}); sluice reaches {fraction:.1%} of it")
    _write_json(args.output_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
