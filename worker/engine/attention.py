"""Attention over the paged KV cache: metadata for one step and the pure-torch backend.

Layout. Queries, keys and values of one step are flattened over all scheduled tokens:
`q: [num_tokens, num_heads, head_dim]`. Each layer's cache is one tensor
`[2, num_blocks, block_size, num_kv_heads, head_dim]` (keys, then values). Token `t` of the step is
written to flat slot `slot_mapping[t]` = block_id * block_size + offset; slot -1 writes nothing
(padding). Sequence `i` owns query rows `query_start_loc[i]:query_start_loc[i+1]` and attends to
its first `seq_lens[i]` cached positions, causally: its last query row is position seq_lens[i]-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    # Host copies, so backends can plan without syncing on the device tensors.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # Split-KV segments for the Triton kernel; None lets it choose. Fixed when graphs are captured.
    num_kv_splits: int | None = None
    # Built by the first layer that needs it and reused by the others: the same for every layer.
    decode_plan: DecodePlan | None = None
    prefill_plan: list[PrefillGroup] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass
class DecodePlan:
    """Which sequences decode one token this step, and their attention mask."""

    rows: torch.Tensor  # [B] query row of each decoding sequence
    block_table: torch.Tensor  # [B, max_blocks]
    max_len: int
    mask: torch.Tensor  # [B, 1, 1, max_len] bool: position < that sequence's length
    query_starts: list[int]  # query row where every sequence (decoding or not) starts


def plan_decode(meta: AttentionMetadata, device: torch.device) -> DecodePlan:
    starts = _cumsum([0, *meta.query_lens_cpu])
    seqs = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
    rows = torch.tensor([starts[i] for i in seqs], dtype=torch.long, device=device)
    seq_idx = torch.tensor(seqs, dtype=torch.long, device=device)
    max_len = max((meta.seq_lens_cpu[i] for i in seqs), default=0)
    seq_lens = meta.seq_lens[seq_idx]
    mask = (torch.arange(max_len, device=device)[None, :] < seq_lens[:, None])[:, None, None]
    return DecodePlan(rows, meta.block_table[seq_idx], max_len, mask, starts)


@dataclass
class PrefillGroup:
    """Sequences of more than one query token whose attention runs as one padded call.

    Query rows are padded to the group's longest (`q_len`) and keys to its longest context; the
    mask lets padded slot r of sequence i see positions <= context_i + r, so padding rows see at
    least position 0 (no row is all -inf) and are dropped afterwards.
    """

    seqs: list[int]
    q_len: int
    max_len: int
    # The padded call's inputs; left None for a group of one, which runs unpadded.
    block_table: torch.Tensor | None = None  # [P, max_blocks]
    gather: torch.Tensor | None = None  # [P * q_len] query row per padded slot (padding: row 0)
    slots: torch.Tensor | None = None  # [n] padded slots that are real query rows
    rows: torch.Tensor | None = None  # [n] the query rows they are
    mask: torch.Tensor | None = None  # [P, 1, q_len, max_len] bool


# Padding a group may at most double its query rows and keys: a long prompt's chunk next to
# short ones runs on its own rather than padding every short one to its length.
_MAX_PADDING = 2.0
# A group's attention scores per head (sequences x query rows x keys), so grouping long chunks
# on long contexts never holds many times the memory one of them would alone.
_MAX_GROUP_SCORES = 1 << 20


def plan_prefill(meta: AttentionMetadata, starts: list[int], device: torch.device
                 ) -> list[PrefillGroup]:
    """Groups the multi-token sequences of a step, shortest first, into padded calls."""
    q_lens, seq_lens = meta.query_lens_cpu, meta.seq_lens_cpu
    seqs = sorted((i for i, n in enumerate(q_lens) if n > 1),
                  key=lambda i: (q_lens[i], seq_lens[i]))
    groups: list[list[int]] = []
    q_sum = s_sum = longest = 0  # the last group's totals and longest context
    for i in seqs:
        # Sorted, so i has the group's longest query; the padded call holds n x q_len rows.
        n = len(groups[-1]) + 1 if groups else 1
        q, s, top = q_sum + q_lens[i], s_sum + seq_lens[i], max(longest, seq_lens[i])
        if (n > 1 and n * q_lens[i] <= _MAX_PADDING * q and n * top <= _MAX_PADDING * s
                and n * q_lens[i] * top <= _MAX_GROUP_SCORES):
            groups[-1].append(i)
            q_sum, s_sum, longest = q, s, top
        else:
            groups.append([i])
            q_sum, s_sum, longest = q_lens[i], seq_lens[i], seq_lens[i]
    return [_prefill_group(meta, g, starts, device) for g in groups]


def _prefill_group(meta: AttentionMetadata, seqs: list[int], starts: list[int],
                   device: torch.device) -> PrefillGroup:
    q_lens = [meta.query_lens_cpu[i] for i in seqs]
    seq_lens = [meta.seq_lens_cpu[i] for i in seqs]
    q_len, max_len = max(q_lens), max(seq_lens)
    if len(seqs) == 1:
        return PrefillGroup(seqs, q_len, max_len)
    gather: list[int] = []
    slots: list[int] = []
    rows: list[int] = []
    for p, (i, n) in enumerate(zip(seqs, q_lens, strict=True)):
        real = range(starts[i], starts[i] + n)
        gather += [*real, *([0] * (q_len - n))]
        slots += range(p * q_len, p * q_len + n)
        rows += real
    context = torch.tensor([s - n for s, n in zip(seq_lens, q_lens, strict=True)], device=device)
    last = context[:, None] + torch.arange(q_len, device=device)[None, :]  # [P, q_len]
    mask = torch.arange(max_len, device=device)[None, None, :] <= last[:, :, None]
    idx = torch.tensor(seqs, dtype=torch.long, device=device)

    def longs(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    return PrefillGroup(seqs, q_len, max_len, meta.block_table.index_select(0, idx),
                        longs(gather), longs(slots), longs(rows), mask[:, None])


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Stores this step's keys and values into their slots; slot -1 is skipped."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    keys = kv_cache[0].view(-1, num_kv_heads, head_dim)
    values = kv_cache[1].view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    keys.index_copy_(0, slot_mapping, key.to(keys.dtype))
    values.index_copy_(0, slot_mapping, value.to(values.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor,
              max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous keys and values per sequence: two [num_seqs, max_seq_len, kv_heads, head_dim]."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_blocks_needed = -(-max_seq_len // block_size)
    table = block_table[:, :num_blocks_needed].long()
    n = table.shape[0]
    flat = table.reshape(-1)
    # index_select over whole blocks: one contiguous copy per block, faster than fancy indexing.
    k = kv_cache[0].index_select(0, flat).view(n, -1, num_kv_heads, head_dim)[:, :max_seq_len]
    v = kv_cache[1].index_select(0, flat).view(n, -1, num_kv_heads, head_dim)[:, :max_seq_len]
    return k, v


class TorchAttentionBackend:
    """Reference paged attention in plain torch; runs on CPU and GPU.

    Decode rows (one query token) of all sequences go through one batched call; prefills and
    prefill chunks go through padded calls of sequences of similar length (`plan_prefill`), so
    a step that admits several short prompts costs one call per layer, not one per prompt, and a
    long prompt never pads the whole batch.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] -> out: [T, H, D]
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.decode_plan is None:
            meta.decode_plan = plan_decode(meta, q.device)
        plan = meta.decode_plan
        if plan.max_len:
            self._decode(q, out, kv_cache, plan)
        if meta.max_query_len > 1:
            if meta.prefill_plan is None:
                meta.prefill_plan = plan_prefill(meta, plan.query_starts, q.device)
            for group in meta.prefill_plan:
                if group.mask is None:
                    i = group.seqs[0]
                    self._prefill(q, out, kv_cache, meta, i, plan.query_starts[i],
                                  meta.query_lens_cpu[i])
                else:
                    self._prefill_group(q, out, kv_cache, group)
        return out

    def _decode(self, q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor,
                plan: DecodePlan) -> None:
        k, v = gather_kv(kv_cache, plan.block_table, plan.max_len)
        o = F.scaled_dot_product_attention(
            q[plan.rows].unsqueeze(2),  # [B, H, 1, D]
            k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
            attn_mask=plan.mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        out[plan.rows] = o.squeeze(2)

    def _prefill_group(self, q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor,
                       group: PrefillGroup) -> None:
        assert group.block_table is not None and group.gather is not None
        assert group.rows is not None and group.slots is not None
        n, h, d = len(group.seqs), q.shape[1], q.shape[2]
        k, v = gather_kv(kv_cache, group.block_table, group.max_len)
        qs = q.index_select(0, group.gather).view(n, group.q_len, h, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qs, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
            attn_mask=group.mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)  # [P, H, q_len, D]
        o = o.transpose(1, 2).reshape(n * group.q_len, h, d)
        out.index_copy_(0, group.rows, o.index_select(0, group.slots))

    def _prefill(self, q: torch.Tensor, out: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, seq: int, start: int, q_len: int) -> None:
        seq_len = meta.seq_lens_cpu[seq]
        k, v = gather_kv(kv_cache, meta.block_table[seq:seq + 1], seq_len)
        qs = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        ks = k.transpose(1, 2).to(q.dtype)  # [1, Hkv, S, D]
        vs = v.transpose(1, 2).to(q.dtype)
        gqa = self.num_heads != self.num_kv_heads
        if seq_len == q_len:  # no cached context: plain causal attention
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale,
                                               enable_gqa=gqa)
        else:  # chunk on top of a cached prefix: query row r sits at position seq_len - q_len + r
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale,
                                               enable_gqa=gqa)
        out[start:start + q_len] = o.squeeze(0).transpose(0, 1)


class TritonAttentionBackend:
    """Paged attention through the Triton kernels: no host syncs, so decode can be graphed."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        from kernels.kv_cache import write_kv_cache
        from kernels.paged_attention import paged_attention

        self._write = write_kv_cache
        self._attend = paged_attention
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self._write(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        self._attend(q, kv_cache, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                     max_query_len=meta.max_query_len, scale=self.scale,
                     num_kv_splits=meta.num_kv_splits)
        return out


def _cumsum(xs: list[int]) -> list[int]:
    total, out = 0, []
    for x in xs:
        total += x
        out.append(total)
    return out
