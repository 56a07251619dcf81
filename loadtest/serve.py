"""Serving benchmark against any OpenAI-compatible server (`sluice bench`, `python -m loadtest.serve`).

Sends a dataset's requests on an arrival schedule, times every streamed chunk, and reports the
metrics `vllm bench serve` reports (TTFT, TPOT, ITL, E2EL, throughputs, goodput) under the same
flag names, so one command line measures Sluice and vLLM alike. A comma-separated
--request-rate sweeps rates; --burst-profile sends an idle-spike-idle burst; --mode jobs submits
background jobs and polls them. --save-result writes JSON, PNG plots and one HTML page.

  # 50 random prompts of 128 in / 64 out against `sluice up`, at 2 and 8 req/s
  sluice bench --base-url http://127.0.0.1:8000 --api-key $KEY --model tiny \\
      --dataset-name random --random-input-len 128 --random-output-len 64 \\
      --num-prompts 50 --request-rate 2,8 --save-result --result-dir results/bench
  # the same against a vLLM server (same flags; the tokenizer is the model's)
  sluice bench --base-url http://gpu-box:8000 --model meta-llama/Llama-3.1-8B-Instruct ...
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest import report as rpt
from loadtest.arrivals import ArrivalError, BurstProfile, burst_offsets, send_offsets
from loadtest.client import ENDPOINT_KINDS, ApiConfig
from loadtest.datasets import (
    DatasetError,
    add_dataset_arguments,
    config_from_args,
    describe,
    load_tokenizer,
    sample_requests,
)
from loadtest.metrics import (
    METRICS,
    MetricsError,
    calculate_job_metrics,
    calculate_metrics,
    parse_goodput,
    parse_percentiles,
    percentile_key,
    tpot_s,
)
from loadtest.runner import run_jobs, run_streaming

BACKEND_ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def parse_rates(text: str) -> list[float]:
    """'1,2,inf' -> [1.0, 2.0, inf]."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected request rates separated by commas (inf for all at once), got {text!r}"
        ) from None
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be > 0, got {text!r}")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag; the names are `vllm bench serve`'s where the meaning is the same."""
    g = p.add_argument_group("server")
    g.add_argument("--backend", choices=sorted(BACKEND_ENDPOINTS), default="openai",
                   help="openai: /v1/completions; openai-chat: /v1/chat/completions")
    g.add_argument("--base-url", help="server URL, e.g. http://127.0.0.1:8000 (else --host/--port)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", choices=sorted(ENDPOINT_KINDS),
                   help="API path (default: the backend's)")
    g.add_argument("--model", help="model name to request (default: the server's first model)")
    g.add_argument("--served-model-name", help="name sent in requests when it differs from "
                                               "--model (--model then names the tokenizer)")
    g.add_argument("--tokenizer", help="tokenizer for building prompts: 'tiny', a local model "
                                       "folder or a hub id (default: --model)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as a bearer token (default: $OPENAI_API_KEY)")
    g.add_argument("--mode", choices=["stream", "jobs"], default="stream",
                   help="stream: streamed requests timed per chunk; jobs: background jobs "
                        "(POST /v1/jobs), polled to completion")
    g.add_argument("--poll-interval", type=float, default=0.25,
                   help="jobs mode: seconds between polls of each job")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request")
    g.add_argument("--num-warmups", type=int, default=0,
                   help="send the first N prompts once, untimed, before measuring (a cold "
                        "server's first requests are slow)")

    g = p.add_argument_group("dataset (made locally; no downloads)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0)
    add_dataset_arguments(g, default="random")

    g = p.add_argument_group("arrivals")
    g.add_argument("--request-rate", type=parse_rates, default=[math.inf], metavar="RATES",
                   help="requests per second, inf = all at once; a comma-separated list runs "
                        "one benchmark per rate (a sweep). Default inf")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps: 1 = Poisson, < 1 burstier, > 1 more even")
    g.add_argument("--max-concurrency", type=int,
                   help="at most this many requests in flight (arrivals wait for a slot)")
    g.add_argument("--burst-profile", type=_typed(BurstProfile.parse), metavar="IDLE:SPIKE:IDLE",
                   help="seconds idle, then every request within SPIKE seconds, then idle "
                        "(autoscaling: from nothing up and back); replaces --request-rate")

    g = p.add_argument_group("requests")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every reply is exactly its output length (default on)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--no-usage", dest="include_usage", action="store_false",
                   help="do not ask for usage (output tokens are then counted as chunks)")
    g.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                   help="fields merged into every request body, e.g. '{\"top_k\": 5}'")

    g = p.add_argument_group("metrics and results")
    g.add_argument("--metric-percentiles", type=_typed(parse_percentiles), default=[50.0, 90.0, 99.0],
                   metavar="LIST", help="percentiles to report (default 50,90,99)")
    g.add_argument("--percentile-metrics", type=_typed(parse_metric_names),
                   default=("ttft", "tpot", "itl", "e2el"), metavar="LIST",
                   help="latencies in the terminal summary (default ttft,tpot,itl,e2el); the "
                        "JSON always has all four")
    g.add_argument("--goodput", nargs="+", metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (names ttft, tpot, e2el)")
    g.add_argument("--save-result", action="store_true",
                   help="write JSON, PNG plots and an HTML report")
    g.add_argument("--result-dir", default="results/bench")
    g.add_argument("--result-filename",
                   help="JSON file name; the plots and HTML share its stem (default: "
                        "BACKEND-RATEqps-MODEL-TIME.json)")
    g.add_argument("--no-plots", action="store_true", help="with --save-result: JSON only")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    g.add_argument("--metadata", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra facts recorded in the JSON (e.g. gpu=H200)")


def _typed(parse: Any) -> Any:
    """An argparse type from a parser that raises ValueError, keeping its message."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def parse_metric_names(text: str) -> tuple[str, ...]:
    """'ttft,tpot' -> ('ttft', 'tpot'), checked against the metrics there are."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric {', '.join(bad) or repr(text)}; choose from "
                         f"{', '.join(METRICS)}")
    return names


def _json_object(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


class BenchError(Exception):
    """A benchmark that cannot start: no server, no model, a contradictory option."""


def _base_url(args: argparse.Namespace) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


def _first_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise BenchError(f"no --model given and {base_url}/v1/models named none "
                         f"({type(exc).__name__}: {exc})") from exc


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("sluice", "httpx", "numpy", "matplotlib", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _check(args: argparse.Namespace, endpoint: str) -> None:
    if args.dataset_name == "token-ids" and endpoint != "/v1/completions":
        raise BenchError("token-id prompts go to /v1/completions only (--backend openai)")
    if args.burst_profile is not None and len(args.request_rate) > 1:
        raise BenchError("--burst-profile sets its own rate; drop the --request-rate sweep")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError("--max-concurrency must be >= 1")
    if args.mode == "jobs" and args.goodput:
        raise BenchError("--goodput needs streamed requests (TTFT, TPOT); drop it or --mode jobs")


def run_one(args: argparse.Namespace, api: ApiConfig, samples: list[Any], rate: float,
            percentiles: list[float], slos: dict[str, float]) -> dict[str, Any]:
    """One run at one rate: the metrics and the per-request arrays the plots need."""
    n = len(samples)
    if args.burst_profile is not None:
        offsets = burst_offsets(n, args.burst_profile, args.burstiness, args.seed)
        rate = n / args.burst_profile.spike_s
        print(f"burst: idle {args.burst_profile.idle_before_s:g} s, {n} requests within "
              f"{args.burst_profile.spike_s:g} s, then idle {args.burst_profile.idle_after_s:g} s",
              flush=True)
    else:
        offsets = send_offsets(n, rate, args.burstiness, args.seed)
    desc = f"{rpt.rate_label(rate)} req/s"
    if args.mode == "jobs":
        jobs, duration = asyncio.run(run_jobs(samples, api, offsets, args.poll_interval,
                                              args.max_concurrency, args.timeout,
                                              args.disable_tqdm))
        run = calculate_job_metrics(jobs, duration, percentiles)
        run.update(start_times=[j.start_s for j in jobs],
                   turnarounds=[j.turnaround_s if j.success else None for j in jobs],
                   queue_times=[j.queue_time_s for j in jobs],
                   output_lens=[j.output_tokens for j in jobs],
                   input_lens=[j.prompt_len for j in jobs], errors=[j.error for j in jobs])
    else:
        outs, duration = asyncio.run(run_streaming(samples, api, offsets, args.max_concurrency,
                                                   args.timeout, args.disable_tqdm, desc))
        run = calculate_metrics(outs, duration, percentiles, slos).as_dict()
        run.update(start_times=[o.start_s for o in outs],
                   ttfts=[o.ttft_s if o.success else None for o in outs],
                   tpots=[tpot_s(o) if o.success else None for o in outs],
                   itls=[g for o in outs if o.success for g in o.itl_s],
                   e2els=[o.latency_s if o.success else None for o in outs],
                   output_lens=[o.output_tokens for o in outs],
                   input_lens=[o.prompt_len for o in outs], errors=[o.error for o in outs],
                   error_details=sorted({o.error_detail for o in outs if o.error})[:20])
    run.update(request_rate=rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency)
    if args.burst_profile is not None and args.burst_profile.idle_after_s > 0:
        print(f"idle for {args.burst_profile.idle_after_s:g} s", flush=True)
        time.sleep(args.burst_profile.idle_after_s)
    return run


def run(args: argparse.Namespace, command: str) -> int:
    base_url = _base_url(args)
    endpoint = args.endpoint or BACKEND_ENDPOINTS[args.backend]
    _check(args, endpoint)
    model = args.model or _first_model(base_url, args.api_key)
    percentiles = args.metric_percentiles
    slos = parse_goodput(args.goodput)
    tokenizer_name = args.tokenizer or model
    print(f"loading tokenizer {tokenizer_name!r} and building {args.num_prompts} "
          f"{args.dataset_name} prompts", flush=True)
    samples = sample_requests(config_from_args(args), load_tokenizer(tokenizer_name))
    sizes = describe(samples)
    print(f"dataset: {sizes['num_requests']} requests, mean {sizes['mean_input_len']:.1f} in / "
          f"{sizes['mean_output_len']:.1f} out tokens", flush=True)
    api = ApiConfig(base_url=base_url, endpoint=endpoint, model=args.served_model_name or model,
                    api_key=args.api_key, ignore_eos=args.ignore_eos,
                    temperature=args.temperature, include_usage=args.include_usage,
                    extra_body=args.extra_body)
    pkeys = [percentile_key(p) for p in percentiles]
    if args.num_warmups > 0:
        warm = samples[:args.num_warmups]
        print(f"warming up with {len(warm)} requests", flush=True)
        asyncio.run(run_streaming(warm, api, [0.0] * len(warm), args.max_concurrency,
                                  args.timeout, disable_progress=True))
    runs, summaries = [], []
    for rate in args.request_rate:
        result = run_one(args, api, samples, rate, percentiles, slos)
        runs.append(result)
        summaries.append(rpt.summary_text(result, args.mode, pkeys, args.percentile_metrics))
        print(summaries[-1], flush=True)
    if len(runs) > 1:
        summaries.insert(0, rpt.sweep_table(runs, args.mode))  # first in the HTML page
        print(summaries[0], flush=True)
    if args.save_result:
        _save(args, command, model, base_url, endpoint, sizes, runs, summaries, pkeys)
    return 0 if any(r["completed"] for r in runs) else 1


def _save(args: argparse.Namespace, command: str, model: str, base_url: str, endpoint: str,
          sizes: dict[str, Any], runs: list[dict[str, Any]], summaries: list[str],
          pkeys: list[str]) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    rates = "_".join(rpt.rate_label(r["request_rate"]) for r in runs)
    name = args.result_filename or (f"{args.backend}-{rates}qps-{Path(model).name}-"
                                    f"{now:%Y%m%d-%H%M%S}.json")
    path = Path(args.result_dir) / name
    stem = path.with_suffix("")
    config = {k: (v if not isinstance(v, BurstProfile) else vars(v)) for k, v in vars(args).items()
              if k not in ("api_key", "func")}
    report = {"title": f"{Path(model).name} at {base_url}{endpoint}", "date": now.isoformat(),
              "command": command, "mode": args.mode, "model": model, "base_url": base_url,
              "endpoint": endpoint, "config": config, "versions": _versions(),
              "metadata": dict(kv.partition("=")[::2] for kv in args.metadata),
              "dataset": sizes, "percentile_keys": pkeys, "runs": runs}
    written = [rpt.write_json(path, report)]
    if not args.no_plots:
        images = rpt.write_plots(report, stem)
        written += images
        written.append(rpt.write_html(report, images, stem.with_suffix(".html"), summaries))
    for p in written:
        print(f"wrote {p}")


def main(argv: list[str] | None = None, prog: str = "python -m loadtest.serve") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(args, prog, f"{prog} {shlex.join(argv)}")


def redact(command: str) -> str:
    """The command line with the API key's value replaced, fit for reports that get shared."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word == "--api-key" and i + 1 < len(words):
            words[i + 1] = "REDACTED"
        elif word.startswith("--api-key="):
            words[i] = "--api-key=REDACTED"
    return shlex.join(words)


def run_cli(args: argparse.Namespace, prog: str, command: str) -> int:
    """Runs the benchmark, turning a bad option or an unreachable server into one line."""
    from worker.engine.errors import ModelLoadError

    command = redact(command)
    # httpx logs every request at INFO: thousands of lines that would bury the summary.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return run(args, command)
    except (BenchError, DatasetError, ArrivalError, MetricsError, ModelLoadError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
