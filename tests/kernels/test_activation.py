"""SiLU-and-mul kernel against its torch reference and the model's MLP arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.activation import silu_and_mul, silu_and_mul_ref

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 2e-3),
       torch.bfloat16: (8e-3, 1.6e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 200, 1536])  # 1536: two column tiles, the second partial
def test_silu_and_mul_matches_reference_and_model(inter: int, dtype: torch.dtype,
                                                  device: str) -> None:
    x = (4 * randn(3, 2 * inter, seed=inter)).to(device, dtype)
    before = x.clone()
    out = silu_and_mul(x)
    assert out.shape == (3, inter) and out.dtype == dtype and out.is_contiguous()
    gate, up = x.split(inter, dim=-1)  # MLP.forward: F.silu(gate) * up
    assert_close(out, F.silu(gate) * up, dtype)
    assert_close(out, silu_and_mul_ref(x), dtype)
    assert torch.equal(x, before)


def test_silu_and_mul_strided_rows(device: str) -> None:
    x = randn(4, 300, seed=1).to(device)[:, 20:148]  # row stride 300, last dim contiguous
    assert_close(silu_and_mul(x), silu_and_mul_ref(x), torch.float32)


# exp overflows to inf in float32 (the interpreter's numpy warns); torch gives the same -0.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_silu_and_mul_extreme_inputs(device: str) -> None:
    # Large |gate| saturates exp: silu -> gate for large positive, -> -0 for large negative.
    gate = torch.tensor([[-100.0, -30.0, -5.0, -1e-3, 1e-3, 5.0, 30.0, 100.0]])
    x = torch.cat((gate, randn(1, 8, seed=2)), dim=-1).to(device)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x), torch.float32)


def test_empty_input(device: str) -> None:
    assert silu_and_mul(torch.empty(0, 128, device=device)).shape == (0, 64)


def test_bad_arguments_raise_value_error(device: str) -> None:
    with pytest.raises(ValueError, match="2-D"):
        silu_and_mul(randn(128).to(device))
    with pytest.raises(ValueError, match="2-D"):
        silu_and_mul(randn(2, 2, 128).to(device))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(randn(2, 127).to(device))
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(torch.ones(2, 128, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        silu_and_mul(randn(2, 256).to(device)[:, ::2])


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(capture_graph) -> None:
    x = randn(8, 2 * 1536, seed=3).cuda()
    graph, out = capture_graph(lambda: silu_and_mul(x))
    x.copy_(randn(8, 2 * 1536, seed=4))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, silu_and_mul_ref(x), torch.float32)
