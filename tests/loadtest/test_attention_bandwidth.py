"""The attention-bandwidth microbenchmark on the CPU: tiny shapes, both backends."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from loadtest import attention_bandwidth as ab


def test_torch_backend_reports_bandwidth_for_each_shape(tmp_path: Path) -> None:
    out = tmp_path / "attn.json"
    assert ab.main(["--backend", "torch", "--shapes", "2x64,3x40", "--iters", "2",
                    "--warmup-iters", "1", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["geometry"]["num_q_heads"] == 32 and report["geometry"]["head_dim"] == 128
    assert [(r["batch"], r["context"]) for r in report["results"]] == [(2, 64), (3, 40)]
    for r in report["results"]:
        assert r["iters"] == 2 and 0 < r["min_us"] <= r["median_us"]
        assert r["bytes_moved"] == ab.bytes_moved(r["batch"], r["context"], ab.Geometry(
            32, 8, 128, 16, torch.bfloat16))
        assert r["gb_per_s"] == pytest.approx(r["bytes_moved"] / r["median_us"] / 1e3)
        assert r["fraction_of_peak"] == pytest.approx(r["gb_per_s"] / 4260)
        assert r["max_abs_err"] is None


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the triton kernels need a GPU or the interpreter")
def test_triton_backend_matches_the_torch_backend(tmp_path: Path) -> None:
    out = tmp_path / "attn.json"
    assert ab.main(["--backend", "triton", "--shapes", "2x40", "--iters", "1",
                    "--warmup-iters", "1", "--dtype", "float32", "--num-q-heads", "4",
                    "--num-kv-heads", "2", "--head-dim", "32", "--output-json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-4


def test_the_batch_uses_exactly_its_blocks_once_each() -> None:
    geom = ab.Geometry(4, 2, 16, 16, torch.float32)
    b = ab.make_batch(3, 40, geom, torch.device("cpu"))  # 3 blocks per sequence, last partial
    assert b.kv_cache.shape == (2, 9, 16, 2, 16)
    assert sorted(b.block_table.flatten().tolist()) == list(range(9))
    assert b.block_table.dtype == b.seq_lens.dtype == b.query_start_loc.dtype == torch.int32
    assert b.query_start_loc.tolist() == [0, 1, 2, 3]
    # Each sequence's new K/V goes to the slot of its position 39: block 2, offset 7.
    assert b.slot_mapping.tolist() == [int(t) * 16 + 7 for t in b.block_table[:, 2]]
    assert bool((b.kv_cache != 0).all())


def test_shapes_and_backends_parse() -> None:
    assert ab.parse_shapes("64x1024, 1x65536") == [(64, 1024), (1, 65536)]
    assert ab.parse_backends("torch,triton") == ["torch", "triton"]
    for bad in ("64", "0x10", "ax1"):
        with pytest.raises(argparse.ArgumentTypeError):
            ab.parse_shapes(bad)
