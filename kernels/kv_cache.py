"""Writes one step's keys and values into the paged KV cache by slot.

Cache layout (shared with worker.engine.attention): one tensor per layer
`[2, num_blocks, block_size, num_kv_heads, head_dim]`, keys then values. Token t goes to slot
`slot_mapping[t]` = block_id * block_size + offset; slot -1 writes nothing (the padded rows of
CUDA-graph batches). Values are cast to the cache dtype (round to nearest even, as torch's
`.to`). One program copies all heads of one token's key and value.

The wrapper allocates nothing, never syncs and never branches on tensor values, so it can be
captured in a CUDA graph. Consequently slots are not validated on the host: any slot outside
[0, num_blocks * block_size) is skipped like -1, and two tokens mapped to the same slot race
(the engine never does that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import interpreting as _interpreting
from kernels._launch import num_warps as _num_warps

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOT_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_kv, stride_c_block, stride_c_off, stride_c_head,
    num_slots,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    valid = (slot >= 0) & (slot < num_slots)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM) & valid
    key = tl.load(key_ptr + tok * stride_k_tok + heads * stride_k_head + dims, mask=mask)
    value = tl.load(value_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=mask)
    dst = cache_ptr + block * stride_c_block + offset * stride_c_off + heads * stride_c_head + dims
    tl.store(dst, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, value.to(cache_ptr.dtype.element_ty), mask=mask)




def _check_args(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    for name, t in (("key", key), ("value", value), ("kv_cache", kv_cache),
                    ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    _, _, _, num_kv_heads, head_dim = kv_cache.shape
    if key.dim() != 3 or key.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"key must be [num_tokens, {num_kv_heads}, {head_dim}] to match the "
                         f"cache, got {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value has shape {tuple(value.shape)} but key has {tuple(key.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must have shape ({key.shape[0]},), got "
                         f"{tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in SLOT_DTYPES:
        raise ValueError(f"slot_mapping has dtype {slot_mapping.dtype}; expected int64 or int32")
    for name, t in (("key", key), ("value", value), ("kv_cache", kv_cache)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    devices = {t.device for t in (key, value, kv_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"key, value, kv_cache and slot_mapping must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    if kv_cache.device.type == "cpu" and not _interpreting():
        raise ValueError("kv_cache is on the CPU: Triton kernels need GPU tensors, or "
                         "TRITON_INTERPRET=1 set before triton is imported")
    for name, t in (("key", key), ("value", value), ("kv_cache", kv_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides "
                             f"{t.stride()}")


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Stores key[t] and value[t] ([T, num_kv_heads, head_dim]) at slot slot_mapping[t] of
    kv_cache[0] and kv_cache[1], cast to the cache dtype; slot -1 (or any slot outside the
    cache) writes nothing. key and value may be strided views (e.g. of a fused qkv buffer) with a
    contiguous last dimension; the cache may be any strided tensor with a contiguous last
    dimension."""
    _check_args(key, value, kv_cache, slot_mapping)
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_tokens = key.shape[0]
    if num_tokens == 0 or num_kv_heads == 0 or head_dim == 0:
        return
    block_h = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_blocks * block_size,
        BLOCK_SIZE=block_size, NUM_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=_num_warps(block_h * block_d),
    )


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """The same write in plain torch (in place), with the same skipping of slots outside the
    cache. Syncs with the device: a reference, not for CUDA graphs."""
    _, num_blocks, block_size, _, _ = kv_cache.shape
    slots = slot_mapping.long()
    valid = (slots >= 0) & (slots < num_blocks * block_size)
    slots = slots[valid]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[0, blocks, offsets] = key[valid].to(kv_cache.dtype)
    kv_cache[1, blocks, offsets] = value[valid].to(kv_cache.dtype)
