"""The gateway-overhead benchmark on tiny sizes, and the null engine core it uses."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest import gateway_overhead
from worker.core_process import Abort, AddRequest, Ready, Shutdown, StepResult, StopCompletion
from worker.engine.sampling_params import SamplingParams
from worker.null_core import NullCore, run_null_core


def _ordered(s: dict[str, float]) -> bool:
    return 0 <= s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # reaped by nobody yet, but not running


def test_latency_mode_reports_both_sides(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    n, out_len = 4, 6
    assert gateway_overhead.main([
        "--mode", "latency", "--model", str(tiny_model_dir), "--device", "cpu",
        "--num-prompts", str(n), "--input-len", "8", "--output-len", str(out_len),
        "--concurrency", "2", "--warmup-prompts", "2", "--repeats", "2", "--no-redis-aof",
        "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] and report["versions"]["torch"] and report["versions"]["redis"]
    lat = report["latency"]
    assert lat["problems"] == []
    assert lat["workload"]["num_prompts"] == n and lat["workload"]["repeats"] == 2
    for side in ("direct", "service"):
        pooled = lat["pooled"][side]
        assert pooled["num_requests"] == 2 * n
        assert pooled["output_tokens"] == 2 * n * out_len
        assert pooled["ttft_ms"]["n"] == 2 * n
        assert pooled["itl_ms"]["n"] == 2 * n * (out_len - 1)
        assert pooled["ttft_ms"]["min"] > 0 and _ordered(pooled["ttft_ms"])
        assert _ordered(pooled["itl_ms"])
        median = lat["median_of_passes"][side]
        assert median["ttft_ms"]["p50"] <= median["ttft_ms"]["p99"]
        assert median["itl_ms"]["p50"] <= median["itl_ms"]["p99"]
        for p in lat["passes"]:
            assert p[side]["output_tokens"] == n * out_len
            assert p[side]["ttft_ms"]["n"] == n
    for q in ("p50", "p99"):
        for metric in ("ttft", "itl"):
            m = lat["median_of_passes"]
            assert lat["delta_ms"][f"{metric}_{q}"] == pytest.approx(
                m["service"][f"{metric}_ms"][q] - m["direct"][f"{metric}_ms"][q])
            in_pass = [p["service"][f"{metric}_ms"][q] - p["direct"][f"{metric}_ms"][q]
                       for p in lat["passes"]]
            assert lat["delta_ms_paired"][f"{metric}_{q}"] == pytest.approx(
                float(np.median(in_pass)))
    trace = lat["trace"]
    assert trace["requests_traced"] == n
    assert trace["token_delivery_ms"]["n"] == n * out_len
    assert trace["itl_at_publish_ms"]["n"] == n * (out_len - 1)
    assert trace["ttft_worker_ms"]["min"] > 0
    # Every process the benchmark started is gone.
    assert lat["pids"] and all(_gone(pid) for pid in lat["pids"].values())


def test_bus_mode_delivers_every_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bus.json"
    n, out_len = 6, 10
    assert gateway_overhead.main([
        "--mode", "bus", "--model", str(tiny_model_dir), "--num-prompts", str(n),
        "--input-len", "4", "--output-len", str(out_len), "--null-step-ms", "1",
        "--no-redis-aof", "--output-json", str(out)]) == 0
    bus = json.loads(out.read_text())["bus"]
    assert bus["problems"] == []
    assert [r["path"] for r in bus["runs"]] == ["redis", "gateway"]
    for r in bus["runs"]:
        assert r["tokens"] == n * out_len
        assert r["offered_tokens_per_s"] == pytest.approx(n / 1e-3)
        assert r["tokens_per_s"] > 0 and r["itl_ms"]["n"] == n * (out_len - 1)
        assert _ordered(r["itl_ms"])
    assert bus["pids"] and all(_gone(pid) for pid in bus["pids"].values())


def test_sizes_default_per_mode_and_bad_steps_are_refused() -> None:
    args = gateway_overhead._parser().parse_args(["--num-prompts", "7"])
    assert gateway_overhead.resolve_sizes(args, gateway_overhead.LATENCY_DEFAULTS) == {
        "num_prompts": 7, "input_len": 32, "output_len": 64, "concurrency": 8}
    assert gateway_overhead.resolve_sizes(args, gateway_overhead.BUS_DEFAULTS)["output_len"] == 512
    assert gateway_overhead.parse_ms_list("5,2,0.5") == [5.0, 2.0, 0.5]
    with pytest.raises(SystemExit):
        gateway_overhead.main(["--null-step-ms", "-1"])


def test_paired_deltas_take_the_median_of_differences_within_passes() -> None:
    def side(ttft_p50: float) -> dict[str, dict[str, float]]:
        q = {"p50": ttft_p50, "p90": ttft_p50, "p99": ttft_p50, "mean": ttft_p50}
        return {"ttft_ms": q, "itl_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0}}

    # The host drifts between passes: the two sides' medians (10 and 12) differ by 2, while
    # within a pass the service is 1, 2 and 1 behind.
    passes = [{"direct": side(d), "service": side(d + k)}
              for d, k in ((3.0, 1.0), (10.0, 2.0), (12.0, 1.0))]
    paired = gateway_overhead._paired_deltas(passes)
    assert paired["ttft_p50"] == 1.0 and paired["itl_p99"] == 0.0
    assert gateway_overhead._paired_deltas([]) == {}


def test_rates_and_summaries() -> None:
    s = gateway_overhead.Stream(submit=0.0, token_times=[1.0, 1.5, 2.5])
    assert s.ttft == 1.0 and s.gaps == [0.5, 1.0]
    summary = gateway_overhead.summarize(s.gaps)
    assert summary["n"] == 2 and summary["min"] == 500.0 and summary["max"] == 1000.0
    rates = gateway_overhead.delivery_rates([s])
    assert rates["tokens"] == 3 and rates["tokens_per_s"] == pytest.approx(3 / 2.5)
    assert gateway_overhead.check_streams([s], 3, "x") == []
    assert gateway_overhead.check_streams([s], 4, "x")


# -- the null engine core ---------------------------------------------------------------------


def _add(rid: str, max_tokens: int | None, n: int = 1, prompt_len: int = 3) -> AddRequest:
    return AddRequest(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens,
                                                                          n=n))


def test_null_core_gives_one_token_per_step_until_max_tokens() -> None:
    core = NullCore(max_num_seqs=2, max_model_len=16, vocab_size=100, token_id=65)
    assert core.add(_add("a", 2)) is None
    assert core.add(_add("b", 3, n=2)) is None
    assert core.add(_add("c", None, prompt_len=14)) is None  # waits: max_num_seqs is 2
    assert core.add(_add("a", 1)) is not None  # duplicate id
    assert core.add(_add("d", 3, prompt_len=16)) is not None  # no room in the context
    first = core.step()
    assert [(o.request_id, o.index, o.new_token_ids) for o in first] == [
        ("a", 0, [65]), ("b", 0, [65]), ("b", 1, [65])]
    assert core.stats().num_running == 2 and core.stats().num_waiting == 1
    second = core.step()
    assert [o.finish_reason for o in second] == ["length", None, None]
    core.stop_completion("b", 1)  # a stop string, found by the front
    third = core.step()  # c joins now that a left
    assert [(o.request_id, o.index, o.finish_reason) for o in third] == [
        ("b", 0, "length"), ("c", 0, None)]
    aborted = core.abort(["c", "unknown"])
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in aborted] == [
        ("c", "abort", [])]
    assert not core.has_unfinished()


def test_null_core_speaks_the_core_process_protocol() -> None:
    commands: Any = queue.Queue()
    results: Any = queue.Queue()
    thread = threading.Thread(target=run_null_core, args=(
        {"config": {"max_num_seqs": 8, "max_model_len": 64}, "vocab_size": 100,
         "null_step_s": 0.001}, commands, results), daemon=True)
    thread.start()
    ready = results.get(timeout=10)
    assert isinstance(ready, Ready) and ready.max_model_len == 64 and ready.vocab_size == 100
    commands.put(_add("x", 4))
    commands.put(_add("y", 50))
    tokens: dict[str, int] = {"x": 0, "y": 0}
    finished: dict[str, str] = {}
    while "x" not in finished:
        item = results.get(timeout=10)
        assert isinstance(item, StepResult) and item.step_s >= 0
        for o in item.outputs:
            tokens[o.request_id] += len(o.new_token_ids)
            if o.finish_reason:
                finished[o.request_id] = o.finish_reason
    assert tokens["x"] == 4 and finished["x"] == "length"
    commands.put(StopCompletion("nobody", 0, "stop"))
    commands.put(Abort(["y"]))
    while "y" not in finished:
        for o in results.get(timeout=10).outputs:
            if o.finish_reason:
                finished[o.request_id] = o.finish_reason
    assert finished["y"] == "abort"
    commands.put(_add("z", 1, prompt_len=64))  # rejected: the prompt fills the context
    item = results.get(timeout=10)
    assert [r.request_id for r in item.rejected] == ["z"]
    commands.put(Shutdown())
    thread.join(timeout=10)
    assert not thread.is_alive()
