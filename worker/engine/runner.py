"""Executes one scheduled step: flatten the batch, run the model, sample.

On CUDA, step inputs are packed into pinned host buffers and sent with one asynchronous copy per
dtype, and decode-only steps replay a CUDA graph captured for the next larger batch-size bucket
(padding rows write nothing: their cache slot is -1), which removes the per-kernel launch cost
that dominates small decode batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from worker.engine.attention import AttentionMetadata
from worker.engine.request import PLACEHOLDER_TOKEN, Request
from worker.engine.sampler import PendingSample, Sampler, TokenLogprobs
from worker.engine.scheduler import SchedulerOutput
from worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class PendingStep:
    """A launched step: its sampled tokens stay on the device (the next step's inputs) until
    `result()` brings them to the host."""

    def __init__(self, requests: list[Request], sample: PendingSample | None) -> None:
        self.requests = requests  # the requests that sample, in row order
        self.sample = sample
        self.logits: torch.Tensor | None = None  # [num_sampled, vocab] until sampled
        self.row_of = {req.request_id: i for i, req in enumerate(requests)}
        self._result: RunnerOutput | None = None

    @property
    def tokens(self) -> torch.Tensor | None:
        return None if self.sample is None else self.sample.tokens  # [num_sampled] int64

    def result(self) -> RunnerOutput:
        if self._result is not None:
            return self._result
        result = RunnerOutput()
        if self.sample is not None:
            out = self.sample.result()
            for i, req in enumerate(self.requests):
                rid = req.request_id
                error = out.errors[i]
                if error is not None:
                    result.errors[rid] = error
                    continue
                result.sampled[rid] = out.token_ids[i]
                lp = out.logprobs[i]
                if lp is not None:
                    result.logprobs[rid] = lp
        self._result = result
        return result


@dataclass
class StepInputs:
    """Host-side arrays of one step, before upload."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32
    block_table: np.ndarray  # [S, W] int32
    query_lens: list[int]
    sample_rows: list[int]
    # Rows whose input is a token the previous step sampled and the host does not know yet,
    # and where that token sits in the previous step's sampled tensor.
    placeholder_rows: np.ndarray  # [P] int64
    placeholder_src: np.ndarray  # [P] int64
    sample_rows_dev: torch.Tensor | None = None  # sample_rows on the device, set on upload


def kv_cache_tensor(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device, *, head_major: bool) -> torch.Tensor:
    """A zeroed layer cache, shaped [2, num_blocks, block_size, num_kv_heads, head_dim]; with
    `head_major` its memory is [2, num_blocks, num_kv_heads, block_size, head_dim]."""
    if not head_major:
        return torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                           device=device)
    storage = torch.zeros(2, num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype,
                          device=device)
    return storage.permute(0, 1, 3, 2, 4)


def cuda_graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: fine steps where batches are small, coarser above."""
    sizes = [1, 2, 4, 8, *range(16, max_batch + 1, 16)]
    return sorted({min(s, max_batch) for s in sizes})


class _Uploader:
    """Pinned staging buffers and one async copy per dtype.

    Two sets of buffers take turns: with steps launched ahead, the host fills step N+1's while
    step N's copy may still be queued; an event per set says when its last copy has run.
    """

    def __init__(self, device: torch.device, num_int64: int, num_int32: int) -> None:
        self.device = device
        pin = device.type == "cuda"
        self.sets = [[torch.empty(num_int64, dtype=torch.int64, pin_memory=pin),
                      torch.empty(num_int32, dtype=torch.int32, pin_memory=pin)]
                     for _ in range(2)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def upload(self, arrays64: list[np.ndarray], arrays32: list[np.ndarray]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        turn, self.turn = self.turn, 1 - self.turn
        event = self.events[turn]
        if event is not None:
            event.synchronize()
        bufs = self.sets[turn]
        out = self._send(bufs, 0, arrays64), self._send(bufs, 1, arrays32)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.events[turn] = event
        return out

    def _send(self, bufs: list[torch.Tensor], which: int,
              arrays: list[np.ndarray]) -> list[torch.Tensor]:
        host = bufs[which]
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        if total > host.numel():  # grows rarely: only past the sizes planned at start
            host = bufs[which] = torch.empty(total, dtype=host.dtype, pin_memory=host.is_pinned())
        view = host.numpy()
        offset = 0
        for a in arrays:
            view[offset:offset + a.size] = a.reshape(-1)
            offset += a.size
        dev = host[:total].to(self.device, non_blocking=True)
        out, offset = [], 0
        for a, n in zip(arrays, sizes, strict=True):
            out.append(dev[offset:offset + n].view(a.shape))
            offset += n
        return out


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [bucket, hidden] output buffer


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, *, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int,
                 cuda_graph_max_batch: int = 0, head_major_kv: bool = False) -> None:
        cfg = model.config
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        # One tensor per layer, seen as [2 (k, v), num_blocks, block_size, num_kv_heads,
        # head_dim]. The Triton kernels read it through strides, and for them each block is
        # stored head-major: one KV head's block_size vectors are contiguous, so a decode program
        # streams whole kilobytes instead of gathering one head_dim vector per token.
        self.kv_caches = [
            kv_cache_tensor(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype,
                            device, head_major=head_major_kv)
            for _ in range(cfg.num_layers)
        ]
        self.sampler = Sampler(cfg.vocab_size)
        tokens = max(max_num_batched_tokens, max_num_seqs)
        self.uploader = _Uploader(device, 6 * tokens,
                                  2 * max_num_seqs + 1 + max_num_seqs * self.max_blocks_per_seq)
        self.graphs: dict[int, _Graph] = {}
        if cuda_graph_max_batch > 0:
            self._capture_graphs(min(cuda_graph_max_batch, max_num_seqs))

    # -- one step ---------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Runs one step and waits for its tokens."""
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: PendingStep | None = None, *,
               sample: bool = True) -> PendingStep:
        """Queues one step on the device. Inputs that are placeholders for `prev`'s tokens are
        read from `prev`'s sampled tensor on the device. With `sample` off only the forward
        pass is queued; `sample(step)` queues the sampling later."""
        inputs = self._build_inputs(out, prev)
        hidden = self._forward_graph(inputs, prev) if self._graph_fits(inputs) else \
            self._forward_eager(inputs, prev)
        requests = [s.request for s in out.scheduled if s.samples]
        if not inputs.sample_rows:
            return PendingStep(requests, None)
        assert inputs.sample_rows_dev is not None
        # The rows come with the step's upload: a blocking copy here would wait for the device
        # to finish the step before, and nothing would overlap.
        logits = self.model.compute_logits(hidden[inputs.sample_rows_dev])  # [num_sampled, vocab]
        if not sample:
            step = PendingStep(requests, None)
            step.logits = logits
            return step
        return PendingStep(requests, self.sampler.sample_async(logits, requests))

    @torch.inference_mode()
    def sample(self, step: PendingStep) -> None:
        """Queues the sampling of a step launched with `sample` off (no-op for one without
        rows to sample)."""
        if step.logits is not None:
            step.sample = self.sampler.sample_async(step.logits, step.requests)
            step.logits = None

    @staticmethod
    def _fill_placeholders(ids: torch.Tensor, rows: torch.Tensor, src: torch.Tensor,
                           prev: PendingStep | None) -> None:
        if rows.numel():
            assert prev is not None and prev.tokens is not None
            ids.index_copy_(0, rows, prev.tokens.index_select(0, src))

    def _build_inputs(self, out: SchedulerOutput, prev: PendingStep | None) -> StepInputs:
        bs = self.block_size
        num_seqs = len(out.scheduled)
        width = max(len(s.block_ids) for s in out.scheduled)
        block_table = np.zeros((num_seqs, width), dtype=np.int32)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, seq_lens, sample_rows = [], [], []
        ph_rows: list[int] = []
        ph_src: list[int] = []
        for i, s in enumerate(out.scheduled):
            req, start, n, table = s.request, s.start, s.num_new_tokens, s.block_ids
            block_table[i, :len(table)] = table
            if n == 1:  # decode rows dominate: plain ints beat numpy calls on one element
                token = req.all_token_ids[start]
                if token == PLACEHOLDER_TOKEN:
                    if prev is None or req.request_id not in prev.row_of:
                        raise RuntimeError(f"{req.request_id}: input token not sampled yet")
                    ph_rows.append(len(input_ids))
                    ph_src.append(prev.row_of[req.request_id])
                    token = 0
                input_ids.append(token)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids += req.all_token_ids[start:start + n]
                pos = np.arange(start, start + n, dtype=np.int64)
                positions += pos.tolist()
                slots += (np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist()
            query_lens.append(n)
            seq_lens.append(start + n)
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
        query_start = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        return StepInputs(
            input_ids=np.asarray(input_ids, dtype=np.int64),
            positions=np.asarray(positions, dtype=np.int64),
            slot_mapping=np.asarray(slots, dtype=np.int64),
            query_start_loc=query_start, seq_lens=np.asarray(seq_lens, dtype=np.int32),
            block_table=block_table, query_lens=query_lens, sample_rows=sample_rows,
            placeholder_rows=np.asarray(ph_rows, dtype=np.int64),
            placeholder_src=np.asarray(ph_src, dtype=np.int64))

    def _forward_eager(self, inputs: StepInputs, prev: PendingStep | None) -> torch.Tensor:
        (ids, positions, slots, ph_rows, ph_src, inputs.sample_rows_dev), (qsl, seq_lens, table) = \
            self.uploader.upload(
                [inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.placeholder_rows,
                 inputs.placeholder_src, np.asarray(inputs.sample_rows, dtype=np.int64)],
                [inputs.query_start_loc, inputs.seq_lens, inputs.block_table])
        self._fill_placeholders(ids, ph_rows, ph_src, prev)
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens, block_table=table,
            query_lens_cpu=inputs.query_lens, seq_lens_cpu=inputs.seq_lens.tolist(),
            max_query_len=max(inputs.query_lens), max_seq_len=int(inputs.seq_lens.max()))
        return self.model(ids, positions, self.kv_caches, meta)  # [T, hidden]

    # -- CUDA graphs for decode -------------------------------------------------------------

    def _graph_fits(self, inputs: StepInputs) -> bool:
        n = len(inputs.query_lens)
        return bool(self.graphs) and n <= max(self.graphs) and len(inputs.input_ids) == n

    def _forward_graph(self, inputs: StepInputs, prev: PendingStep | None) -> torch.Tensor:
        n = len(inputs.query_lens)
        bucket = min(b for b in self.graphs if b >= n)
        pad = bucket - n
        ids = np.concatenate([inputs.input_ids, np.zeros(pad, np.int64)])
        positions = np.concatenate([inputs.positions, np.zeros(pad, np.int64)])
        slots = np.concatenate([inputs.slot_mapping, np.full(pad, -1, np.int64)])
        seq_lens = np.concatenate([inputs.seq_lens, np.ones(pad, np.int32)])
        table = np.zeros((bucket, inputs.block_table.shape[1]), dtype=np.int32)
        table[:n] = inputs.block_table
        (ids_d, pos_d, slots_d, ph_rows, ph_src, inputs.sample_rows_dev), (seq_lens_d, table_d) = \
            self.uploader.upload(
                [ids, positions, slots, inputs.placeholder_rows, inputs.placeholder_src,
                 np.asarray(inputs.sample_rows, dtype=np.int64)],
                [seq_lens, table])
        self._fill_placeholders(ids_d, ph_rows, ph_src, prev)
        g = self._static
        g["input_ids"][:bucket].copy_(ids_d)
        g["positions"][:bucket].copy_(pos_d)
        g["slot_mapping"][:bucket].copy_(slots_d)
        g["seq_lens"][:bucket].copy_(seq_lens_d)
        g["block_table"][:bucket, :table.shape[1]].copy_(table_d)
        graph = self.graphs[bucket]
        graph.graph.replay()
        return graph.hidden[:n]

    def _capture_graphs(self, max_batch: int) -> None:
        dev = self.device
        width = self.max_blocks_per_seq
        self._static = {
            "input_ids": torch.zeros(max_batch, dtype=torch.int64, device=dev),
            "positions": torch.zeros(max_batch, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((max_batch,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.ones(max_batch, dtype=torch.int32, device=dev),
            "query_start_loc": torch.arange(max_batch + 1, dtype=torch.int32, device=dev),
            "block_table": torch.zeros(max_batch, width, dtype=torch.int32, device=dev),
        }
        from kernels.paged_attention import choose_num_kv_splits

        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        buckets = cuda_graph_buckets(max_batch)
        s = self._static
        cfg = self.model.config
        with torch.inference_mode():
            for bucket in reversed(buckets):  # largest first, so smaller ones reuse its memory
                meta = AttentionMetadata(
                    slot_mapping=s["slot_mapping"][:bucket],
                    query_start_loc=s["query_start_loc"][:bucket + 1],
                    seq_lens=s["seq_lens"][:bucket], block_table=s["block_table"][:bucket],
                    query_lens_cpu=[1] * bucket, seq_lens_cpu=[1] * bucket, max_query_len=1,
                    max_seq_len=width * self.block_size,
                    num_kv_splits=choose_num_kv_splits(bucket, cfg.num_kv_heads, 1, dev))
                args = (s["input_ids"][:bucket], s["positions"][:bucket], self.kv_caches, meta)
                self.model(*args)  # compiles kernels and settles allocations outside capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model(*args)
                self.graphs[bucket] = _Graph(graph, hidden)
        torch.cuda.synchronize(dev)
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(buckets),
                 max_batch, time.perf_counter() - t0)
