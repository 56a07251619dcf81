"""The pure-torch attention backend against the reference: decode rows, lone prefill chunks and
padded groups of prefills in one step."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from tests.kernels.test_paged_attention import make_batch
from worker.engine.attention import AttentionMetadata, TorchAttentionBackend, plan_prefill

# (query tokens, cached context before them) per sequence.
BATCHES = {
    "decode only": [(1, 5), (1, 40), (1, 0)],
    "one prefill": [(1, 37), (20, 0), (1, 3)],
    "short prompts": [(1, 37), (12, 0), (12, 0), (9, 0), (1, 2), (11, 0)],
    "chunks on context": [(5, 30), (6, 2), (1, 9), (4, 17), (7, 0)],
    "one long, many short": [(1, 3), (90, 0), (3, 0), (4, 0), (2, 60), (1, 1), (5, 0)],
}


def metadata(batch: dict, seqs: list[tuple[int, int]]) -> AttentionMetadata:
    q_lens = [q for q, _ in seqs]
    seq_lens = batch["seq_lens"].tolist()
    return AttentionMetadata(
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.long),  # the cache is given
        query_start_loc=batch["query_start_loc"], seq_lens=batch["seq_lens"],
        block_table=batch["block_table"], query_lens_cpu=q_lens, seq_lens_cpu=seq_lens,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens))


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa2", "mha"])
def test_matches_reference(name: str, heads: tuple[int, int]) -> None:
    seqs = BATCHES[name]
    batch = make_batch(seqs, *heads, head_dim=32, block_size=16, dtype=torch.float32)
    backend = TorchAttentionBackend(heads[0], heads[1], 32)
    q = batch["q"]
    kv = torch.zeros(q.shape[0], heads[1], 32)
    out = backend.forward(q, kv, kv, batch["kv_cache"], metadata(batch, seqs))
    ref = paged_attention_ref(q, batch["kv_cache"], batch["block_table"], batch["seq_lens"],
                              batch["query_start_loc"], batch["scale"])
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_groups_short_prompts_and_leaves_a_long_one_alone() -> None:
    seqs = BATCHES["one long, many short"]
    batch = make_batch(seqs, 4, 2, head_dim=32, block_size=16, dtype=torch.float32)
    meta = metadata(batch, seqs)
    starts = batch["query_start_loc"].tolist()
    groups = plan_prefill(meta, starts, torch.device("cpu"))
    assert sorted(len(g.seqs) for g in groups) == [1, 2, 2]  # five prefills, three calls
    assert [1] in [g.seqs for g in groups]  # the 90-token prompt pads nobody
    for g in groups:  # padding at most doubles a group's query rows and keys
        assert len(g.seqs) * g.q_len <= 2 * sum(seqs[i][0] for i in g.seqs)
        assert len(g.seqs) * g.max_len <= 2 * sum(sum(seqs[i]) for i in g.seqs)


def test_long_chunks_on_long_contexts_run_alone() -> None:
    seqs = [(300, 3000), (300, 3100), (4, 0), (5, 0)]
    batch = make_batch(seqs, 4, 2, head_dim=32, block_size=16, dtype=torch.float32)
    groups = plan_prefill(metadata(batch, seqs), batch["query_start_loc"].tolist(),
                          torch.device("cpu"))
    assert sorted(sorted(g.seqs) for g in groups) == [[0], [1], [2, 3]]
