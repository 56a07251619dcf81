"""Unified paged attention against its torch reference: mixed batches, GQA ratios, split-KV."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention, paged_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_batch(seqs: list[tuple[int, int]], num_q_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """seqs: (query tokens, cached context before them) per sequence."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in seqs]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    # Shuffled physical blocks, so a kernel that assumed contiguity would read the wrong KV.
    order = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq)
    table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        table[s, :n] = torch.tensor(order[used:used + n], dtype=torch.int32)
        used += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    num_tokens = sum(q for q, _ in seqs)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen)
    starts = [0]
    for q_len, _ in seqs:
        starts.append(starts[-1] + q_len)
    return dict(
        q=q.to(DEVICE, dtype), kv_cache=cache.to(DEVICE, dtype),
        block_table=table.to(DEVICE), seq_lens=torch.tensor(seq_lens, dtype=torch.int32,
                                                             device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        max_query_len=max(q for q, _ in seqs), scale=head_dim**-0.5)


def run_both(batch: dict, num_kv_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full_like(batch["q"], float("nan"))
    paged_attention(batch["q"], batch["kv_cache"], out, batch["block_table"], batch["seq_lens"],
                    batch["query_start_loc"], max_query_len=batch["max_query_len"],
                    scale=batch["scale"], num_kv_splits=num_kv_splits)
    ref = paged_attention_ref(batch["q"], batch["kv_cache"], batch["block_table"],
                              batch["seq_lens"], batch["query_start_loc"], batch["scale"])
    return out.float(), ref.float()


MIXED = [(1, 37), (20, 0), (9, 23), (1, 0), (16, 0), (3, 70)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 2)], ids=["gqa2", "mha", "gqa4"])
def test_mixed_prefill_chunk_and_decode(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    batch = make_batch(MIXED, *heads, head_dim=32, block_size=16, dtype=dtype)
    out, ref = run_both(batch)
    assert not out.isnan().any(), "some rows were never written"
    torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_only_batch(dtype: torch.dtype) -> None:
    batch = make_batch([(1, n) for n in (1, 15, 16, 17, 64, 65, 130)], 4, 2, head_dim=64,
                       block_size=16, dtype=dtype, seed=1)
    out, ref = run_both(batch)
    torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("splits", [2, 4])
def test_split_kv_matches_unsplit(splits: int) -> None:
    # Long contexts split across segments; a segment past the end of a short sequence sees
    # no keys and must weigh nothing in the merge.
    batch = make_batch([(1, 300), (1, 5), (1, 200)], 4, 2, head_dim=32, block_size=16,
                       dtype=torch.float32, seed=2)
    out, ref = run_both(batch, num_kv_splits=splits)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_block_size_larger_than_one_tile_row() -> None:
    batch = make_batch([(5, 40), (1, 90)], 4, 2, head_dim=32, block_size=32,
                       dtype=torch.float32, seed=3)
    out, ref = run_both(batch)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_bad_inputs_are_rejected_clearly() -> None:
    batch = make_batch([(2, 3)], 4, 2, head_dim=32, block_size=16, dtype=torch.float32)
    out = torch.empty_like(batch["q"])
    args = (batch["block_table"], batch["seq_lens"], batch["query_start_loc"])
    kw = dict(max_query_len=2, scale=1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(batch["q"], batch["kv_cache"], out, batch["block_table"].long(),
                        *args[1:], **kw)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(batch["q"].half(), batch["kv_cache"], out.half(), *args, **kw)
    with pytest.raises(ValueError, match="num_seqs"):
        paged_attention(batch["q"], batch["kv_cache"], out, batch["block_table"],
                        batch["seq_lens"], batch["query_start_loc"][:1], **kw)
    with pytest.raises(ValueError, match="do not divide"):
        paged_attention(batch["q"][:, :3], batch["kv_cache"], out[:, :3], *args, **kw)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(batch["q"], batch["kv_cache"], out, *args, num_kv_splits=3, **kw)


@pytest.mark.parametrize("splits", [1, 2])
def test_head_major_cache_layout(splits: int) -> None:
    """The engine stores blocks head-major for the kernels; same logical cache, same result."""
    from worker.engine.runner import kv_cache_tensor

    batch = make_batch(MIXED, 8, 2, head_dim=32, block_size=16, dtype=torch.float32, seed=4)
    _, num_blocks, block_size, num_kv_heads, head_dim = batch["kv_cache"].shape
    head_major = kv_cache_tensor(num_blocks, block_size, num_kv_heads, head_dim, torch.float32,
                                 batch["kv_cache"].device, head_major=True)
    head_major.copy_(batch["kv_cache"])
    assert not head_major.is_contiguous()
    ref = paged_attention_ref(batch["q"], batch["kv_cache"], batch["block_table"],
                              batch["seq_lens"], batch["query_start_loc"], batch["scale"])
    out = torch.full_like(batch["q"], float("nan"))
    paged_attention(batch["q"], head_major, out, batch["block_table"], batch["seq_lens"],
                    batch["query_start_loc"], max_query_len=batch["max_query_len"],
                    scale=batch["scale"], num_kv_splits=splits if splits > 1 else None)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-5, rtol=2e-5)
