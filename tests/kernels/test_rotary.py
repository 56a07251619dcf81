"""Rotary embedding kernel against its torch reference and worker.models.llama.RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from kernels.rotary import apply_rotary_, apply_rotary_ref, build_cos_sin_cache
from worker.models.config import RopeConfig
from worker.models.llama import RotaryEmbedding, rope_inv_freq

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 2e-3),
       torch.bfloat16: (8e-3, 1.6e-2)}
LLAMA3 = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=256)
ROPES = {"default": RopeConfig(), "llama3": LLAMA3}
MAX_POSITION = 1024


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the strided views of one fused qkv projection output, as in the model."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, seed=seed).to(device, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
            v.view(tokens, kv_heads, head_dim))


def positions(tokens: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, MAX_POSITION, (tokens,), generator=gen).to(device)


@pytest.mark.parametrize("rope", ROPES.values(), ids=ROPES.keys())
def test_cos_sin_cache_is_the_models_formula(rope: RopeConfig, device: str) -> None:
    inv_freq = rope_inv_freq(64, rope).to(device)
    cache = build_cos_sin_cache(inv_freq, MAX_POSITION, device)
    assert cache.shape == (MAX_POSITION, 64) and cache.dtype == torch.float32
    pos = torch.arange(MAX_POSITION, device=device)
    freqs = pos.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    assert torch.equal(cache[:, :32], emb.cos()[:, :32])
    assert torch.equal(cache[:, 32:], emb.sin()[:, 32:])


@pytest.mark.parametrize("rope", ROPES.values(), ids=ROPES.keys())
@pytest.mark.parametrize("head_dim", [32, 64])
def test_matches_model_rotary_embedding_in_float32(rope: RopeConfig, head_dim: int,
                                                   device: str) -> None:
    model_rotary = RotaryEmbedding(head_dim, rope).to(device)
    cache = build_cos_sin_cache(model_rotary.inv_freq, MAX_POSITION, device)
    q, k, _ = qkv_views(6, 4, 2, head_dim, torch.float32, device, seed=head_dim)
    pos = positions(6, device, seed=1)
    want_q, want_k = model_rotary(pos, q, k)
    apply_rotary_(pos, q, k, cache)
    assert_close(q, want_q, torch.float32)
    assert_close(k, want_k, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_on_qkv_views_matches_reference(dtype: torch.dtype, device: str) -> None:
    cache = build_cos_sin_cache(rope_inv_freq(64, LLAMA3), MAX_POSITION, device)
    q, k, v = qkv_views(5, 8, 2, 64, dtype, device, seed=2)
    v_before = v.clone()
    pos = positions(5, device, seed=3)
    want_q, want_k = apply_rotary_ref(pos, q, k, cache)
    assert not torch.equal(want_q, q)
    apply_rotary_(pos, q, k, cache)
    assert_close(q, want_q, dtype)
    assert_close(k, want_k, dtype)
    assert torch.equal(v, v_before)


def test_int32_positions_and_contiguous_inputs(device: str) -> None:
    cache = build_cos_sin_cache(rope_inv_freq(32, RopeConfig()), MAX_POSITION, device)
    q, k = randn(3, 2, 32, seed=4).to(device), randn(3, 1, 32, seed=5).to(device)
    pos = positions(3, device, seed=6)
    want_q, want_k = apply_rotary_ref(pos, q, k, cache)
    apply_rotary_(pos.int(), q, k, cache)
    assert_close(q, want_q, torch.float32)
    assert_close(k, want_k, torch.float32)


def test_position_outside_the_cache_leaves_the_token_alone(device: str) -> None:
    cache = build_cos_sin_cache(rope_inv_freq(32, RopeConfig()), MAX_POSITION, device)
    q, k = randn(3, 2, 32, seed=7).to(device), randn(3, 2, 32, seed=8).to(device)
    before_q, before_k = q.clone(), k.clone()
    pos = torch.tensor([MAX_POSITION, 5, -1], device=device)
    apply_rotary_(pos, q, k, cache)
    for t in (0, 2):
        assert torch.equal(q[t], before_q[t]) and torch.equal(k[t], before_k[t])
    want_q, want_k = apply_rotary_ref(pos[1:2], before_q[1:2], before_k[1:2], cache)
    assert_close(q[1:2], want_q, torch.float32)
    assert_close(k[1:2], want_k, torch.float32)


def test_empty_batch(device: str) -> None:
    cache = build_cos_sin_cache(rope_inv_freq(32, RopeConfig()), 16, device)
    apply_rotary_(torch.empty(0, dtype=torch.int64, device=device),
                  torch.empty(0, 2, 32, device=device), torch.empty(0, 1, 32, device=device),
                  cache)


def test_bad_arguments_raise_value_error(device: str) -> None:
    cache = build_cos_sin_cache(rope_inv_freq(32, RopeConfig()), 16, device)
    q, k = randn(3, 2, 32).to(device), randn(3, 1, 32).to(device)
    pos = torch.zeros(3, dtype=torch.int64, device=device)
    cases = [
        ((pos, q[0], k, cache), "3-D"),
        ((pos, q, k[:2], cache), "does not match"),
        ((pos, q, randn(3, 1, 16).to(device), cache), "does not match"),
        ((pos[:2], q, k, cache), "positions must have shape"),
        ((pos.float(), q, k, cache), "positions has dtype"),
        ((pos, q.half(), k, cache), "share a dtype"),
        ((pos, q, k, cache.double()), "float32"),
        ((pos, q, k, cache[:, :16]), "cos_sin_cache must be"),
        ((pos, randn(3, 2, 33).to(device), randn(3, 1, 33).to(device), cache), "even"),
        ((pos, randn(3, 32, 2).to(device).transpose(1, 2), k, cache), "contiguous"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            apply_rotary_(*args)
    with pytest.raises(ValueError, match="max_position"):
        build_cos_sin_cache(rope_inv_freq(32, RopeConfig()), 0, device)
    with pytest.raises(ValueError, match="inv_freq"):
        build_cos_sin_cache(torch.arange(16), 16, device)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(capture_graph) -> None:
    cache = build_cos_sin_cache(rope_inv_freq(64, LLAMA3), MAX_POSITION, "cuda")
    q, k, _ = qkv_views(8, 8, 2, 64, torch.float32, "cuda", seed=9)
    pos = positions(8, "cuda", seed=10)
    graph, _ = capture_graph(lambda: apply_rotary_(pos, q, k, cache))
    fresh_q, fresh_k, _ = qkv_views(8, 8, 2, 64, torch.float32, "cuda", seed=11)
    q.copy_(fresh_q)
    k.copy_(fresh_k)
    pos.copy_(positions(8, "cuda", seed=12))
    want_q, want_k = apply_rotary_ref(pos, q, k, cache)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(q, want_q, torch.float32)
    assert_close(k, want_k, torch.float32)
