"""Paged KV-cache blocks: allocation, reference counts and prefix caching.

A block holds the KV of `block_size` consecutive tokens of one sequence. Full blocks are named by
a hash chain, hash(parent_hash, salt, tokens), so two requests whose prompts share a prefix share
the blocks of that prefix. A block whose ref count falls to zero goes to the back of the free
queue but keeps its hash: it can still be hit until it is reused, and reuse takes the oldest first
(LRU eviction of unreferenced cached blocks).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from worker.engine.request import Request


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


def hash_block(parent_hash: bytes | None, token_ids: list[int], salt: str | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash if parent_hash is not None else (salt or "").encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    """Owns every block: the free queue (oldest first) and the hash → block map."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Insertion-ordered: popping from the front reuses the least recently freed block.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks with {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Takes a reference on cached blocks, pulling unreferenced ones off the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drops a reference; blocks are queued for reuse in the order given."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} released with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        # Two requests can compute the same content in one step; the first block registered
        # keeps the name and the other stays private (it is freed normally).
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def reset_cache(self) -> int:
        """Forgets every cached hash (blocks stay allocated); returns how many were dropped."""
        n = len(self._cached)
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return n

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None


class KVCacheManager:
    """Per-request block tables on top of the pool.

    Prefix caching is used by every request when enabled. When it is disabled, the children of
    one n > 1 request still share their prompt's blocks: their hashes are salted with the
    parent id, so they can hit each other and nothing else.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # The same tables as plain ids, kept in step with _req_blocks: the runner reads them
        # every step, and rebuilding them would cost a list per request per step.
        self._req_block_ids: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table; read-only for callers, valid until the next allocation."""
        return self._req_block_ids.get(request_id, [])

    def uses_cache(self, req: Request) -> bool:
        return self.enable_prefix_caching or req.parent_id is not None

    def _salt(self, req: Request) -> str | None:
        if self.enable_prefix_caching:
            return req.cache_salt
        return f"group:{req.parent_id}"

    def _update_hashes(self, req: Request) -> None:
        hashes = req.block_hashes
        bs = self.block_size
        salt = self._salt(req)
        for i in range(len(hashes), req.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, req.all_token_ids[i * bs:(i + 1) * bs], salt))

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a request that holds no blocks yet: (blocks, num_tokens).

        At least one token is always left to compute, since the step must produce logits.
        """
        if not self.uses_cache(req):
            return [], 0
        self._update_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in req.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    def can_allocate(self, req: Request, num_new_tokens: int,
                     computed: list[KVBlock] | None = None) -> bool:
        computed = computed or []
        held = len(self._req_blocks.get(req.request_id, ()))
        new_blocks = max(0, self._num_blocks_for(req, num_new_tokens, computed) - held
                         - len(computed))
        # Cached blocks nobody references sit in the free queue: reviving them uses free slots.
        revived = sum(1 for b in computed if b.ref_cnt == 0)
        return new_blocks + revived <= self.pool.num_free_blocks

    def _num_blocks_for(self, req: Request, num_new_tokens: int, computed: list[KVBlock]) -> int:
        """Blocks the request holds once `num_new_tokens` more tokens have slots."""
        num_tokens = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed: list[KVBlock] | None = None) -> bool:
        """Makes room for `num_new_tokens` more tokens of `req`; False (and no change) if full.

        `computed` are prefix-cache hits from `get_computed_blocks`, for a request that holds no
        blocks yet; they are appended to its table before the new blocks.
        """
        computed = computed or []
        if not self.can_allocate(req, num_new_tokens, computed):
            return False
        blocks = self._req_blocks.setdefault(req.request_id, [])
        ids = self._req_block_ids.setdefault(req.request_id, [])
        if computed:
            self.pool.touch(computed)
            blocks.extend(computed)
            ids.extend(b.block_id for b in computed)
            self._num_registered[req.request_id] = len(blocks)
        missing = self._num_blocks_for(req, num_new_tokens, computed) - len(blocks)
        if missing > 0:
            new = self.pool.allocate(missing)
            blocks.extend(new)
            ids.extend(b.block_id for b in new)
        return True

    def cache_computed_blocks(self, req: Request) -> None:
        """Names the request's blocks that are now full of computed tokens."""
        if not self.uses_cache(req):
            return
        blocks = self._req_blocks.get(req.request_id)
        if not blocks:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(blocks))
        start = self._num_registered.get(req.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(req)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], req.block_hashes[i])
        self._num_registered[req.request_id] = num_full

    def free(self, req: Request) -> None:
        blocks = self._req_blocks.pop(req.request_id, [])
        self._req_block_ids.pop(req.request_id, None)
        self._num_registered.pop(req.request_id, None)
        # Tail blocks are the least likely to be shared: queue them for reuse first.
        self.pool.release(reversed(blocks))

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_cache()
