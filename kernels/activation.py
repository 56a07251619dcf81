"""SiLU-and-mul for the fused gate|up projection of the Llama MLP.

x: [T, 2*I] = gate | up  ->  out: [T, I] = silu(gate) * up, with the model's (torch's) rounding:
silu(gate) = gate / (1 + exp(-gate)) computed in float32 and rounded to the dtype, then the
product computed in float32 from the two rounded operands and rounded once more.

On a GPU the kernel calls libdevice's expf and an IEEE division, the functions torch's own CUDA
silu uses, rather than Triton's fast approximations. The grid is (rows, column tiles): an
elementwise op gains nothing from holding a whole row, and wide intermediate sizes (14336,
28672, ...) would otherwise pad to the next power of two and spill registers.

The wrapper allocates only its output, never syncs and never branches on tensor values, so it
can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels._launch import interpreting as _interpreting
from kernels._launch import num_warps as _num_warps

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK = 1024  # columns per program


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x_row, stride_o_row,
    INTER: tl.constexpr, BLOCK: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    dtype = out_ptr.dtype.element_ty
    x_row = x_ptr + row * stride_x_row
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + INTER + cols, mask=mask, other=0.0)
    e = libdevice.exp(-gate) if PRECISE else tl.exp(-gate)
    act = tl.math.div_rn(gate, 1.0 + e).to(dtype)
    out = (act.to(tl.float32) * up.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * stride_o_row + cols, out, mask=mask)



def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] (gate | up), last dimension contiguous, any row stride.

    Returns a new contiguous [T, I] tensor of x's dtype (float32, float16 or bfloat16).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError("x must be a tensor")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [num_tokens, 2 * intermediate], got shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] % 2:
        raise ValueError(f"the last dimension of x (gate | up) must be even, got {x.shape[1]}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if x.device.type == "cpu" and not _interpreting():
        raise ValueError("x is on the CPU: Triton kernels need a GPU tensor, or "
                         "TRITON_INTERPRET=1 set before triton is imported")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dimension, got strides {x.stride()}")
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), MAX_BLOCK)
    grid = (num_tokens, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](
        x, out, x.stride(0), out.stride(0),
        INTER=inter, BLOCK=block, PRECISE=not _interpreting(), num_warps=_num_warps(block),
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """The model's arithmetic: F.silu(gate) * up, in x's dtype."""
    gate, up = x.split(x.shape[-1] // 2, dim=-1)
    return torch.nn.functional.silu(gate) * up
