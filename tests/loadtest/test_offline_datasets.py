"""The offline engine benchmark driven by the serving benchmark's datasets."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import offline

SHIPPED = Path(offline.__file__).resolve().parents[1] / "worker" / "models" / "configs"


def test_sharegpt_synthetic_through_the_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    assert offline.main([
        "--model", str(tiny_model_dir), "--num-prompts", "6", "--dataset-name",
        "sharegpt-synthetic", "--sharegpt-output-len", "4", "--baseline", "none",
        "--repeats", "1", "--warmup-prompts", "2", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["dataset_name"] == "sharegpt-synthetic"
    assert report["workload"]["num_prompts"] == 6 and report["workload"]["output_tokens"] == 24
    # Heavy-tailed lengths, not the fixed --input-len of the built-in workload.
    assert report["workload"]["input_len_min_max"][0] != report["workload"]["input_len_min_max"][1]
    assert report["results"][0]["output_tokens"] == 24


def test_token_ids_need_no_tokenizer_and_text_datasets_say_so(tmp_path: Path) -> None:
    # A shipped config has no tokenizer files: token ids come from its vocabulary size.
    args = offline._parser().parse_args([
        "--model", "qwen3-0.6b", "--dataset-name", "token-ids", "--num-prompts", "3",
        "--input-len", "10", "--output-len", "5", "--random-range-ratio", "0.5"])
    prompts, out_lens = offline.dataset_workload(args, SHIPPED / "qwen3-0.6b", 151_936)
    assert len(prompts) == 3 and all(5 <= len(p) <= 15 and max(p) < 151_936 for p in prompts)
    assert all(2 <= n <= 8 for n in out_lens)  # floor(5 * 0.5) .. ceil(5 * 1.5), as vLLM
    args.dataset_name = "sharegpt-synthetic"
    try:
        offline.dataset_workload(args, SHIPPED / "qwen3-0.6b", 151_936)
    except SystemExit as exc:
        assert "--tokenizer" in str(exc)
    else:
        raise AssertionError("a text dataset without a tokenizer must stop")
