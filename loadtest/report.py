"""What a benchmark leaves behind: a terminal summary, JSON, PNG plots and one HTML page.

The JSON holds the full configuration, versions, the dataset's sizes and, per run (one per
request rate), every metric under vLLM's result keys plus the per-request arrays the plots
are drawn from. The HTML page embeds the plots as base64, so it is one file to pass around.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

# The per-request arrays of a run (seconds), their titles and units on the plots.
STREAM_CDFS = (("ttfts", "Time to first token"), ("tpots", "Time per output token"),
               ("itls", "Inter-token latency"), ("e2els", "End-to-end latency"))
JOB_CDFS = (("turnarounds", "Job turnaround (submit to seen done)"),
            ("queue_times", "Job queue time"))
STREAM_VS_RATE = (("ttft", "Time to first token"), ("tpot", "Time per output token"))
JOB_VS_RATE = (("turnaround", "Job turnaround"),)
LINE = 50


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


# -- terminal -------------------------------------------------------------------------------


def summary_text(run: dict[str, Any], mode: str, percentiles: list[str],
                 shown: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")) -> str:
    """vLLM's result block for one run; `shown` picks the streamed latencies it lists."""
    rows: list[tuple[str, Any]] = [
        ("Request rate (req/s)", rate_label(run["request_rate"])),
        ("Successful requests", run["completed"]), ("Failed requests", run["failed"]),
        ("Benchmark duration (s)", run["duration"]),
        ("Total input tokens", run["total_input_tokens"]),
        ("Total generated tokens", run["total_output_tokens"]),
        ("Request throughput (req/s)", run["request_throughput"]),
        ("Output token throughput (tok/s)", run["output_throughput"])]
    if mode == "stream":
        rows.append(("Total token throughput (tok/s)", run["total_token_throughput"]))
        rows.append(("Peak concurrent requests", run["max_concurrent_requests"]))
        if run["request_goodput"] is not None:
            rows.append(("Request goodput (req/s)", run["request_goodput"]))
    lines = [" Serving Benchmark Result ".center(LINE, "=")]
    lines += [_row(k, v) for k, v in rows]
    for reason, count in sorted(run["failures_by_reason"].items()):
        lines.append(_row(f"  failed: {reason}", count))
    metrics = ([("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token "
                "(excl. 1st token)", "TPOT"), ("itl", "Inter-token Latency", "ITL"),
                ("e2el", "End-to-end Latency", "E2EL")] if mode == "stream" else
               [("submit", "Job Submit", "submit"), ("turnaround", "Job Turnaround",
                "turnaround"), ("queue_time", "Job Queue Time", "queue")])
    for key, title, short in metrics:
        if mode == "stream" and key not in shown:
            continue
        lines.append(title.center(LINE, "-"))
        lines.append(_row(f"Mean {short} (ms)", run[f"mean_{key}_ms"]))
        lines.append(_row(f"Median {short} (ms)", run[f"median_{key}_ms"]))
        lines += [_row(f"{p.upper()} {short} (ms)", run[f"{p}_{key}_ms"])
                  for p in percentiles if p != "p50"]  # p50 is the median, just above
        if key == "queue_time":  # how it was measured: the view's times or the polls
            lines.append(_row("Queue times from", ", ".join(
                f"{src} {n}" for src, n in sorted(run.get("queue_time_sources", {}).items()))
                or None))
    lines.append("=" * LINE)
    return "\n".join(lines)


def sweep_table(runs: list[dict[str, Any]], mode: str) -> str:
    """One line per request rate, for a sweep."""
    cols = [("ok", "completed"), ("fail", "failed"), ("req/s", "request_throughput"),
            ("out tok/s", "output_throughput")]
    if mode == "stream":
        cols += [("TTFT p50", "median_ttft_ms"), ("TTFT p99", "p99_ttft_ms"),
                 ("TPOT p50", "median_tpot_ms"), ("ITL p99", "p99_itl_ms"),
                 ("goodput", "request_goodput")]
    else:
        cols += [("turn p50", "median_turnaround_ms"), ("turn p99", "p99_turnaround_ms"),
                 ("queue p50", "median_queue_time_ms"), ("queue p99", "p99_queue_time_ms")]
    lines = [f"{'rate':>11}" + "".join(f"{name:>11}" for name, _ in cols)]
    for run in runs:
        lines.append(f"{rate_label(run['request_rate']):>11}"
                     + "".join(f"{_fmt(run.get(key)):>11}" for _, key in cols))
    return "\n".join(lines) + ("\n(latencies in ms)" if runs else "")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _row(name: str, value: Any) -> str:
    return f"{name + ':':<40}{_fmt(value):>10}"


# -- files ----------------------------------------------------------------------------------


def write_json(path: Path, report: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(report), indent=2, default=str))
    return path


def _plain(obj: Any) -> Any:
    """Strict JSON: an infinite rate becomes the string "inf" (JSON has no Infinity)."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def write_plots(report: dict[str, Any], stem: Path) -> list[Path]:
    """PNG files next to `stem`: latency CDFs, throughput and latency against request rate, and
    requests in flight over time."""
    import matplotlib

    matplotlib.use("Agg")
    runs, mode = report["runs"], report["mode"]
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [_plot_cdfs(runs, STREAM_CDFS if mode == "stream" else JOB_CDFS,
                        stem.with_name(stem.name + "_latency_cdf.png"))]
    paths.append(_plot_throughput(runs, stem.with_name(stem.name + "_throughput_vs_rate.png")))
    paths.append(_plot_latency_vs_rate(runs, STREAM_VS_RATE if mode == "stream" else JOB_VS_RATE,
                                       report["percentile_keys"],
                                       stem.with_name(stem.name + "_latency_vs_rate.png")))
    paths.append(_plot_in_flight(runs, report["config"].get("burst_profile"),
                                 stem.with_name(stem.name + "_in_flight.png")))
    return paths


def _legend(run: dict[str, Any]) -> str:
    return f"{rate_label(run['request_rate'])} req/s"


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_cdfs(runs: list[dict[str, Any]], metrics: tuple[tuple[str, str], ...], path: Path
               ) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    cols = 2
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 4 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, metrics, strict=False):
        for run in runs:
            ms = np.sort(np.asarray([v for v in run[key] if v is not None], dtype=float)) * 1e3
            if len(ms):
                ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=_legend(run))
        ax.set_title(f"{title}: CDF")
        ax.set_xlabel(f"{title.split(' (')[0].lower()} (ms)")
        ax.set_ylabel("fraction of gaps" if key == "itls" else "fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="request rate", fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    return _save(fig, path)


def _rate_axis(ax: Any, runs: list[dict[str, Any]]) -> list[float]:
    """x positions for the runs' request rates: the rates themselves, or evenly spaced
    categories when one of them is inf (which has no place on a numeric axis)."""
    rates = [r["request_rate"] for r in runs]
    if any(math.isinf(x) for x in rates) or len(rates) == 1:
        xs = [float(i) for i in range(len(rates))]
        ax.set_xticks(xs, [rate_label(x) for x in rates])
        ax.set_xlim(-0.5, len(rates) - 0.5)
    else:
        xs = rates
    ax.set_xlabel("offered request rate (req/s)")
    ax.grid(alpha=0.3)
    return xs


def _plot_throughput(runs: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = _rate_axis(left, runs)
    left.plot(xs, [r["request_throughput"] for r in runs], "o-", label="completed")
    if any(r.get("request_goodput") is not None for r in runs):
        slos = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in runs[0]["goodput_slos_ms"].items())
        left.plot(xs, [r.get("request_goodput") or 0.0 for r in runs], "s--",
                  label=f"goodput ({slos})")
    left.set_ylabel("request throughput (req/s)")
    left.set_title("Request throughput vs offered rate")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    _rate_axis(right, runs)
    right.plot(xs, [r["output_throughput"] for r in runs], "o-", color="tab:green",
               label="output tokens")
    if all("total_token_throughput" in r for r in runs):
        right.plot(xs, [r["total_token_throughput"] for r in runs], "s--", color="tab:olive",
                   label="prompt + output tokens")
    right.set_ylabel("token throughput (tok/s)")
    right.set_title("Token throughput vs offered rate")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    return _save(fig, path)


def _plot_latency_vs_rate(runs: list[dict[str, Any]], metrics: tuple[tuple[str, str], ...],
                          percentile_keys: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, (key, title) in zip(axes.flat, metrics, strict=True):
        xs = _rate_axis(ax, runs)
        ax.plot(xs, [r[f"mean_{key}_ms"] for r in runs], "o-", label="mean")
        for p in percentile_keys:
            ax.plot(xs, [r[f"{p}_{key}_ms"] for r in runs], ".--", label=p)
        ax.set_ylabel(f"{title.lower()} (ms)")
        ax.set_title(f"{title} vs offered rate")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_in_flight(runs: list[dict[str, Any]], burst: dict[str, float] | None, path: Path
                    ) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(11, 3.8))
    for run in runs:
        ends = run.get("e2els") or run.get("turnarounds") or []
        events = sorted([(s, 1) for s in run["start_times"]]
                        + [(s + (e or 0.0), -1) for s, e in zip(run["start_times"], ends,
                                                                strict=False)])
        xs, ys, level = [0.0], [0], 0
        for t, step in events:
            xs.append(t)
            ys.append(level)
            level += step
            xs.append(t)
            ys.append(level)
        ax.plot(xs, ys, label=_legend(run))
    if burst:
        spike_end = burst["idle_before_s"] + burst["spike_s"]
        ax.axvspan(burst["idle_before_s"], spike_end, color="tab:orange", alpha=0.12,
                   label="spike window (arrivals)")
        ax.set_xlim(0, max(ax.get_xlim()[1], spike_end + burst["idle_after_s"]))
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("requests in flight")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Requests in flight over time (from the client's timelines)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(title="request rate", fontsize=8)
    return _save(fig, path)


def write_html(report: dict[str, Any], images: list[Path], path: Path,
               summaries: list[str]) -> Path:
    """One self-contained page: configuration, summaries, the plots inlined."""
    cfg_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in report["config"].items())
    ver_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in report["versions"].items())
    data_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                        for k, v in report["dataset"].items())
    figures = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in images)
    blocks = "".join(f"<pre>{html.escape(s)}</pre>" for s in summaries)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sluice benchmark: {html.escape(report['title'])}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px}}th,td{{border:1px solid #ccc;padding:2px 8px;
text-align:left}}img{{max-width:100%}}pre{{background:#f6f6f6;padding:8px;font-size:13px}}
details{{margin:1em 0}}</style></head><body>
<h1>Serving benchmark: {html.escape(report['title'])}</h1>
<p>{html.escape(report['date'])} &middot; {html.escape(report['command'])}</p>
<h2>Results</h2>{blocks}
<h2>Plots</h2>{figures}
<h2>Dataset</h2><table>{data_rows}</table>
<details><summary>Configuration</summary><table>{cfg_rows}</table></details>
<details><summary>Versions</summary><table>{ver_rows}</table></details>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
