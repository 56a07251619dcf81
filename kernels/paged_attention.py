"""Unified paged attention: prefill, chunked prefill over a cached prefix, and decode, in one kernel.

Layout (shared with the engine): queries and outputs are flattened over the step's tokens,
`q, out: [num_tokens, num_q_heads, head_dim]`; the cache is `[2, num_blocks, block_size,
num_kv_heads, head_dim]` (keys, then values); sequence `s` owns query rows
`query_start_loc[s]:query_start_loc[s+1]`, has `seq_lens[s]` tokens of context including those
rows, and its blocks are `block_table[s]`. Row r of sequence s sits at position
`seq_lens[s] - q_len + r` and attends causally.

One program handles BLOCK_Q consecutive query tokens of one sequence for one KV head, with the
G = num_q_heads / num_kv_heads query heads that share that KV head packed into the rows of a
single [BLOCK_M = BLOCK_Q * G, head_dim] tile. A decode step (one token per sequence) thus still
feeds tensor cores with G rows, and every KV tile is read once for all the heads that use it. For
decode batches too small to fill the GPU, the KV range of each program is split into segments
processed in parallel and merged by a second kernel (split-KV).

No host syncs and no data-dependent launch sizes: the grid is an upper bound computed from
tensor shapes and programs with nothing to do exit at once, so the call can be captured in a
CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Keys per inner-loop tile. Larger tiles mean fewer, longer loads per program.
TILE_N = 64
MIN_BLOCK_M = 16  # the smallest tile tensor cores take
MAX_KV_SPLITS = 16
# Splitting further was measured slower on an H200 (4 programs per SM, up to 64 splits: 63% of
# bandwidth at batch 64 x 1k context against 84%): partial results and the merge cost more than
# the extra parallelism brings at these sizes.
PROGRAMS_PER_SM = 2
# Launch shape of the attention kernel; decode steps (one query token per sequence) may differ.
NUM_WARPS = 4
NUM_STAGES = 2
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
DECODE_TILE_N = TILE_N


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks include `q_block` (sequence s starts at block
    query_start_loc[s] // BLOCK_Q + s, so blocks never straddle two sequences)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_table_ptr, seq_lens_ptr, query_start_loc_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    scale, num_seqs,
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_c_block, stride_c_off, stride_c_head,
    stride_bt_seq,
    stride_p_tok, stride_p_head,
    G: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, NUM_SPLITS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq_idx(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = q_block_local * BLOCK_Q + offs_m // G  # token index within the sequence's queries
    head = kv_head * G + offs_m % G
    row_ok = tok < q_len
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_q_tok + head[:, None] * stride_q_head
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]

    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    q_pos = context_len + tok  # absolute position of each row
    # Keys visible to the last token of this block: positions < kv_end.
    kv_end = context_len + tl.minimum((q_block_local + 1) * BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_end, TILE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in range(tile_lo, tile_hi):
        offs_n = t * TILE + tl.arange(0, TILE)
        key_ok = offs_n < kv_end
        block = tl.load(block_table_ptr + seq * stride_bt_seq + offs_n // BLOCK_SIZE, mask=key_ok,
                        other=0)
        kv_off = block.to(tl.int64) * stride_c_block + (offs_n % BLOCK_SIZE) * stride_c_off \
            + kv_head * stride_c_head
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=key_ok[None, :],
                    other=0.0)  # [HEAD_DIM, TILE]
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=key_ok[:, None],
                    other=0.0)  # [TILE, HEAD_DIM]
        if IEEE_FP32:  # noqa: SIM108 (the kernel compiler wants a plain constexpr branch)
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale  # [BLOCK_M, TILE]
        visible = (offs_n[None, :] <= q_pos[:, None]) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing visible yet keep m = -inf; shift by 0 so exp() gives 0, not NaN.
        m_shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(s - m_shift[:, None])
        alpha = tl.exp(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_FP32:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    rows = q_start + tok
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_o_tok + head[:, None] * stride_o_head
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = rows * stride_p_tok + head * stride_p_head + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr,
    stride_p_tok, stride_p_head, stride_o_tok, stride_o_head,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    base = tok * stride_p_tok + head * stride_p_head + offs_s
    m = tl.load(part_m_ptr + base)  # [NUM_SPLITS]
    denom = tl.load(part_l_ptr + base)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.exp(m - m_max)  # splits that saw no key have m = -inf and weigh nothing
    acc = tl.load(part_acc_ptr + base[:, None] * HEAD_DIM + offs_d[None, :])
    total = tl.sum(w * denom, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + tok * stride_o_tok + head * stride_o_head + offs_d,
             out.to(out_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, max_query_len: int,
                         device: torch.device) -> int:
    """Split the KV range only for decode batches with too few programs to fill the GPU."""
    if max_query_len > 1 or device.type != "cuda":
        return 1
    programs = num_seqs * num_kv_heads
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    splits = 1
    while splits < MAX_KV_SPLITS and programs * splits < PROGRAMS_PER_SM * sms:
        splits *= 2
    return splits


def _block_m(num_queries_per_kv: int, max_query_len: int) -> int:
    # Decode rows come one token per sequence: the smallest tile that holds G heads. Prefill
    # rows are plenty: 64 rows amortize each KV tile over more queries.
    rows = triton.next_power_of_2(num_queries_per_kv)
    return max(MIN_BLOCK_M if max_query_len == 1 else 64, rows)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, *, max_query_len: int, scale: float,
                    num_kv_splits: int | None = None) -> None:
    """Writes attention of `q` over the paged cache into `out` (see the module docstring)."""
    _check(q, kv_cache, out, block_table, seq_lens, query_start_loc)
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    g = num_q_heads // num_kv_heads
    block_m = _block_m(g, max_query_len)
    block_q = block_m // g
    splits = num_kv_splits or choose_num_kv_splits(num_seqs, num_kv_heads, max_query_len, q.device)
    if splits & (splits - 1):
        raise ValueError(f"num_kv_splits must be a power of two, got {splits}")
    # Upper bound on query blocks: each sequence starts a new block.
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, splits)
    decode = max_query_len == 1
    if splits > 1:
        part_acc = torch.empty(num_tokens, num_q_heads, splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_m = torch.empty(num_tokens, num_q_heads, splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:  # unused by the kernel; any float32 tensor satisfies the signature
        part_acc = part_m = part_l = torch.empty(1, dtype=torch.float32, device=q.device)
    keys, values = kv_cache[0], kv_cache[1]
    _paged_attention_kernel[grid](
        q, keys, values, out, block_table, seq_lens, query_start_loc,
        part_acc, part_m, part_l,
        scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        block_table.stride(0),
        num_q_heads * splits, splits,
        G=g, BLOCK_SIZE=block_size, TILE=DECODE_TILE_N if decode else TILE_N,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_Q=block_q, NUM_SPLITS=splits,
        IEEE_FP32=q.dtype == torch.float32,
        num_warps=DECODE_NUM_WARPS if decode else NUM_WARPS,
        num_stages=DECODE_NUM_STAGES if decode else NUM_STAGES,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            part_acc, part_m, part_l, out,
            num_q_heads * splits, splits, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, HEAD_DIM=head_dim, num_warps=4,
        )


def _check(q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got {tuple(q.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError("kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim differs: q {head_dim}, cache {cache_head_dim}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not divide into {num_kv_heads} KV heads")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError("out must have q's shape and dtype")
    if kv_cache.dtype != q.dtype:
        raise ValueError(f"cache dtype {kv_cache.dtype} differs from q dtype {q.dtype}")
    for name, t in (("q", q), ("out", out), ("kv_cache", kv_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    # Any layout with contiguous head vectors: the kernel reads through strides. The engine
    # stores each block head-major (a head's block_size vectors side by side) for long reads.
    if kv_cache.stride(0) != kv_cache[0].numel():
        raise ValueError("kv_cache keys and values must be its two halves")
    num_seqs = seq_lens.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        raise ValueError(f"block_table must be [num_seqs={num_seqs}, max_blocks]")
    if block_table.stride(1) != 1:
        raise ValueError("block_table rows must be contiguous")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must have num_seqs + 1 = {num_seqs + 1} entries")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if num_tokens == 0:
        raise ValueError("no query tokens")


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Plain torch, one sequence at a time, in float32: the definition the kernel must meet."""
    num_q_heads = q.shape[1]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    g = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[s], starts[s + 1]
        q_len = hi - lo
        blocks = block_table[s, :-(-seq_len // block_size)].long()
        k = kv_cache[0][blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = kv_cache[1][blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(g, dim=1)  # [S, Hq, D]
        v = v.repeat_interleave(g, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        visible = torch.arange(seq_len)[None, :] <= q_pos
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
