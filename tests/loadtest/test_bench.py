"""`sluice bench` against `sluice up` on the CPU, both run as real processes: the reports it
writes, read back and checked against what the service and the official client say."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from loadtest import serve
from shared.redis_server import free_port

API_KEY = "sk-bench-test"


@dataclass
class Up:
    base_url: str
    model_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Up]:
    data = tmp_path_factory.mktemp("up")
    port = free_port()
    log = data / "up.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "up", "--port", str(port), "--data-dir",
             str(data / "data"), "--api-key", API_KEY, "--model", str(tiny_model_dir),
             "--device", "cpu"], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    svc = Up(f"http://127.0.0.1:{port}", tiny_model_dir, proc, log)
    try:
        deadline = time.monotonic() + 180
        while "Sluice is up" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("sluice up did not start:\n" + log.read_text(errors="replace")[-4000:])
            time.sleep(0.3)
        yield svc
    finally:
        # SIGTERM makes `sluice up` stop its gateway, worker and Redis in order.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def bench(up: Up, out_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", "bench", "--base-url", up.base_url, "--api-key",
         API_KEY, "--tokenizer", str(up.model_dir), "--result-dir", str(out_dir),
         "--disable-tqdm", "--save-result", *args],
        capture_output=True, text=True, timeout=300)


def test_streaming_sweep_writes_reports_that_agree_with_the_service(up: Up, tmp_path: Path
                                                                    ) -> None:
    proc = bench(up, tmp_path, "--dataset-name", "random", "--random-input-len", "32",
                 "--random-output-len", "8", "--num-prompts", "20", "--request-rate", "40,inf",
                 "--goodput", "ttft:60000", "--result-filename", "smoke.json",
                 "--num-warmups", "2", "--percentile-metrics", "ttft,tpot")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Serving Benchmark Result" in proc.stdout and "Mean TTFT (ms)" in proc.stdout
    assert "warming up with 2 requests" in proc.stdout and "Mean ITL" not in proc.stdout
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["model"] == "tiny"  # asked of /v1/models: no --model given
    assert report["config"]["num_prompts"] == 20 and "api_key" not in report["config"]
    assert API_KEY not in (tmp_path / "smoke.json").read_text()
    assert "--api-key REDACTED" in report["command"]
    assert report["versions"]["httpx"] and report["dataset"]["total_input_tokens"] == 20 * 32
    assert [r["request_rate"] for r in report["runs"]] == [40.0, "inf"]
    for run in report["runs"]:
        assert (run["completed"], run["failed"]) == (20, 0), run["failures_by_reason"]
        # ignore_eos and usage: every reply is exactly its 8 tokens, counted by the server.
        assert run["output_lens"] == [8] * 20 and run["total_output_tokens"] == 160
        # One gap per chunk after the first, as vLLM times them: at most one per later token
        # (a worker that falls behind sends several steps' tokens in one chunk).
        assert 0 < len(run["itls"]) <= 20 * 7
        assert 0 < run["median_ttft_ms"] <= run["p99_ttft_ms"] <= run["median_e2el_ms"] * 20
        assert run["mean_tpot_ms"] > 0 and run["good_requests"] == 20
        assert run["request_throughput"] == pytest.approx(20 / run["duration"])
    for suffix in ("_latency_cdf", "_throughput_vs_rate", "_latency_vs_rate", "_in_flight"):
        png = (tmp_path / f"smoke{suffix}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    page = (tmp_path / "smoke.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Time to First Token" in page
    assert API_KEY not in page

    # The official client sees the same model and reply length the benchmark recorded.
    client = openai.OpenAI(base_url=f"{up.base_url}/v1", api_key=API_KEY, max_retries=0)
    reply = client.completions.create(model="tiny", prompt="The queue", max_tokens=8,
                                      extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_chat_jobs_and_failures_are_reported(up: Up, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # In this process this time (python -m loadtest.serve's entry point): no start-up to pay.
    common = ["--base-url", up.base_url, "--model", "tiny", "--tokenizer", str(up.model_dir),
              "--disable-tqdm", "--result-dir", str(tmp_path)]
    assert serve.main([*common, "--api-key", API_KEY, "--mode", "jobs", "--backend",
                       "openai-chat", "--dataset-name", "sharegpt-synthetic",
                       "--sharegpt-output-len", "4", "--num-prompts", "4", "--poll-interval",
                       "0.1", "--save-result", "--no-plots", "--result-filename",
                       "jobs.json"]) == 0
    run = json.loads((tmp_path / "jobs.json").read_text())["runs"][0]
    assert (run["completed"], run["failed"]) == (4, 0) and run["total_output_tokens"] == 16
    assert 0 < run["median_submit_ms"] <= run["median_turnaround_ms"]
    # Sluice's job view gives created_at and started_at: every job's queue time comes from them,
    # on one machine's clock, so none is negative, and none outlasts the job.
    assert run["queue_time_sources"] == {"server": 4}
    assert all(0 <= q <= t for q, t in zip(run["queue_times"], run["turnarounds"], strict=True))
    assert 0 <= run["median_queue_time_ms"] <= run["p99_queue_time_ms"]
    assert "Queue times from:" in capsys.readouterr().out

    # Streamed chat with shared prefixes.
    assert serve.main([*common, "--api-key", API_KEY, "--backend", "openai-chat",
                       "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len",
                       "32", "--prefix-repetition-suffix-len", "8",
                       "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len",
                       "4", "--num-prompts", "4", "--save-result", "--no-plots",
                       "--result-filename", "chat.json"]) == 0
    run = json.loads((tmp_path / "chat.json").read_text())["runs"][0]
    assert (run["completed"], run["total_output_tokens"]) == (4, 16)
    # Each stream opens with a role-only chunk, timed as vLLM times it: up to 4 gaps a request.
    assert 4 <= len(run["itls"]) <= 16

    # A wrong key: every request fails with the server's status, counted by reason.
    capsys.readouterr()
    assert serve.main([*common, "--api-key", "bad", "--num-prompts", "3", "--random-input-len",
                       "8", "--random-output-len", "2"]) == 1
    assert "failed: http_401" in capsys.readouterr().out

    # Options that contradict each other stop before anything is sent.
    assert serve.main([*common, "--dataset-name", "token-ids", "--backend", "openai-chat"]) == 2
    assert "/v1/completions only" in capsys.readouterr().err

    with httpx.Client() as c:  # the service survived all of it
        assert c.get(f"{up.base_url}/health").status_code == 200
