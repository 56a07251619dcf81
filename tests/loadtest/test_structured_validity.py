"""The structured-output benchmark runs end to end on a small budget and reports every figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loadtest.structured_validity import load_schemas, main, synthetic_tokenizer


def test_schema_set_is_large_and_varied() -> None:
    schemas = load_schemas()
    assert len(schemas) >= 50 and len({s["name"] for s in schemas}) == len(schemas)
    text = json.dumps(schemas)
    for keyword in ('"enum"', '"anyOf"', '"maxItems"', '"required"', '"format"', '"$ref"'):
        assert keyword in text


def test_synthetic_tokenizer_has_the_asked_size() -> None:
    assert synthetic_tokenizer(5000, [b"hello"]).vocab_size == 5000


def test_synthetic_tokenizer_puts_eos_at_the_model_ids() -> None:
    tok = synthetic_tokenizer(5000, [], eos=(4999, 17, 3000))
    assert tok.vocab_size == 5000 and tok.eos_token == 17
    for i in (17, 3000, 4999):
        assert tok.is_special_token(i)
    assert not tok.is_special_token(18) and tok.decode_bytes([300]) != b""


def test_benchmark_reports_validity_mask_cost_and_mixed_batch(tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    assert main(["--model", str(tiny_model_dir), "--samples", "1", "--max-tokens", "24",
                 "--vocab", "4096", "--mask-steps", "3", "--batch", "4", "--block-steps", "2",
                 "--blocks", "3", "--max-len", "8", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    v = report["validity"]
    assert v["num_unsupported"] >= 5 and all(v["unsupported"].values())
    assert v["num_valid"] == v["num_stopped"]  # every output that ended is valid
    assert [c["batch"] for c in report["mask_cost"]] == [1, 64]
    m = report["mixed"]
    assert m["cpu_ratio_vs_stand-in"] > 0 and m["wall_ratio_vs_free"] > 0
    assert len(m["block_ratios_vs_stand-in"]) == 3 and m["mean_constrained_len"] > 0


def test_benchmark_runs_a_model_without_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    """As for a shipped config with --load-format dummy: no validity part, and the grammars
    are built on a synthetic vocabulary of the model's size."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare / "config.json")
    out = tmp_path / "structured.json"
    assert main(["--model", str(bare), "--load-format", "dummy", "--dtype", "float32",
                 "--vocab", "4096", "--mask-steps", "3", "--batch", "4", "--block-steps", "2",
                 "--blocks", "3", "--max-len", "8", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "validity" not in report and report["device"] == "cpu"
    assert report["mixed"]["mean_constrained_len"] > 0
