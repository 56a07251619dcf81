"""RMSNorm and fused residual-add + RMSNorm, with the Hugging Face Llama numerics.

    h = x.float(); h = h * rsqrt(mean(h^2, -1) + eps); out = weight * h.to(x.dtype)

`weight * h.to(x.dtype)` is one multiply in x.dtype: computed in float32 from the two rounded
operands and rounded once, as torch does. The fused variant first forms `s = x + residual`
rounded to the dtype (exactly what a torch add in that dtype gives) and returns
`(rms_norm(s), s)`: the normed hidden states and the new residual.

Rows are the last dimension. Any leading shape works as long as the last dimension is
contiguous and the leading dimensions other than the second-to-last can be merged into one
(true for every contiguous tensor and for per-head views `[T, H, D]` of a fused qkv buffer, as
Qwen3's q/k norm uses). One program normalizes one row, loaded whole as one block.

The wrappers allocate only their outputs, never sync with the device and never branch on tensor
values, so they can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels._launch import interpreting as _interpreting
from kernels._launch import num_warps as _num_warps

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW_WIDTH = 32768  # one row is held in registers by one program


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    rows_inner,
    stride_x_outer, stride_x_inner,
    stride_r_outer, stride_r_inner,
    eps,
    N_COLS: tl.constexpr, BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // rows_inner
    inner = row - outer * rows_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < N_COLS
    dtype = out_ptr.dtype.element_ty

    x = tl.load(x_ptr + outer * stride_x_outer + inner * stride_x_inner + cols, mask=mask,
                other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + outer * stride_r_outer + inner * stride_r_inner + cols, mask=mask,
                    other=0.0)
        # One rounding to the dtype, as a torch add in that dtype.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * N_COLS + cols, x, mask=mask)

    h = x.to(tl.float32)
    mean_sq = tl.math.div_rn(tl.sum(h * h, axis=0), N_COLS * 1.0)
    # On the GPU: __nv_rsqrtf, the function torch's CUDA rsqrt calls.
    var_eps = mean_sq + eps
    inv_rms = libdevice.rsqrt(var_eps) if PRECISE else tl.math.rsqrt(var_eps)
    normed = (h * inv_rms).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * N_COLS + cols, out, mask=mask)




def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cpu" and not _interpreting():
        raise ValueError(f"{name} is on the CPU: Triton kernels need a GPU tensor, or "
                         "TRITON_INTERPRET=1 set before triton is imported")


def _rows(t: torch.Tensor, name: str) -> tuple[int, int, int, int]:
    """(outer, inner, outer stride, inner stride) such that row r of `t` starts at
    (r // inner) * outer_stride + (r % inner) * inner_stride."""
    if t.dim() == 1:
        return 1, 1, 0, 0
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    try:
        v = t.view(-1, t.shape[-2], t.shape[-1])
    except RuntimeError as e:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} and strides {t.stride()}: the leading dimensions "
            "before the second-to-last cannot be merged into one; pass a contiguous tensor") from e
    return v.shape[0], v.shape[1], v.stride(0), v.stride(1)


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} and weight must be tensors")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but {name} has {x.dtype}; "
                         "they must match")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match the last dimension "
                         f"of {name} {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but {name} is on {x.device}")
    _check_device(x, name)
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides "
                         f"{x.stride()}")
    if weight.shape[0] > 1 and weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous, got stride {weight.stride()}")
    if x.shape[-1] > MAX_ROW_WIDTH:
        raise ValueError(f"rows of {x.shape[-1]} elements exceed the supported "
                         f"{MAX_ROW_WIDTH}")
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise ValueError(f"eps must be a float, got {eps!r}")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, res_out: torch.Tensor | None) -> None:
    n_cols = x.shape[-1]
    num_rows = x.numel() // n_cols if n_cols else 0
    if num_rows == 0:
        return
    _, inner, sx_outer, sx_inner = _rows(x, "x")
    if residual is not None:
        _, _, sr_outer, sr_inner = _rows(residual, "residual")
    else:
        sr_outer, sr_inner = 0, 0
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out,
        res_out if res_out is not None else out,
        inner, sx_outer, sx_inner, sr_outer, sr_inner, float(eps),
        N_COLS=n_cols, BLOCK=block, HAS_RESIDUAL=residual is not None,
        PRECISE=not _interpreting(), num_warps=_num_warps(block),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape, see the module docstring).

    weight: [D] of x's dtype. Returns a new contiguous tensor of x's shape and dtype.
    """
    _check_norm_args(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (rounded to the dtype); returns (rms_norm(s, weight, eps), s).

    x and residual: same shape and dtype; neither is modified. Both results are new contiguous
    tensors of that shape and dtype.
    """
    _check_norm_args(x, weight, eps)
    if not isinstance(residual, torch.Tensor):
        raise ValueError("residual must be a tensor")
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)} but x has "
                         f"{tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise ValueError(f"residual has dtype {residual.dtype} but x has {x.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if residual.shape[-1] > 1 and residual.stride(-1) != 1:
        raise ValueError(f"residual must be contiguous in its last dimension, got strides "
                         f"{residual.stride()}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, new_residual)
    return out, new_residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face / worker.models.llama.RMSNorm arithmetic, in plain torch."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return rms_norm_ref(s, weight, eps), s
