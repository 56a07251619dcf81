"""Executes one scheduled step: flatten the batch, run the model, sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from worker.engine.attention import AttentionMetadata
from worker.engine.sampler import Sampler, TokenLogprobs
from worker.engine.scheduler import SchedulerOutput
from worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.config
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One tensor per layer: [2 (k, v), num_blocks, block_size, num_kv_heads, head_dim].
        self.kv_caches = [
            torch.zeros(2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                        dtype=dtype, device=device)
            for _ in range(cfg.num_layers)
        ]
        self.sampler = Sampler(cfg.vocab_size)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        input_ids, positions, meta, sample_rows = self._prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, hidden]
        result = RunnerOutput()
        if not sample_rows:
            return result
        rows = torch.tensor(sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])  # [num_sampled, vocab]
        requests = [s.request for s in out.scheduled if s.samples]
        sampler_out = self.sampler(logits, requests)
        for i, req in enumerate(requests):
            rid = req.request_id
            error = sampler_out.errors[i]
            if error is not None:
                result.errors[rid] = error
                continue
            result.sampled[rid] = sampler_out.token_ids[i]
            lp = sampler_out.logprobs[i]
            if lp is not None:
                result.logprobs[rid] = lp
        return result

    def _prepare(self, out: SchedulerOutput
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        num_seqs = len(out.scheduled)
        max_blocks = max(len(s.block_ids) for s in out.scheduled)
        block_table = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        input_ids: list[int] = []
        pos_chunks, slot_chunks = [], []
        query_lens, seq_lens, sample_rows = [], [], []
        for i, s in enumerate(out.scheduled):
            req, start, n = s.request, s.start, s.num_new_tokens
            table = np.asarray(s.block_ids, dtype=np.int64)
            block_table[i, :len(table)] = table
            input_ids += req.all_token_ids[start:start + n]
            pos = np.arange(start, start + n, dtype=np.int64)
            pos_chunks.append(pos)
            slot_chunks.append(table[pos // bs] * bs + pos % bs)
            query_lens.append(n)
            seq_lens.append(start + n)
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
        dev = self.device
        query_start = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_chunks)).to(dev, non_blocking=True),
            query_start_loc=torch.from_numpy(query_start).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_table=torch.from_numpy(block_table).to(dev, non_blocking=True),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        input_ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        positions = torch.from_numpy(np.concatenate(pos_chunks)).to(dev, non_blocking=True)
        return input_ids_t, positions, meta, sample_rows
