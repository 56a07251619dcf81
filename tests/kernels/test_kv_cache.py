"""KV-cache write kernel against its torch reference and the engine's write_kv."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_cache import write_kv_cache, write_kv_cache_ref
from worker.engine.attention import write_kv

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 6, 16, 2, 32
GPU = pytest.mark.gpu
# (key/value dtype, cache dtype)
DTYPE_PAIRS = [
    (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.float32, torch.float16),
    pytest.param(torch.bfloat16, torch.bfloat16, marks=GPU),
    pytest.param(torch.float32, torch.bfloat16, marks=GPU),
]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_cache(dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    return randn(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, seed=seed).to(device, dtype)


def slots_with_padding(tokens: int, device: str, seed: int = 0) -> torch.Tensor:
    """Distinct random slots across the whole cache, every third row padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:tokens]
    slots[::3] = -1
    return slots.to(device)


def written(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Bool mask over the cache's [2, num_blocks, block_size] slots that `slots` covers."""
    mask = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool, device=cache.device)
    mask[slots[slots >= 0]] = True
    return mask.view(1, NUM_BLOCKS, BLOCK_SIZE).expand(2, -1, -1)


@pytest.mark.parametrize(("src_dtype", "cache_dtype"), DTYPE_PAIRS)
def test_write_matches_engine_and_reference(src_dtype: torch.dtype, cache_dtype: torch.dtype,
                                            device: str) -> None:
    tokens = 9
    key = randn(tokens, KV_HEADS, HEAD_DIM, seed=1).to(device, src_dtype)
    value = randn(tokens, KV_HEADS, HEAD_DIM, seed=2).to(device, src_dtype)
    slots = slots_with_padding(tokens, device, seed=3)
    cache = make_cache(cache_dtype, device, seed=4)
    original = cache.clone()
    engine_cache, ref_cache = cache.clone(), cache.clone()

    write_kv_cache(key, value, cache, slots)
    write_kv(engine_cache, key, value, slots)
    write_kv_cache_ref(key, value, ref_cache, slots)
    assert torch.equal(cache, engine_cache)
    assert torch.equal(cache, ref_cache)
    # Padding rows (slot -1) wrote nothing: every slot not in the mapping is as before.
    touched = written(cache, slots)
    assert torch.equal(cache[~touched], original[~touched])
    valid = slots >= 0
    flat = cache.view(2, -1, KV_HEADS, HEAD_DIM)
    assert torch.equal(flat[0, slots[valid]], key[valid].to(cache_dtype))
    assert torch.equal(flat[1, slots[valid]], value[valid].to(cache_dtype))


def test_all_padding_is_a_no_op(device: str) -> None:
    cache = make_cache(torch.float32, device, seed=5)
    original = cache.clone()
    key = randn(4, KV_HEADS, HEAD_DIM, seed=6).to(device)
    write_kv_cache(key, key, cache, torch.full((4,), -1, dtype=torch.int64, device=device))
    assert torch.equal(cache, original)


def test_slots_outside_the_cache_are_skipped(device: str) -> None:
    cache = make_cache(torch.float32, device, seed=7)
    original = cache.clone()
    key = randn(3, KV_HEADS, HEAD_DIM, seed=8).to(device)
    slots = torch.tensor([NUM_BLOCKS * BLOCK_SIZE, 5, -7], device=device)
    write_kv_cache(key, -key, cache, slots)
    ref = original.clone()
    write_kv_cache_ref(key, -key, ref, slots)
    assert torch.equal(cache, ref)
    assert torch.equal(cache[0, 0, 5], key[1]) and torch.equal(cache[1, 0, 5], -key[1])


def test_strided_key_value_and_cache(device: str) -> None:
    # key and value as views of a fused qkv output; int32 slots; a cache whose heads are padded.
    tokens, heads = 7, 4
    qkv = randn(tokens, (heads + 2 * KV_HEADS) * HEAD_DIM, seed=9).to(device)
    _, k, v = qkv.split([heads * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    key, value = k.view(tokens, KV_HEADS, HEAD_DIM), v.view(tokens, KV_HEADS, HEAD_DIM)
    storage = randn(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM + 8, seed=10).to(device)
    cache = storage[..., :HEAD_DIM]
    assert not cache.is_contiguous() and not key.is_contiguous()
    storage_before = storage.clone()
    slots = slots_with_padding(tokens, device, seed=11)
    ref = cache.contiguous()
    write_kv_cache(key, value, cache, slots.int())
    write_kv_cache_ref(key, value, ref, slots)
    assert torch.equal(cache, ref)
    assert torch.equal(storage[..., HEAD_DIM:], storage_before[..., HEAD_DIM:])


def test_empty_batch(device: str) -> None:
    cache = make_cache(torch.float32, device)
    original = cache.clone()
    empty = torch.empty(0, KV_HEADS, HEAD_DIM, device=device)
    write_kv_cache(empty, empty, cache, torch.empty(0, dtype=torch.int64, device=device))
    assert torch.equal(cache, original)


def test_bad_arguments_raise_value_error(device: str) -> None:
    cache = make_cache(torch.float32, device)
    key = randn(3, KV_HEADS, HEAD_DIM).to(device)
    slots = torch.tensor([0, 1, 2], device=device)
    cases = [
        ((key, key, cache[0], slots), "kv_cache must be"),
        ((randn(3, KV_HEADS + 1, HEAD_DIM).to(device),) * 2 + (cache, slots), "key must be"),
        ((key, key[:2], cache, slots), "value has shape"),
        ((key, key, cache, slots[:2]), "slot_mapping must have shape"),
        ((key, key, cache, slots.float()), "slot_mapping has dtype"),
        ((key.to(torch.int32), key.to(torch.int32), cache, slots), "key has dtype"),
        ((key, key, cache.double(), slots), "kv_cache has dtype"),
        ((randn(3, HEAD_DIM, KV_HEADS).to(device).transpose(1, 2), key, cache, slots),
         "contiguous in its last dimension"),
        ((key, key, randn(2, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM, KV_HEADS).to(device)
          .transpose(-1, -2), slots), "contiguous in its last dimension"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            write_kv_cache(*args)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(capture_graph) -> None:
    cache = make_cache(torch.bfloat16, "cuda", seed=12)
    key = randn(8, KV_HEADS, HEAD_DIM, seed=13).cuda()
    value = randn(8, KV_HEADS, HEAD_DIM, seed=14).cuda()
    slots = slots_with_padding(8, "cuda", seed=15)
    graph, _ = capture_graph(lambda: write_kv_cache(key, value, cache, slots))
    key.copy_(randn(8, KV_HEADS, HEAD_DIM, seed=16))
    value.copy_(randn(8, KV_HEADS, HEAD_DIM, seed=17))
    slots.copy_(slots_with_padding(8, "cuda", seed=18))
    ref = cache.clone()
    write_kv_cache_ref(key, value, ref, slots)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cache, ref)
