"""The offline benchmark's roofline model, its flags, and one small end-to-end run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from loadtest import offline
from worker.models.config import ModelConfig
from worker.models.registry import SHIPPED_CONFIGS_DIR

LLAMA_8B = ModelConfig.from_dir(SHIPPED_CONFIGS_DIR / "llama-3.1-8b")
BF16 = 2


def test_llama_8b_1000_prompts_of_1k_in_128_out_ceiling_is_about_35_6_req_s() -> None:
    rl = offline.roofline(LLAMA_8B, BF16, [1024] * 1000, [128] * 1000, max_num_seqs=256)
    assert rl.requests_per_s == pytest.approx(35.6, rel=0.10)
    assert rl.batch == 256


def test_llama_8b_256_prompts_of_512_in_128_out_takes_about_3_85_s() -> None:
    rl = offline.roofline(LLAMA_8B, BF16, [512] * 256, [128] * 256, max_num_seqs=256)
    assert rl.roofline_s == pytest.approx(3.85, rel=0.10)
    # The parts add up, and at batch 256 the KV read is a large share of a decode step.
    assert rl.roofline_s == pytest.approx(rl.prefill_s + rl.decode_s)
    assert rl.avg_context == pytest.approx(512 + 127 / 2)


def test_small_batches_are_bound_by_streaming_the_weights() -> None:
    rl = offline.roofline(LLAMA_8B, BF16, [1] * 1, [100] * 1, max_num_seqs=256,
                          peak_bandwidth_tbs=4.0)
    weight_s = LLAMA_8B.num_params * BF16 / 4.0e12
    assert rl.decode_step_s == pytest.approx(weight_s, rel=0.01)


def test_baseline_lists_and_length_ranges_parse() -> None:
    assert offline.parse_baselines("hf,hf_batch") == ["hf", "hf_batch"]
    assert offline.parse_baselines("none") == []
    assert offline.parse_range("100:1024") == (100, 1024)
    for bad in ("hf,nope", "none,hf", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            offline.parse_baselines(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        offline.parse_range("1024:100")


def test_explicit_ranges_bound_the_lengths() -> None:
    prompts, out_lens = offline.make_workload(500, 128, 128, 0.0, 1000, seed=0,
                                              input_range=(100, 1024), output_range=(100, 1024))
    in_lens = [len(p) for p in prompts]
    assert 100 <= min(in_lens) < 120 and 1000 < max(in_lens) <= 1024
    assert 100 <= min(out_lens) < 120 and 1000 < max(out_lens) <= 1024
    # Without ranges the workload is the one earlier versions drew from the same seed.
    a = offline.make_workload(4, 16, 8, 0.5, 1000, seed=3)
    b = offline.make_workload(4, 16, 8, 0.5, 1000, 3, None, None)
    assert a == b


@pytest.mark.slow
def test_every_runner_and_the_roofline_reach_the_report(tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    # Unequal output lengths take generate_batch's per-request path.
    assert offline.main([
        "--model", str(tiny_model_dir), "--num-prompts", "4", "--input-len", "12",
        "--output-len", "6", "--output-len-range", "3:8", "--baseline", "hf,hf_batch",
        "--repeats", "1", "--roofline", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["sluice", "hf_generate", "hf_generate_batch"]
    expected = report["workload"]["output_tokens"]
    assert all(r["output_tokens"] == expected for r in report["results"])
    assert set(report["speedups"]) == {"hf_generate", "hf_generate_batch"}
    assert report["speedup_vs_hf_generate_batch"] > 0
    assert 0 < report["roofline"]["fraction_of_roofline"] < 1
    assert report["versions"]["transformers"]
    assert "per-request" in report["runners"]["hf_generate_batch"]
