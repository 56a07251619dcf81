"""Grammar matchers for the engine: one per request, built from a cached compiled grammar.

`GrammarMatcher` implements the engine's `LogitsMask` hook: each step it fills a packed int32
bitmask (bit t of word t // 32 set = token t allowed) that the sampler unpacks for the whole batch
in one op. The grammar allows EOS only where it accepts, and only EOS once it is complete, so a
request ends with finish_reason "stop" exactly when its output is whole.

Compiling a grammar (building llguidance's lexer and parser tables against the tokenizer) takes
from under a millisecond to about a second; `GrammarCompiler` does it in a thread pool, caches the
result by grammar text, and hands each request a cheap copy of the compiled matcher.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance.hf
import torch
from llguidance import LLMatcher, LLTokenizer

log = logging.getLogger(__name__)


class GrammarError(RuntimeError):
    """The matcher rejected a token or failed; the engine ends only this request."""


class GrammarMatcher:
    """The engine's LogitsMask for one request.

    With `prefetch`, the next mask is computed in the background as soon as a token is accepted,
    so it is built while the engine runs its next forward pass instead of after it, and
    `allowed_tokens` only waits for it. That pays where the model runs on a GPU and the host
    idles meanwhile; on the CPU the fill would compete with the model for the same cores. The matcher is touched by one thread at a time: the engine asks for a mask only
    after its previous token was accepted.
    """

    def __init__(self, matcher: LLMatcher, vocab_size: int, *, prefetch: bool = False) -> None:
        self._matcher = matcher
        # Host memory: llguidance writes into it through a raw pointer.
        self._bitmask = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
        self._bitmask_ptr = self._bitmask.data_ptr()
        self._bitmask_bytes = self._bitmask.numel() * 4
        self._prefetch = prefetch
        self._next: Future[None] | None = None
        self._fresh = False  # the bitmask is that of the matcher's current state
        self._schedule_fill()

    @property
    def matcher(self) -> LLMatcher:
        """The llguidance matcher, once no background fill is using it."""
        self._wait()
        return self._matcher

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """[ceil(vocab_size / 32)] int32, the packed mask of the next token."""
        if self._bitmask.shape[0] != (vocab_size + 31) // 32:
            raise GrammarError(f"matcher built for another vocabulary than {vocab_size}")
        self._wait()
        if not self._fresh:
            self._fill()
        self._raise_on_error()
        return self._bitmask

    def fill_packed(self, out: torch.Tensor) -> bool:
        """Writes the next token's packed mask into `out`, a contiguous int32 row of the
        sampler's host buffer for the whole batch: llguidance fills it in place, no copy."""
        if out.shape[0] != self._bitmask.shape[0]:
            raise GrammarError(f"matcher built for another vocabulary ({self._bitmask.shape[0]} "
                               f"mask words, the batch has {out.shape[0]})")
        self._wait()
        if self._fresh:  # filled in the background already
            out.copy_(self._bitmask)
        else:
            self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), self._bitmask_bytes)
        self._raise_on_error()
        return True

    def accept_token(self, token_id: int) -> None:
        self._wait()  # an accepted token must not race a fill of the old state
        self._fresh = False
        if not self._matcher.consume_token(token_id):
            self._raise_on_error()
            raise GrammarError(f"the grammar rejects token {token_id}")
        self._schedule_fill()

    def accept_tokens(self, token_ids: Iterable[int]) -> None:
        """Advances over tokens produced before (a request resumed from a checkpoint)."""
        for t in token_ids:
            self.accept_token(t)

    @property
    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def _fill(self) -> None:
        # What llguidance.torch.fill_next_token_bitmask does, without its per-call checks:
        # the buffer is ours, contiguous int32 host memory of the right size.
        self._matcher.unsafe_compute_mask_ptr(self._bitmask_ptr, self._bitmask_bytes)
        self._fresh = True

    def _schedule_fill(self) -> None:
        if self._prefetch:
            self._next = _fill_pool().submit(self._fill)

    def _wait(self) -> None:
        if self._next is not None:
            next_, self._next = self._next, None
            next_.result()

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())


_POOL: ThreadPoolExecutor | None = None


def _fill_pool() -> ThreadPoolExecutor:
    """The threads that fill every matcher's next mask, shared by the process.

    llguidance drops the GIL while it fills, so the fills of a step's rows run side by side on
    spare cores (a quarter of them, at most 4) and are done sooner after the tokens are
    accepted; the stepping thread keeps its own core."""
    global _POOL
    if _POOL is None:
        workers = max(1, min(4, (os.cpu_count() or 1) // 4))
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sluice-mask")
    return _POOL


def build_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]
                    ) -> LLTokenizer:
    """llguidance's view of the tokenizer, sized to the model's vocabulary (embedding rows past
    the tokenizer's are never allowed) and ending on the engine's own EOS ids."""
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                        eos_token=sorted(eos_token_ids))


class GrammarCompiler:
    """Compiles grammars off the caller's thread; at most `cache_size` compiled ones kept.

    `tokenizer` may be a callable that builds it: it is then called once, on the first compile,
    in the pool, so a worker that never sees a grammar never pays for it (about a second at a
    128k vocabulary) and the one that does never stalls its step loop on it.
    """

    def __init__(self, tokenizer: LLTokenizer | Callable[[], LLTokenizer], vocab_size: int, *,
                 max_workers: int = 2, cache_size: int = 256, prefetch: bool = False) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.prefetch = prefetch  # matchers build their next mask in the background
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="sluice-grammar")
        self._cache: OrderedDict[str, Future[LLMatcher]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0

    @property
    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if not isinstance(self._tokenizer, LLTokenizer):
                self._tokenizer = self._tokenizer()
            return self._tokenizer

    def submit(self, grammar: str) -> Future[LLMatcher]:
        """The compiled grammar, shared by every request with the same text: treat it as a
        template and take a `matcher` from it."""
        with self._lock:
            fut = self._cache.get(grammar)
            if fut is not None:
                self._cache.move_to_end(grammar)
                return fut
            fut = self._pool.submit(self._compile, grammar)
            self._cache[grammar] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return fut

    def matcher(self, template: LLMatcher) -> GrammarMatcher:
        """A fresh matcher in the template's start state."""
        return GrammarMatcher(template.deep_copy(), self.vocab_size, prefetch=self.prefetch)

    def compile(self, grammar: str) -> GrammarMatcher:
        """Blocking: for offline use and tests."""
        return self.matcher(self.submit(grammar).result())

    def _compile(self, grammar: str) -> LLMatcher:
        # The constructor drops the GIL while it builds, so the engine keeps stepping meanwhile.
        m = LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            with self._lock:
                self._cache.pop(grammar, None)  # do not keep failures; they are cheap to redo
            raise GrammarError(f"cannot compile the grammar: {m.get_error()}")
        self.num_compiled += 1
        return m

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
