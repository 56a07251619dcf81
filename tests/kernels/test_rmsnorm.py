"""RMSNorm and fused add + RMSNorm kernels against their torch references and the model's code."""

from __future__ import annotations

import pytest
import torch

from kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from worker.models.llama import RMSNorm

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# fp32: only the summation order differs; fp16/bf16: a couple of ulps of the output.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3),
       torch.bfloat16: (8e-3, 1.6e-2)}
EPS = 1e-6


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def model_norm(weight: torch.Tensor) -> RMSNorm:
    norm = RMSNorm(weight.shape[0], EPS).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 200), (2, 3, 32)])
def test_rms_norm_matches_reference_and_model(shape: tuple[int, ...], dtype: torch.dtype,
                                              device: str) -> None:
    x = (3 * randn(*shape, seed=1)).to(device, dtype)
    w = randn(shape[-1], seed=2).to(device, dtype)
    before = x.clone()
    out = rms_norm(x, w, EPS)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, rms_norm_ref(x, w, EPS), dtype)
    with torch.no_grad():
        assert_close(out, model_norm(w)(x), dtype)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64])
def test_rms_norm_per_head_views_of_fused_qkv(head_dim: int, dtype: torch.dtype,
                                              device: str) -> None:
    # Qwen3 q/k norm: q and k are strided [T, H, D] views of the qkv projection output.
    tokens, heads, kv_heads = 5, 4, 2
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, seed=3).to(device, dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    wq, wk = randn(head_dim, seed=4).to(device, dtype), randn(head_dim, seed=5).to(device, dtype)
    with torch.no_grad():
        assert_close(rms_norm(q, wq, EPS), model_norm(wq)(q), dtype)
        assert_close(rms_norm(k, wk, EPS), model_norm(wk)(k), dtype)


def test_rms_norm_leading_dims_merge_or_are_rejected(device: str) -> None:
    w = randn(32, seed=6).to(device)
    base = randn(2, 3, 5, 32, seed=7).to(device)
    x = base[:, :, :4]  # strided, but dims 0 and 1 merge into one
    assert_close(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), torch.float32)
    y = randn(2, 4, 4, 32, seed=8).to(device)[:, :3]  # dims 0 and 1 cannot merge
    with pytest.raises(ValueError, match="cannot be merged"):
        rms_norm(y, w, EPS)
    assert_close(rms_norm(y.contiguous(), w, EPS), rms_norm_ref(y, w, EPS),
                               torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 200])
def test_fused_add_rms_norm_matches_the_models_two_steps(hidden: int, dtype: torch.dtype,
                                                        device: str) -> None:
    attn_out = randn(6, hidden, seed=9).to(device, dtype)
    residual = (4 * randn(6, hidden, seed=10)).to(device, dtype)
    w = randn(hidden, seed=11).to(device, dtype)
    before = (attn_out.clone(), residual.clone())
    hidden_states, new_residual = fused_add_rms_norm(attn_out, residual, w, EPS)
    # DecoderLayer: x = x + self_attn(...); then post_attention_layernorm(x)
    x = residual + attn_out
    assert torch.equal(new_residual, x)
    with torch.no_grad():
        assert_close(hidden_states, model_norm(w)(x), dtype)
    ref_out, ref_res = fused_add_rms_norm_ref(attn_out, residual, w, EPS)
    assert_close(hidden_states, ref_out, dtype)
    assert torch.equal(new_residual, ref_res)
    assert torch.equal(attn_out, before[0]) and torch.equal(residual, before[1])


def test_fused_add_rms_norm_strided_inputs(device: str) -> None:
    x = randn(4, 96, seed=12).to(device)[:, :64]
    residual = randn(4, 128, seed=13).to(device)[:, 64:]
    w = randn(64, seed=14).to(device)
    out, res = fused_add_rms_norm(x, residual, w, EPS)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, w, EPS)
    assert torch.equal(res, ref_res)
    assert_close(out, ref_out, torch.float32)


def test_empty_input(device: str) -> None:
    w = randn(64).to(device)
    assert rms_norm(torch.empty(0, 64, device=device), w, EPS).shape == (0, 64)
    out, res = fused_add_rms_norm(torch.empty(0, 64, device=device),
                                  torch.empty(0, 64, device=device), w, EPS)
    assert out.shape == res.shape == (0, 64)


def test_bad_arguments_raise_value_error(device: str) -> None:
    x = randn(4, 64).to(device)
    w = randn(64).to(device)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, randn(32).to(device), EPS)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x, w.half(), EPS)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.to(torch.int32), w.to(torch.int32), EPS)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        rms_norm(randn(64, 4).to(device).t(), w, EPS)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, "1e-6")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="residual has shape"):
        fused_add_rms_norm(x, randn(5, 64).to(device), w, EPS)
    with pytest.raises(ValueError, match="residual has dtype"):
        fused_add_rms_norm(x, x.half(), w, EPS)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        fused_add_rms_norm(x, randn(64, 4).to(device).t(), w, EPS)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(capture_graph) -> None:
    x = randn(8, 256, seed=15).cuda()
    r = randn(8, 256, seed=16).cuda()
    w = randn(256, seed=17).cuda()
    graph, (out, (fused_out, new_res)) = capture_graph(
        lambda: (rms_norm(x, w, EPS), fused_add_rms_norm(x, r, w, EPS)))
    x.copy_(randn(8, 256, seed=18))
    r.copy_(randn(8, 256, seed=19))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, rms_norm_ref(x, w, EPS), torch.float32)
    ref_out, ref_res = fused_add_rms_norm_ref(x, r, w, EPS)
    assert_close(fused_out, ref_out, torch.float32)
    assert torch.equal(new_res, ref_res)
