"""Scheduler and block manager under random add / abort / step sequences.

The model is replaced by a simulated KV store: each step writes every scheduled token into its
slot and then reads back each sequence's whole context through its block table. So beyond the
bookkeeping invariants (no leaked or doubly-freed block, ref counts equal to the number of
holders) the tests check what matters for correctness: a sequence always sees exactly its own
tokens, whether its blocks were computed, shared through the prefix cache, or recomputed after a
preemption.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.engine.block_manager import KVCacheManager, hash_block
from worker.engine.config import EngineConfig
from worker.engine.request import Request, RequestStatus
from worker.engine.sampling_params import SamplingParams
from worker.engine.scheduler import Scheduler, SchedulerOutput

EOS = 0


class SimulatedRunner:
    """Stands in for the model: stores token ids as KV and checks every read."""

    def __init__(self, block_size: int, rng: random.Random, vocab: int = 6) -> None:
        self.block_size = block_size
        self.rng = rng
        self.vocab = vocab
        self.slots: dict[int, tuple[int, int]] = {}  # slot -> (position, token id)

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        bs = self.block_size
        sampled = {}
        for s in out.scheduled:
            req = s.request
            for pos in range(s.start, s.start + s.num_new_tokens):
                slot = s.block_ids[pos // bs] * bs + pos % bs
                self.slots[slot] = (pos, req.all_token_ids[pos])
            for pos in range(s.start + s.num_new_tokens):
                slot = s.block_ids[pos // bs] * bs + pos % bs
                assert self.slots.get(slot) == (pos, req.all_token_ids[pos]), (
                    f"{req.request_id} reads wrong KV at position {pos}")
            if s.samples:
                sampled[req.request_id] = self.rng.randrange(self.vocab)
        return sampled


def check_invariants(sched: Scheduler) -> None:
    kv = sched.kv
    holders: Counter[int] = Counter()
    for rid, blocks in kv._req_blocks.items():
        ids = [b.block_id for b in blocks]
        assert len(ids) == len(set(ids)), f"{rid} holds a block twice"
        holders.update(ids)
        req = sched.requests.get(rid)
        assert req is not None and not req.is_finished, f"finished request {rid} holds blocks"
        assert len(blocks) * kv.block_size >= req.num_computed_tokens
    for block in kv.pool.blocks:
        assert block.ref_cnt == holders[block.block_id], f"block {block.block_id} ref count"
        assert (block.ref_cnt == 0) == (block.block_id in kv.pool._free)
        if block.block_hash is not None:
            assert kv.pool._cached[block.block_hash] is block
    for req in sched.running:
        assert req.status == RequestStatus.RUNNING
        assert req.num_cached_tokens <= req.num_prompt_tokens - 1
    assert 0 <= kv.prefix_cache_hits <= kv.prefix_cache_queries
    assert len(sched.running) <= sched.config.max_num_seqs


def make_request(rid: str, prompt: list[int], max_tokens: int, **kw: object) -> Request:
    kw.setdefault("eos_token_ids", frozenset({EOS}))
    return Request(request_id=rid, prompt_token_ids=prompt,
                   sampling_params=SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def make_scheduler(num_blocks: int, block_size: int = 4, **config: object) -> Scheduler:
    cfg = EngineConfig(block_size=block_size, **config)  # type: ignore[arg-type]
    kv = KVCacheManager(num_blocks, block_size, cfg.enable_prefix_caching)
    return Scheduler(cfg, kv, max_model_len=num_blocks * block_size)


def step(sched: Scheduler, runner: SimulatedRunner) -> list[Request]:
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    finished = sched.update(out, runner.execute(out), {})
    check_invariants(sched)
    return finished


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(12, 40),
    budget=st.integers(4, 48),
    max_num_seqs=st.integers(1, 8),
    prefix_caching=st.booleans(),
    chunked=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    ops=st.lists(st.sampled_from(["add", "add", "add_shared", "abort", "step", "step", "step"]),
                 min_size=5, max_size=60),
)
def test_random_operations_keep_blocks_consistent(
        seed: int, num_blocks: int, budget: int, max_num_seqs: int, prefix_caching: bool,
        chunked: bool, policy: str, ops: list[str]) -> None:
    rng = random.Random(seed)
    bs = 4
    sched = make_scheduler(num_blocks, bs, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                           enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked,
                           scheduling_policy=policy)
    runner = SimulatedRunner(bs, rng)
    capacity = num_blocks * bs
    prompts: list[list[int]] = []
    counter = 0
    for op in ops:
        if op.startswith("add"):
            max_len = capacity if chunked else min(capacity, budget)
            n = rng.randint(1, max(1, max_len - 2))
            if op == "add_shared" and prompts:
                base = rng.choice(prompts)
                prompt = (base[:rng.randint(1, len(base))] + [rng.randrange(1, 6) for _ in range(n)])
                prompt = prompt[:max_len - 1]
            else:
                prompt = [rng.randrange(1, 6) for _ in range(n)]
            max_tokens = rng.randint(1, max(1, min(capacity, max_len) - len(prompt)))
            prompts.append(prompt)
            sched.add_request(make_request(f"r{counter}", prompt, max_tokens,
                                           priority=rng.randint(0, 3)))
            counter += 1
        elif op == "abort" and sched.requests:
            victim = sched.requests[rng.choice(sorted(sched.requests))]
            sched.finish(victim, RequestStatus.FINISHED_ABORTED)
            check_invariants(sched)
        else:
            step(sched, runner)
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        step(sched, runner)
    assert not sched.has_unfinished(), "requests never finished"
    assert sched.kv.num_free_blocks == num_blocks, "blocks leaked"


def test_shared_prefix_hits_cache_and_is_counted() -> None:
    sched = make_scheduler(num_blocks=64, block_size=16)
    runner = SimulatedRunner(16, random.Random(0))
    prompt = list(range(1, 41))  # 40 tokens: two full blocks can be shared
    sched.add_request(make_request("a", prompt, 4))
    while sched.has_unfinished():
        step(sched, runner)
    b = make_request("b", [*prompt, 5, 5], 4)
    sched.add_request(b)
    step(sched, runner)
    assert b.num_cached_tokens == 32
    assert sched.kv.prefix_cache_hits == 32
    assert sched.kv.prefix_cache_queries == 40 + 42


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4)
    runner = SimulatedRunner(4, random.Random(0))
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    sched.add_request(make_request("a", prompt, 2))
    while sched.has_unfinished():
        step(sched, runner)
    b = make_request("b", prompt, 2)
    sched.add_request(b)
    out = sched.schedule()
    # Eight cached tokens, but the last must run again to produce logits: one block is reused.
    assert out.scheduled[0].start == 4 and out.scheduled[0].num_new_tokens == 4


def test_prefix_caching_off_shares_nothing() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, enable_prefix_caching=False)
    runner = SimulatedRunner(4, random.Random(0))
    for rid in ("a", "b"):
        sched.add_request(make_request(rid, [1, 2, 3, 4, 5, 6, 7, 8, 9], 2))
        while sched.has_unfinished():
            step(sched, runner)
    assert sched.kv.prefix_cache_hits == 0


def test_cache_salt_separates_tenants() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4)
    runner = SimulatedRunner(4, random.Random(0))
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    sched.add_request(make_request("a", prompt, 1, cache_salt="tenant-a"))
    while sched.has_unfinished():
        step(sched, runner)
    b = make_request("b", prompt, 1, cache_salt="tenant-b")
    sched.add_request(b)
    step(sched, runner)
    assert b.num_cached_tokens == 0
    assert hash_block(None, [1], "x") != hash_block(None, [1], "y")


def test_siblings_share_prompt_blocks_without_prefix_caching() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, enable_prefix_caching=False)
    runner = SimulatedRunner(4, random.Random(0), vocab=1000)
    prompt = list(range(1, 14))  # 13 tokens: three full blocks to share
    leader = make_request("0_p", prompt, 3, parent_id="p", index=0, eos_token_ids=frozenset())
    sibling = make_request("1_p", prompt, 3, parent_id="p", index=1, share_prompt_with=leader,
                           eos_token_ids=frozenset())
    sched.add_request(leader)
    sched.add_request(sibling)
    first = sched.schedule()
    assert [s.request.request_id for s in first.scheduled] == ["0_p"]
    sched.update(first, runner.execute(first), {})
    step(sched, runner)
    assert sibling.num_cached_tokens == 12
    shared = sched.kv.block_ids("0_p")[:3]
    assert sched.kv.block_ids("1_p")[:3] == shared
    while sched.has_unfinished():
        step(sched, runner)
    assert sched.kv.num_free_blocks == 64


def test_preemption_recomputes_and_finishes_everything() -> None:
    # Each request grows to 12 tokens (3 blocks); 4 blocks cannot hold two of them.
    sched = make_scheduler(num_blocks=4, block_size=4)
    runner = SimulatedRunner(4, random.Random(1), vocab=1000)
    reqs = [make_request(f"r{i}", [1, 2, 3, 4], 8) for i in range(3)]
    for r in reqs:
        r.eos_token_ids = frozenset()
        sched.add_request(r)
    while sched.has_unfinished():
        step(sched, runner)
    assert sched.num_preemptions > 0
    assert all(r.num_output_tokens == 8 for r in reqs)
    assert sched.kv.num_free_blocks == 4


def test_priority_policy_runs_lower_priority_value_first() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, scheduling_policy="priority",
                           max_num_seqs=1)
    for rid, prio in (("late", 5), ("urgent", 0), ("mid", 2)):
        sched.add_request(make_request(rid, [1, 2, 3], 1, priority=prio))
    order = []
    runner = SimulatedRunner(4, random.Random(0), vocab=1000)
    while sched.has_unfinished():
        order += [r.request_id for r in step(sched, runner)]
    assert order == ["urgent", "mid", "late"]


@pytest.mark.parametrize("chunked", [True, False])
def test_step_budget_and_chunking(chunked: bool) -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=8,
                           enable_chunked_prefill=chunked)
    long = make_request("long", list(range(1, 21)), 2)
    short = make_request("short", [1, 2, 3], 2)
    sched.add_request(short)
    sched.add_request(long)
    out = sched.schedule()
    sizes = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
    if chunked:
        assert sizes == {"short": 3, "long": 5}
    else:  # the long prompt waits: it can never fit an 8-token step unchunked
        assert sizes == {"short": 3}
