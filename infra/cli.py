"""The `sluice` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

DESCRIPTION = """\
Sluice: self-hosted, OpenAI-compatible LLM serving.

Commands:
  generate   run prompts through the engine in this process and print the completions
  model      make the built-in models (e.g. `sluice model tiny DIR`)

Run `sluice COMMAND --help` for the options of each command.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sluice", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_model(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate completions offline",
        description="Load a model and complete each PROMPT (or each line of --prompts-file). "
                    "Example: sluice generate 'Once upon a time' --max-tokens 32 --temperature 0")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt texts")
    p.add_argument("--prompts-file", help="file with one prompt per line")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built in), a local Hugging Face model folder, or a hub id")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights from config.json alone (for benchmarks)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from worker import LLM, SamplingParams
    from worker.engine.errors import EngineError

    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("sluice generate: give at least one PROMPT or --prompts-file", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, seed=args.seed, max_tokens=args.max_tokens, stop=args.stop,
            ignore_eos=args.ignore_eos)
        llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
                  max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=not args.no_prefix_caching)
        if args.chat:
            results = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            results = llm.generate(prompts, params)
    except EngineError as e:
        print(f"sluice generate: {e}", file=sys.stderr)
        return 2
    for prompt, result in zip(prompts, results, strict=True):
        for out in result.outputs:
            if args.json:
                print(json.dumps({"prompt": prompt, "index": out.index, "text": out.text,
                                  "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
            else:
                print(f"--- {prompt!r} [{out.index}] ({out.finish_reason}, "
                      f"{len(out.token_ids)} tokens)\n{prompt}{out.text}")
    return 0


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="make built-in models",
                       description="Make a built-in model folder. `tiny` is a few-MB Llama-style "
                                   "model with random weights from a fixed seed and a byte-level "
                                   "BPE tokenizer; it is identical on every machine.")
    p.add_argument("name", choices=["tiny"], help="which model")
    p.add_argument("dir", help="output folder (created; must not exist or be empty)")
    p.set_defaults(func=_model)


def _model(args: argparse.Namespace) -> int:
    from worker.models.tiny import build_tiny_model

    path = build_tiny_model(args.dir)
    print(f"wrote the {args.name} model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
