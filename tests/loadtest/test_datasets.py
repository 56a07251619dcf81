"""Benchmark datasets on the tiny model's tokenizer, and the arrival schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from loadtest.arrivals import ArrivalError, BurstProfile, burst_offsets, send_offsets
from loadtest.datasets import (
    SHAREGPT_MAX_PROMPT_LEN,
    SHAREGPT_MAX_TOTAL_LEN,
    DatasetConfig,
    DatasetError,
    TextTokenizer,
    describe,
    load_tokenizer,
    sample_requests,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> TextTokenizer:
    return load_tokenizer(str(tiny_model_dir))


def test_random_text_prompts_have_their_lengths(tok: TextTokenizer) -> None:
    cfg = DatasetConfig(num_prompts=40, random_input_len=48, random_output_len=12)
    samples = sample_requests(cfg, tok)
    assert all(isinstance(s.prompt, str) and s.expected_output_len == 12 for s in samples)
    # The reported length is what the text encodes to, and nearly always the target.
    assert all(s.prompt_len == len(tok.encode(s.prompt, add_special_tokens=False))
               for s in samples)
    assert sum(s.prompt_len == 48 for s in samples) >= 38
    assert all(abs(s.prompt_len - 48) <= 2 for s in samples)
    assert [s.prompt for s in sample_requests(cfg, tok)] == [s.prompt for s in samples]
    other = sample_requests(DatasetConfig(num_prompts=40, random_input_len=48,
                                          random_output_len=12, seed=1), tok)
    assert [s.prompt for s in other] != [s.prompt for s in samples]


def test_token_ids_ranges_and_shared_prefix(tok: TextTokenizer) -> None:
    cfg = DatasetConfig(dataset_name="token-ids", num_prompts=200, random_input_len=100,
                        random_output_len=20, random_range_ratio=0.5, random_prefix_len=7)
    samples = sample_requests(cfg, tok)
    special = set(tok.all_special_ids)
    for s in samples:
        assert isinstance(s.prompt, list) and len(s.prompt) == s.prompt_len
        assert 7 + 50 <= s.prompt_len <= 7 + 150 and 10 <= s.expected_output_len <= 30
        assert not special & set(s.prompt) and max(s.prompt) < tok.vocab_size
    assert len({tuple(s.prompt[:7]) for s in samples}) == 1  # the shared prefix
    assert len({s.prompt_len for s in samples}) > 20  # lengths really vary


def test_sharegpt_synthetic_lengths_follow_vllm_filter_and_means(tok: TextTokenizer) -> None:
    samples = sample_requests(DatasetConfig(dataset_name="sharegpt-synthetic",
                                            num_prompts=1500), tok)
    ins = np.array([s.prompt_len for s in samples])
    outs = np.array([s.expected_output_len for s in samples])
    assert ins.min() >= 4 and outs.min() >= 4
    assert ins.max() <= SHAREGPT_MAX_PROMPT_LEN + 2  # +2: re-encoding may miss by a token
    assert (ins + outs).max() <= SHAREGPT_MAX_TOTAL_LEN + 2
    assert abs(ins.mean() - 202) < 20 and abs(outs.mean() - 179) < 18
    # Heavy-tailed: the mean well above the median, a long tail past 3x the mean.
    assert np.median(ins) < 0.8 * ins.mean() and ins.max() > 3 * ins.mean()
    fixed = sample_requests(DatasetConfig(dataset_name="sharegpt-synthetic", num_prompts=5,
                                          sharegpt_output_len=33), tok)
    assert {s.expected_output_len for s in fixed} == {33}


def test_prefix_repetition_shares_prefixes(tok: TextTokenizer) -> None:
    cfg = DatasetConfig(dataset_name="prefix_repetition", num_prompts=12,
                        prefix_repetition_prefix_len=40, prefix_repetition_suffix_len=10,
                        prefix_repetition_num_prefixes=3, prefix_repetition_output_len=5)
    samples = sample_requests(cfg, tok)
    heads = [tok.encode(str(s.prompt), add_special_tokens=False)[:32] for s in samples]
    assert len({tuple(h) for h in heads}) == 3
    assert all(45 <= s.prompt_len <= 55 and s.expected_output_len == 5 for s in samples)


def test_sharegpt_file_jsonl_and_json(tok: TextTokenizer, tmp_path: Path) -> None:
    long_text = "the scheduler hands out tokens to every running request " * 3
    rows = [{"conversations": [{"from": "human", "value": long_text + str(i)},
                               {"from": "gpt", "value": long_text}]} for i in range(3)]
    rows.append({"conversations": [{"from": "human", "value": "hi"},  # too short: filtered
                                   {"from": "gpt", "value": long_text}]})
    rows.append({"id": "no conversation"})
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    as_list = tmp_path / "chats.json"
    as_list.write_text(json.dumps(rows))
    for path in (jsonl, as_list):
        samples = sample_requests(DatasetConfig(dataset_name="sharegpt", dataset_path=str(path),
                                                num_prompts=5), tok)
        assert len(samples) == 5  # 3 usable conversations, cycled
        assert {s.prompt for s in samples} == {long_text + str(i) for i in range(3)}
        assert all(s.expected_output_len == len(tok.encode(long_text, add_special_tokens=False))
                   for s in samples)
    describe(samples)


def test_dataset_errors_say_what_to_fix(tok: TextTokenizer, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-path"):
        sample_requests(DatasetConfig(dataset_name="sharegpt", num_prompts=2), tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DatasetError, match="neither a JSON list nor JSON lines"):
        sample_requests(DatasetConfig(dataset_name="sharegpt", dataset_path=str(bad)), tok)
    with pytest.raises(DatasetError, match="range_ratio"):
        sample_requests(DatasetConfig(random_range_ratio=1.5, num_prompts=2), tok)
    with pytest.raises(DatasetError, match="unknown dataset"):
        sample_requests(DatasetConfig(dataset_name="imagenet", num_prompts=2), tok)


def test_poisson_and_gamma_arrivals() -> None:
    assert send_offsets(4, math.inf) == [0.0] * 4
    offsets = send_offsets(4000, request_rate=20.0, burstiness=1.0, seed=3)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.06)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
    bursty = np.diff(send_offsets(4000, 20.0, burstiness=0.25, seed=3))
    assert bursty.mean() == pytest.approx(1 / 20, rel=0.15)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.15)  # CV 1/sqrt(shape)
    assert send_offsets(10, 5.0, seed=1) == send_offsets(10, 5.0, seed=1)
    for rate, shape in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ArrivalError):
            send_offsets(3, rate, shape)


def test_burst_profile() -> None:
    profile = BurstProfile.parse("2:3:4")
    assert profile == BurstProfile(2.0, 3.0, 4.0)
    offsets = burst_offsets(50, profile, seed=0)
    assert len(offsets) == 50 and offsets[0] == 2.0 and max(offsets) <= 5.0 + 1e-9
    for bad in ("1:2", "1:0:1", "-1:2:3", "a:b:c"):
        with pytest.raises(ArrivalError):
            BurstProfile.parse(bad)


@pytest.mark.parametrize("module", ["loadtest/datasets.py", "loadtest/offline.py"])
def test_runs_on_a_gpu_box_with_the_numeric_stack_only(module: str) -> None:
    # The offline benchmark and its datasets run where only torch, numpy, transformers and the
    # project's own engine are installed: no HTTP, Redis, pydantic or plotting libraries.
    import ast
    import sys

    tree = ast.parse((Path(__file__).resolve().parents[2] / module).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    allowed = {"torch", "numpy", "transformers", "tqdm", "worker", "loadtest", "__future__"}
    assert {n for n in names if n not in sys.stdlib_module_names} <= allowed
