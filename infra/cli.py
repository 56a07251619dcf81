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
  up         run the whole service here: Redis, the scaler and its workers, and the gateway
  gateway    run the gateway alone (needs a Redis and workers)
  worker     run one worker alone (needs a Redis)
  scaler     size one model's worker fleet (local processes or a Kubernetes Deployment)
  status     show the fleet: models, queue depths, workers and their state, KV usage
  generate   run prompts through the engine in this process and print the completions
  model      make the built-in models (e.g. `sluice model tiny DIR`)
  bench      load-test any OpenAI-compatible server (Sluice, vLLM) with vLLM's flags and metrics

Settings come from flags, else from SLUICE_* environment variables (e.g. SLUICE_REDIS_URL,
SLUICE_API_KEYS), else from defaults.

Run `sluice COMMAND --help` for the options of each command.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sluice", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(sub)
    _add_gateway(sub)
    _add_worker(sub)
    _add_scaler(sub)
    _add_status(sub)
    _add_generate(sub)
    _add_model(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.settings import InvalidSettingsError

    try:
        return int(args.func(args) or 0)
    except InvalidSettingsError as e:  # a flag or SLUICE_* variable is wrong: say which
        print(f"sluice {args.command}: {e}", file=sys.stderr)
        return 2


def _given(args: argparse.Namespace, *fields: str) -> dict[str, object]:
    """Flags the user set, so unset ones fall through to SLUICE_* variables and defaults."""
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up", help="run Redis, the scaler with its workers, and the gateway on this machine",
        description="Start the whole service on embedded defaults: a private Redis (AOF on, in "
                    "--data-dir) unless --redis-url is given, the scaler, which runs between "
                    "--min-workers and --max-workers worker processes with --model (the built-in "
                    "tiny model by default; on the CPU when there is no GPU), and the gateway. "
                    "The defaults (1 and 1) keep one worker; --min-workers 0 scales to zero after "
                    "--idle-timeout seconds without work, and the next request starts a worker "
                    "(it waits in Redis meanwhile). Prints the URL and API key; Ctrl-C stops "
                    "everything, the workers by draining.")
    p.add_argument("--host", help="gateway bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gateway port (default 8000)")
    p.add_argument("--model", help="'tiny', a local Hugging Face model folder, or a hub id")
    p.add_argument("--api-key", help="API key clients must send (default: a random one)")
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument("--data-dir", help="where the embedded Redis keeps its data")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--min-workers", type=int, help="fewest workers; 0 allows scale to zero "
                                                   "(default 1)")
    p.add_argument("--max-workers", type=int, help="most workers (default 1)")
    p.add_argument("--idle-timeout", type=float, dest="idle_timeout_s", metavar="SECONDS",
                   help="with --min-workers 0: seconds without work before the last worker "
                        "stops (default 300)")
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from infra.up import run_up
    from shared.settings import UpSettings, load_settings

    settings = load_settings(UpSettings, **_given(args, "host", "port", "model", "api_key",
                                                  "redis_url", "data_dir", "device",
                                                  "min_workers", "max_workers", "idle_timeout_s"))
    return run_up(settings)


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="run the OpenAI-compatible gateway",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models, "
                                   "/v1/jobs, /health and /metrics, queueing work on Redis. API "
                                   "keys come from SLUICE_API_KEYS (comma-separated).")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--redis-url")
    p.add_argument("--busy-poll-ms", type=float,
                   help="keep polling this many ms after each request or reply instead of "
                        "sleeping: lower latency for a core's worth of CPU while traffic flows "
                        "(default: 20 where the gateway may use 8 or more CPUs, else 0, off)")
    p.set_defaults(func=_gateway)


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from shared.settings import GatewaySettings, load_settings

    settings = load_settings(GatewaySettings, **_given(args, "host", "port", "redis_url",
                                                       "busy_poll_ms"))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="warning", timeout_graceful_shutdown=5)
    return 0


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one GPU (or CPU) worker",
                       description="Load a model, then serve jobs from its Redis stream until "
                                   "SIGTERM or Ctrl-C, which drains: no new jobs, finish the "
                                   "running ones, exit.")
    p.add_argument("--model")
    p.add_argument("--served-model-name")
    p.add_argument("--redis-url")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--load-format")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--worker-id")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--busy-poll-ms", type=float,
                   help="the front and the engine core keep polling this many ms after each "
                        "job or step instead of sleeping: lower latency for a core each "
                        "(default: 20 where the engine runs on a GPU, 0 on the CPU)")
    p.add_argument("--core-busy-poll-ms", type=float,
                   help="the engine core's polling window alone, in ms (default: as "
                        "--busy-poll-ms); a core that kept polling also steps faster once a "
                        "request comes")
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    from shared.settings import WorkerSettings, load_settings
    from worker.service import serve

    serve(load_settings(WorkerSettings, **_given(
        args, "model", "served_model_name", "redis_url", "device", "dtype", "load_format",
        "max_num_seqs", "worker_id", "metrics_port", "busy_poll_ms", "core_busy_poll_ms")))
    return 0


def _add_scaler(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scaler", help="size one model's worker fleet from its queue and KV usage",
        description="Watch one model's Redis queue and worker heartbeats and keep the fleet "
                    "between --min-workers and --max-workers: scale up at once (at most "
                    "--max-surge per step), scale down only after --stabilization seconds of "
                    "lower load and only by draining, to zero (with --min-workers 0) after "
                    "--idle-timeout seconds without work. Backends: 'local' starts `sluice "
                    "worker` processes here; 'kubernetes' scales the Deployment --deployment in "
                    "--namespace. Each decision is logged with its reason.")
    p.add_argument("--redis-url")
    p.add_argument("--model", help="what a local worker loads: 'tiny', a folder or a hub id")
    p.add_argument("--served-model-name", help="the model name clients use (its queue)")
    p.add_argument("--backend", choices=["local", "kubernetes"], help="default local")
    p.add_argument("--min-workers", type=int, help="default 0")
    p.add_argument("--max-workers", type=int, help="default 4")
    p.add_argument("--idle-timeout", type=float, dest="idle_timeout_s", metavar="SECONDS",
                   help="seconds without work before scaling to --min-workers (default 300)")
    p.add_argument("--stabilization", type=float, dest="stabilization_s", metavar="SECONDS",
                   help="seconds of lower load before a scale-down (default 60)")
    p.add_argument("--max-surge", type=int, help="most workers started per step (default 4)")
    p.add_argument("--target-per-worker", type=int,
                   help="queued or running jobs one worker is sized for (default 16)")
    p.add_argument("--interval", type=float, dest="interval_s", metavar="SECONDS",
                   help="seconds between decisions (default 1)")
    p.add_argument("--device", help="device of local workers: auto, cpu, cuda, cuda:N")
    p.add_argument("--namespace", help="Kubernetes namespace (default: the pod's own, or "
                                       "'default')")
    p.add_argument("--deployment", help="Kubernetes worker Deployment (default sluice-worker)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.set_defaults(func=_scaler)


def _scaler(args: argparse.Namespace) -> int:
    from infra.scaler.service import BackendUnavailableError, run_scaler
    from shared.settings import ScalerSettings, load_settings

    settings = load_settings(ScalerSettings, **_given(
        args, "redis_url", "model", "served_model_name", "backend", "min_workers",
        "max_workers", "idle_timeout_s", "stabilization_s", "max_surge", "target_per_worker",
        "interval_s", "device", "namespace", "deployment", "metrics_port"))
    try:
        return run_scaler(settings)
    except BackendUnavailableError as e:
        print(f"sluice scaler: {e}", file=sys.stderr)
        return 2


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="show models, queue depths and workers",
        description="Print each model (state cold, warming or ready; queued jobs; the scaler's "
                    "desired worker count) and each worker (state, KV-cache usage, running and "
                    "waiting requests). Reads through a gateway with --url (and --api-key or "
                    "SLUICE_API_KEY), else straight from Redis (--redis-url or "
                    "SLUICE_REDIS_URL).")
    p.add_argument("--url", help="gateway base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="API key for the gateway (default: $SLUICE_API_KEY)")
    p.add_argument("--redis-url", help="read Redis directly (default: $SLUICE_REDIS_URL)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: {\"models\": [...], \"workers\": [...]}")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    import os

    from infra.status import StatusError, from_gateway, from_redis, render
    from shared.settings import DEFAULT_REDIS_URL

    try:
        if args.url:
            view = from_gateway(args.url, args.api_key or os.environ.get("SLUICE_API_KEY"))
        else:
            view = from_redis(args.redis_url or os.environ.get("SLUICE_REDIS_URL")
                              or DEFAULT_REDIS_URL)
    except StatusError as e:
        print(f"sluice status: {e}", file=sys.stderr)
        return 1
    print(json.dumps(view, indent=2) if args.json else render(view))
    return 0


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


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from loadtest import serve

    p = sub.add_parser("bench", help="load-test an OpenAI-compatible server",
                       description=serve.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_arguments(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from loadtest.serve import run_cli

    return run_cli(args, "sluice bench", f"sluice {shlex.join(sys.argv[1:])}")


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
