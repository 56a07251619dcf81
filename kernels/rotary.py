"""Rotary position embedding (neox / rotate_half style), applied to q and k in place.

With x1 = x[..., :D/2] and x2 = x[..., D/2:] of every head:

    out1 = x1 * cos - x2 * sin        out2 = x2 * cos + x1 * sin

where cos, sin = cos_sin_cache[position] split in halves. The math is float32 and the result is
stored in the tensor's dtype. In float32 this is the model's `q * cos + rotate_half(q) * sin`
operation for operation (x1*cos + (-x2)*sin is x1*cos - x2*sin exactly), so with a cache from
`build_cos_sin_cache` the result is bit-identical to worker.models.llama.RotaryEmbedding on the
same device. The kernel is compiled without floating-point contraction so that no fused
multiply-add changes a rounding on the GPU. (In float16/bfloat16 the model rounds cos/sin and
every intermediate product to the dtype; this kernel rounds once, at the end.)

One program rotates all query and key heads of one token. The wrapper allocates nothing, never
syncs and never branches on tensor values, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import interpreting as _interpreting
from kernels._launch import num_warps as _num_warps

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POSITION_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _rotate_heads(base_ptr, stride_head, cos, sin, valid,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF) & valid
    ptr1 = base_ptr + heads * stride_head + dims
    ptr2 = ptr1 + HALF
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    tl.store(ptr1, out1.to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr2, out2.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cache_pos, max_position,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    # A position outside the cache leaves its token untouched instead of reading out of bounds.
    valid = (pos >= 0) & (pos < max_position)
    dims = tl.arange(0, BLOCK_HALF)
    cs_mask = (dims < HALF) & valid
    cs_row = cache_ptr + pos * stride_cache_pos
    cos = tl.load(cs_row + dims, mask=cs_mask, other=0.0)[None, :]
    sin = tl.load(cs_row + HALF + dims, mask=cs_mask, other=0.0)[None, :]
    _rotate_heads(q_ptr + tok * stride_q_tok, stride_q_head, cos, sin, valid,
                  NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + tok * stride_k_tok, stride_k_head, cos, sin, valid,
                  NUM_K_HEADS, HALF, BLOCK_HK, BLOCK_HALF)




def _check_rotary_args(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       cos_sin_cache: torch.Tensor) -> None:
    for name, t in (("positions", positions), ("q", q), ("k", k),
                    ("cos_sin_cache", cos_sin_cache)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor")
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be 3-D [num_tokens, heads, head_dim], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens or "
                         "head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must have shape ({num_tokens},), got "
                         f"{tuple(positions.shape)}")
    if positions.dtype not in POSITION_DTYPES:
        raise ValueError(f"positions has dtype {positions.dtype}; expected int64 or int32")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype among float32, float16, bfloat16; got "
                         f"{q.dtype} and {k.dtype}")
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache must be float32, got {cos_sin_cache.dtype}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache must be [max_position, head_dim={head_dim}] (cos | sin), "
                         f"got {tuple(cos_sin_cache.shape)}")
    devices = {t.device for t in (positions, q, k, cos_sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"positions, q, k and cos_sin_cache must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError("q is on the CPU: Triton kernels need GPU tensors, or "
                         "TRITON_INTERPRET=1 set before triton is imported")
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides "
                             f"{t.stride()}")


def apply_rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  cos_sin_cache: torch.Tensor) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place by positions [T] (int64 or int32).

    cos_sin_cache: [max_position, D] float32 from `build_cos_sin_cache`. q and k may be strided
    views (e.g. of a fused qkv buffer) as long as their last dimension is contiguous. A position
    outside [0, max_position) leaves that token's q and k unchanged.
    """
    _check_rotary_args(positions, q, k, cos_sin_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if num_tokens == 0 or head_dim == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_hq = triton.next_power_of_2(num_q_heads)
    block_hk = triton.next_power_of_2(num_k_heads)
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        cos_sin_cache.shape[0],
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=_num_warps(block_hq * block_half), enable_fp_fusion=False,
    )


def apply_rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rotation in plain torch; returns new (q, k) and leaves the inputs alone."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]  # [T, D]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int,
                        device: torch.device | str) -> torch.Tensor:
    """[max_position, 2 * len(inv_freq)] float32: cos(pos * inv_freq) | sin(pos * inv_freq).

    The formula of worker.models.llama.RotaryEmbedding, evaluated on `device`, so the values
    are bit-identical to what the model computes there.
    """
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1:
        raise ValueError("inv_freq must be a 1-D tensor")
    if not inv_freq.is_floating_point():
        raise ValueError(f"inv_freq must be floating point, got {inv_freq.dtype}")
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
        raise ValueError(f"max_position must be a positive int, got {max_position!r}")
    positions = torch.arange(max_position, dtype=torch.int64, device=device)
    freqs = positions.float()[:, None] * inv_freq.to(device).float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
