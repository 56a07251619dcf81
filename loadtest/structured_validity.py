"""Structured outputs: validity over real-world-style JSON schemas, the cost of masking at a 128k
vocabulary, and the throughput of a half-constrained batch against a free one, in one run.

1. Validity: every schema of loadtest/data/structured_schemas.json (nesting, enums, bounded
   arrays, required fields, anyOf/oneOf, $ref, string formats, and some keywords llguidance does
   not implement) becomes a grammar; unsupported ones are counted with their reasons. The others
   generate --samples outputs each from the model through the offline API with a grammar mask
   (temperature 1, seeds 0..samples-1); every output that ends with "stop" is checked with
   jsonschema (format checks on).
2. Masking cost: a synthetic byte-level vocabulary of --vocab tokens (256 bytes, the model's
   token strings as its vocabulary file spells them, then JSON punctuation, numbers and letter
   strings; no model uses it, it only has a realistic size and mix), one matcher per row walking the order/invoice/... schemas with
   random logits. Per step, in CPU time of the stepping thread: filling the packed bitmasks, and
   the sampler's extra time with the masks applied (the packed rows expanded into one additive
   bias, the logits copied and the bias added in place; against the same greedy sampler without
   masks, which needs no copy), at batch 1 and 64. With --device cuda the sampler's part is wall
   time, since its result waits for the device.
3. Mixed batch: an engine kept full at --batch requests, half of them under the supported
   schemas' grammars, against an all-free batch (every row --max-len tokens) and against a
   "stand-in" batch whose rows in place of the constrained ones are free with the lengths the
   constrained outputs had (the same work but the masking); each finished request is replaced
   by one of its kind; the first free rows get staggered lengths, so free rows end one at a
   time as in a served batch, not all in the same step (a batch in lockstep prefills its
   replacements together and decodes rows of equal length, which no served batch does). Each
   side has an engine of its own (three copies of the model), and they
   take turns of --block-steps steps, --blocks times each, the order rotating: a machine whose
   speed drifts slows all three alike. Output tokens per second of wall time and of the
   process's CPU time over each side's turns; the spread is that of the ratios of the turns.

    python -m loadtest.structured_validity
    python -m loadtest.structured_validity --model tiny --samples 4 --batch 32 --blocks 100
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import string
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import torch
from llguidance import LLTokenizer, TokenizerWrapper
from tqdm import tqdm

from worker import LLM, SamplingParams
from worker.engine.engine import Engine
from worker.engine.request import Request
from worker.engine.sampler import Sampler
from worker.structured.matcher import GrammarCompiler, GrammarMatcher, build_tokenizer
from worker.structured.spec import InvalidStructuredOutputError, build_grammar

SCHEMAS = Path(__file__).parent / "data" / "structured_schemas.json"
PROMPT = "Return the record as JSON:"
# Schemas the masking-cost walk cycles through: objects with strings, numbers, arrays, formats.
WALK_SCHEMAS = ["order", "invoice", "meeting_notes", "event", "github_issue", "recipe"]


def load_schemas() -> list[dict[str, Any]]:
    return json.loads(SCHEMAS.read_text())


def grammar_or_reason(schema: Any, compact: bool) -> tuple[str | None, str | None]:
    try:
        return build_grammar("json", schema, disable_any_whitespace=compact), None
    except InvalidStructuredOutputError as e:
        return None, e.message


# -- 1. validity -------------------------------------------------------------------------------


def validity(llm: LLM, compiler: GrammarCompiler, schemas: list[dict[str, Any]], samples: int,
             max_tokens: int, compact: bool) -> dict[str, Any]:
    unsupported: dict[str, str] = {}
    jobs: list[tuple[str, Any, GrammarMatcher, int]] = []
    for entry in schemas:
        grammar, reason = grammar_or_reason(entry["schema"], compact)
        if grammar is None:
            unsupported[entry["name"]] = reason or ""
            continue
        jobs += [(entry["name"], entry["schema"], compiler.compile(grammar), seed)
                 for seed in range(samples)]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens)
              for *_, seed in jobs]
    t0 = time.perf_counter()
    outs = llm.generate([PROMPT] * len(jobs), params, logits_masks=[m for _, _, m, _ in jobs])
    elapsed = time.perf_counter() - t0
    stopped = valid = 0
    invalid: list[dict[str, str]] = []
    for (name, schema, _, _), out in zip(jobs, outs, strict=True):
        c = out.outputs[0]
        if c.finish_reason != "stop":
            continue
        stopped += 1
        try:
            validator = jsonschema.validators.validator_for(schema)
            validator(schema, format_checker=validator.FORMAT_CHECKER).validate(
                json.loads(c.text))
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            invalid.append({"schema": name, "text": c.text[:200], "error": str(e)[:200]})
    return {"num_schemas": len(schemas), "num_unsupported": len(unsupported),
            "unsupported_share": len(unsupported) / len(schemas), "unsupported": unsupported,
            "num_outputs": len(jobs), "num_stopped": stopped,
            "stopped_share": stopped / max(len(jobs), 1), "num_valid": valid,
            "valid_share_of_stopped": valid / max(stopped, 1), "invalid": invalid,
            "generate_s": elapsed}


# -- 2. masking cost ---------------------------------------------------------------------------


def synthetic_tokenizer(vocab_size: int, base: list[bytes], eos: Iterable[int] = (0,)
                        ) -> LLTokenizer:
    """A byte-level vocabulary of exactly vocab_size tokens; see the module docstring. The
    first of `eos` is the grammars' EOS; the others are special tokens no grammar allows."""
    eos_ids = sorted(set(eos))
    tokens: list[bytes] = [bytes([i]) for i in range(256)]
    seen = set(tokens)

    def add(t: bytes) -> None:
        if t and t not in seen and len(tokens) < vocab_size - 1:
            seen.add(t)
            tokens.append(t)

    for t in base:
        add(t)
    for t in (b'{"', b'":', b'",', b'"}', b'":"', b'","', b'[{', b'}]', b'},{', b'":[', b'true',
              b'false', b'null', b'": ', b'", "'):
        add(t)
    for n in range(10000):
        add(str(n).encode())
    letters = string.ascii_lowercase
    for k in (2, 3, 4):
        for combo in itertools.product(letters, repeat=k):
            word = "".join(combo).encode()
            for t in (word, b" " + word, word.capitalize(), b'"' + word):
                add(t)
            if len(tokens) >= vocab_size:
                break
        if len(tokens) >= vocab_size:
            break
    del tokens[vocab_size - len(eos_ids):]
    while len(tokens) < vocab_size - len(eos_ids):  # a small base: pad, unreachable
        tokens.append(b"<unused%d>" % len(tokens))
    for k, i in enumerate(eos_ids):  # at the model's own EOS ids (ascending, so each lands)
        tokens.insert(i, b"<eos%d>" % k)
    by_bytes = {t: i for i, t in enumerate(tokens)}
    longest = max(len(t) for t in tokens)

    class Greedy:
        """Longest match: llguidance only tokenizes the grammar's own literals with it."""

        def __init__(self) -> None:
            self.eos_token_id = eos_ids[0]
            self.bos_token_id = None
            self.special_token_ids = eos_ids
            self.tokens = tokens

        def __call__(self, text: bytes) -> list[int]:
            ids, i = [], 0
            while i < len(text):
                for n in range(min(longest, len(text) - i), 0, -1):
                    tid = by_bytes.get(text[i:i + n])
                    if tid is not None and tid not in eos_ids:
                        ids.append(tid)
                        i += n
                        break
            return ids

    return LLTokenizer(TokenizerWrapper(Greedy()))


def mask_cost(tokenizer: LLTokenizer, schemas: dict[str, Any], batch: int, steps: int,
              device: torch.device) -> dict[str, float]:
    vocab = tokenizer.vocab_size
    compiler = GrammarCompiler(tokenizer, vocab)
    templates = [compiler.submit(build_grammar("json", schemas[name], disable_any_whitespace=True)
                                 ).result() for name in WALK_SCHEMAS]
    # No prefetch: the fill is timed where it happens (on a GPU the service overlaps it with
    # the model).
    rows = [GrammarMatcher(templates[i % len(templates)].deep_copy(), vocab)
            for i in range(batch)]
    params = SamplingParams.greedy()
    masked = [Request(f"r{i}", [1], params, max_tokens=1 << 20, logits_mask=m)
              for i, m in enumerate(rows)]
    free = [Request(f"f{i}", [1], params, max_tokens=1 << 20) for i in range(batch)]
    sampler = Sampler(vocab)
    fill_s: list[float] = []
    masked_s: list[float] = []
    free_s: list[float] = []
    gen = torch.Generator().manual_seed(0)
    # On the CPU, this thread's CPU time: other processes' load does not count. On a GPU, wall
    # time: the sampler's result waits for the device.
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    for _ in range(steps):
        logits = torch.randn((batch, vocab), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.thread_time()
        packed = [m.allowed_tokens(vocab) for m in rows]
        fill_s.append(time.thread_time() - t0)  # llguidance, on the host either way
        ahead = [r.logits_mask for r in masked]
        for r, p in zip(masked, packed, strict=True):  # the sampler reuses this step's masks
            r.logits_mask = _Fixed(p)
        t2 = clock()
        out = sampler(logits, masked)
        t3 = clock()
        sampler(logits, free)
        t4 = clock()
        for r, m in zip(masked, ahead, strict=True):
            r.logits_mask = m
        masked_s.append(t3 - t2)
        free_s.append(t4 - t3)
        for i, (m, token) in enumerate(zip(rows, out.token_ids, strict=True)):
            if m.is_finished or out.errors[i]:
                rows[i] = GrammarMatcher(templates[i % len(templates)].deep_copy(), vocab)
                masked[i].logits_mask = rows[i]
            else:
                m.accept_token(token)
    fill = statistics.median(fill_s) * 1e3
    apply = max(statistics.median(masked_s) - statistics.median(free_s), 0.0) * 1e3
    return {"batch": batch, "vocab": vocab, "steps": steps, "fill_ms_per_step": fill,
            "apply_ms_per_step": apply, "total_ms_per_step": fill + apply,
            "fill_ms_per_row": fill / batch, "sampler_free_ms_per_step":
                statistics.median(free_s) * 1e3}


class _Fixed:
    """A mask computed already (so the sampler's part is timed apart from llguidance's)."""

    def __init__(self, packed: torch.Tensor) -> None:
        self.packed = packed

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        return self.packed

    def accept_token(self, token_id: int) -> None:
        pass


# -- 3. mixed batch ----------------------------------------------------------------------------


class _Side:
    """One engine kept at `batch` requests, every finished request replaced by one of its kind.

    Half the rows are free (max_tokens, EOS ignored; the first ones 1/n, 2/n, ... of it, so
    they end in turn); the other half are `half`: "grammar"
    (under the grammars in turn; their output lengths are appended to `lengths`), "free" (like
    the first half), or "stand-in" (free, each taking the next length the grammar rows had, so
    the batch does the same work minus the masking).
    """

    def __init__(self, engine: Engine, compiler: GrammarCompiler, prompt: list[int],
                 grammars: list[str], batch: int, max_tokens: int, half: str,
                 lengths: list[int], lockstep: bool = False) -> None:
        self.engine, self.compiler, self.prompt, self.half = engine, compiler, prompt, half
        self.max_tokens, self.lengths = max_tokens, lengths
        self._ids = itertools.count()
        self._grammars = itertools.cycle(grammars)
        self._kinds: dict[str, str] = {}
        self._produced: dict[str, int] = {}
        self._stand_ins = 0
        self.tokens, self.wall, self.cpu = 0, 0.0, 0.0  # the timed blocks' totals
        self.block_rates: list[float] = []  # tokens per wall second, per timed block
        kinds = [half] * (batch // 2) + ["free"] * (batch - batch // 2)
        num_free, nth_free = kinds.count("free"), itertools.count(1)
        for kind in kinds:  # the first free rows end in turn, as served rows do
            staggered = kind == "free" and not lockstep
            self._add(kind, max_tokens * next(nth_free) // num_free if staggered else None)

    def _add(self, kind: str, first_len: int | None = None) -> None:
        rid = f"q{next(self._ids)}"
        self._kinds[rid] = kind
        mask = self.compiler.compile(next(self._grammars)) if kind == "grammar" else None
        limit = self.max_tokens if first_len is None else first_len
        if kind == "stand-in" and self.lengths:
            limit = self.lengths[self._stand_ins % len(self.lengths)]
            self._stand_ins += 1
        params = SamplingParams(temperature=1.0, max_tokens=limit, ignore_eos=kind != "grammar")
        self.engine.add_request(rid, self.prompt, params, logits_mask=mask)

    def run(self, steps: int, timed: bool = True) -> None:
        tokens = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            for out in self.engine.step():
                n = len(out.new_token_ids)
                tokens += n
                self._produced[out.request_id] = self._produced.get(out.request_id, 0) + n
                if out.finished:
                    kind = self._kinds.pop(out.request_id)
                    if kind == "grammar":
                        self.lengths.append(self._produced[out.request_id])
                    del self._produced[out.request_id]
                    self._add(kind)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if timed:
            self.tokens += tokens
            self.wall += wall
            self.cpu += cpu
            self.block_rates.append(tokens / wall)

    def close(self) -> None:
        self.engine.abort(list(self._kinds))


def mixed_batch(engines: list[Engine], compiler: GrammarCompiler, prompt: list[int],
                grammars: list[str], batch: int, block_steps: int, blocks: int,
                max_tokens: int, lockstep: bool = False) -> dict[str, Any]:
    """The three sides, each on an engine of its own, take turns `block_steps` steps at a time
    (the order rotating), so drift of the machine's speed falls on all three alike; throughput
    is each side's tokens over its timed blocks' time."""
    for g in grammars:  # compiled once up front, as the service's cache would hold them
        compiler.compile(g)
    lengths: list[int] = []
    sides = [_Side(engines[0], compiler, prompt, grammars, batch, max_tokens, "grammar", lengths,
                   lockstep)]
    sides[0].run(40, timed=False)  # the first grammar rows' lengths, before any stand-in row
    for engine, half in zip(engines[1:], ("free", "stand-in"), strict=True):
        sides.append(_Side(engine, compiler, prompt, grammars, batch, max_tokens, half, lengths,
                           lockstep))
        sides[-1].run(10, timed=False)
    for b in tqdm(range(blocks), desc="mixed batch", unit="block"):
        for side in sides[b % 3:] + sides[:b % 3]:
            side.run(block_steps)
    for side in sides:
        side.close()
    by = {side.half: side for side in sides}
    out: dict[str, Any] = {
        "batch": batch, "constrained": batch // 2, "block_steps": block_steps, "blocks": blocks,
        "max_tokens": max_tokens, "lockstep": lockstep,
        "mean_constrained_len": statistics.mean(lengths or [0]),
        "wall": {k: v.tokens / v.wall for k, v in by.items()},
        "cpu": {k: v.tokens / v.cpu for k, v in by.items()}}
    for base in ("free", "stand-in"):
        for clock in ("wall", "cpu"):
            out[f"{clock}_ratio_vs_{base}"] = out[clock]["grammar"] / out[clock][base]
        # Spread: the ratio of neighbouring blocks (the grammar side's and the base's in the
        # same turn), quartiles over the run.
        per_block = [g / f for g, f in zip(by["grammar"].block_rates, by[base].block_rates,
                                           strict=True)]
        out[f"block_ratios_vs_{base}"] = per_block
        out[f"block_ratio_quartiles_vs_{base}"] = (statistics.quantiles(per_block, n=4)
                                                   if len(per_block) > 1 else per_block * 3)
    return out


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="model for validity and the mixed batch: tiny, a shipped config "
                        "(llama-3.1-8b, ...) or a checkpoint directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the engines and the "
                   "masking-cost sampler run")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights from the config (no checkpoint needed); a model "
                        "without a tokenizer skips the validity part and builds its grammars "
                        "on a synthetic vocabulary of its size")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache per engine (three engines share one device)")
    p.add_argument("--samples", type=int, default=4, help="outputs per supported schema")
    p.add_argument("--max-tokens", type=int, default=256, help="per validity output")
    p.add_argument("--flexible-whitespace", action="store_true",
                   help="let the JSON hold any whitespace (default: none, as a random model "
                        "would otherwise fill its budget with it)")
    p.add_argument("--vocab", type=int, default=128256, help="masking-cost vocabulary size")
    p.add_argument("--mask-steps", type=int, default=100, help="steps per masking-cost batch")
    p.add_argument("--batch", type=int, default=32, help="mixed-batch size")
    p.add_argument("--block-steps", type=int, default=10,
                   help="engine steps a mixed-batch side runs before the next takes its turn")
    p.add_argument("--blocks", type=int, default=150, help="timed turns per mixed-batch side")
    p.add_argument("--max-len", type=int, default=64, help="output tokens of a free mixed row")
    p.add_argument("--lockstep", action="store_true",
                   help="start every free row of the mixed batch at once, as measurements "
                        "before 2026-12-07 did: they then end and are replaced together")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 keeps timings steady on a shared machine)")
    p.add_argument("--output-json", default="results/structured_validity.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    schemas = load_schemas()
    compact = not args.flexible_whitespace
    device = torch.device(args.device)

    def load() -> LLM:
        return LLM(args.model, device=args.device, load_format=args.load_format,
                   dtype=args.dtype, max_num_seqs=max(args.batch, 64),
                   kv_cache_memory_bytes=args.kv_cache_memory_bytes)

    llm = load()
    eng = llm.engine
    base = [t.encode() for t in llm.tokenizer.hf.get_vocab()] if llm.tokenizer else []
    # Built in the background and waited for on a GPU, as the service does.
    prefetch = device.type == "cuda"
    if llm.tokenizer is not None:
        compiler = GrammarCompiler(build_tokenizer(llm.tokenizer.hf, eng.vocab_size,
                                                   eng.eos_token_ids), eng.vocab_size,
                                   prefetch=prefetch)
        prompt = llm.tokenizer.encode(PROMPT)
    else:
        compiler = GrammarCompiler(synthetic_tokenizer(eng.vocab_size, base, eng.eos_token_ids),
                                   eng.vocab_size, prefetch=prefetch)
        prompt = [(7919 * i) % eng.vocab_size for i in range(1, 13)]  # 12 tokens, as PROMPT
    report: dict[str, Any] = {"model": args.model, "device": str(device),
                              "device_name": (torch.cuda.get_device_name(device)
                                              if device.type == "cuda" else platform.processor()),
                              "platform": platform.platform(),
                              "torch_threads": torch.get_num_threads(),
                              "compact_whitespace": compact, "argv": sys.argv[1:]}

    if llm.tokenizer is None:
        print("validity: skipped (the model has no tokenizer to read its outputs with)")
    else:
        report["validity"] = v = validity(llm, compiler, schemas, args.samples,
                                          args.max_tokens, compact)
        print_validity(v)

    by_name = {e["name"]: e["schema"] for e in schemas}
    synth = synthetic_tokenizer(args.vocab, base)
    report["mask_cost"] = []
    for batch in (1, 64):
        cost = mask_cost(synth, by_name, batch, args.mask_steps, device)
        report["mask_cost"].append(cost)
        print(f"masking at vocab {cost['vocab']}, batch {batch}: fill {cost['fill_ms_per_step']:.2f} "
              f"ms/step ({cost['fill_ms_per_row']:.3f} ms/row), apply "
              f"{cost['apply_ms_per_step']:.2f} ms/step, total {cost['total_ms_per_step']:.2f} ms")

    grammars = [g for e in schemas
                if (g := grammar_or_reason(e["schema"], compact)[0]) is not None]
    # The other two sides get engines of their own (the same model and settings).
    engines = [eng] + [load().engine for _ in range(2)]
    report["mixed"] = m = mixed_batch(engines, compiler, prompt, grammars,
                                      args.batch, args.block_steps, args.blocks,
                                      max_tokens=args.max_len, lockstep=args.lockstep)
    print_mixed(m)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def print_validity(v: dict[str, Any]) -> None:
    print(f"validity: {v['num_schemas']} schemas, {v['num_unsupported']} unsupported "
          f"({v['unsupported_share']:.0%}); {v['num_outputs']} outputs, {v['num_stopped']} "
          f"ended with stop ({v['stopped_share']:.0%}), {v['num_valid']} of those valid "
          f"({v['valid_share_of_stopped']:.1%})")
    for name, reason in v["unsupported"].items():
        print(f"  unsupported {name}: {reason[:110]}")


def print_mixed(m: dict[str, Any]) -> None:
    print(f"mixed batch of {m['batch']} ({m['constrained']} under a grammar, mean output "
          f"{m['mean_constrained_len']:.0f} tokens; free rows {m['max_tokens']}), "
          f"{m['blocks']} turns of {m['block_steps']} steps per side:")
    for base in ("free", "stand-in"):
        q = m[f"block_ratio_quartiles_vs_{base}"]
        for clock in ("wall", "cpu"):
            print(f"  vs {base:8} {clock:4}: {m[clock]['grammar']:6.0f} vs {m[clock][base]:6.0f} "
                  f"tok/s, ratio {m[f'{clock}_ratio_vs_{base}']:.3f}"
                  + (f" (turns' quartiles {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f})"
                     if clock == "wall" else ""))


if __name__ == "__main__":
    raise SystemExit(main())
