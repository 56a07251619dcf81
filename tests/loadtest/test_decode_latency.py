"""The decode-latency benchmark end to end on the tiny model, with small lengths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtest import decode_latency


def test_report_has_sane_latencies_for_each_batch_size(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    assert decode_latency.main([
        "--model", str(tiny_model_dir), "--input-len", "8", "--output-len", "6",
        "--warmup", "1", "--batch-size", "1,3", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] and report["versions"]["torch"]
    model = report["model"]
    assert 0 < model["streamed_weight_bytes"] <= model["weight_bytes"]
    assert [r["batch_size"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        # Prompts fit one step: TTFT is that step, and each later step is one token.
        assert r["ttft_steps"] == 1
        assert r["num_itl_samples"] == 5
        assert len(r["step_ms"]) == 6
        assert r["ttft_ms"] == pytest.approx(r["step_ms"][0])
        assert 0 < r["itl_min_ms"] <= r["itl_median_ms"] <= r["itl_p99_ms"] <= r["itl_max_ms"]
        assert r["itl_median_ms"] <= r["itl_p90_ms"] <= r["itl_p99_ms"]
        assert 0 < r["floor_ms"] <= r["floor_with_kv_ms"]
        assert r["median_over_floor"] == pytest.approx(r["itl_median_ms"] / r["floor_ms"])
        assert math.isfinite(r["output_tokens_per_s"]) and r["output_tokens_per_s"] > 0


def test_ttft_waits_for_every_request_and_itl_follows() -> None:
    steps = [(0.5, 1), (0.25, 2), (0.125, 3), (0.125, 3)]  # a prefill spread over two steps
    ttft, n, itl = decode_latency.split_ttft(steps, batch_size=3)
    assert (ttft, n, itl) == (0.75, 2, [0.125, 0.125])


def test_bad_batch_sizes_are_rejected() -> None:
    assert decode_latency.parse_batch_sizes("1,8,64") == [1, 8, 64]
    with pytest.raises(SystemExit):
        decode_latency.main(["--batch-size", "0"])
