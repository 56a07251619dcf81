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
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance.hf
import llguidance.torch
import torch
from llguidance import LLMatcher, LLTokenizer

log = logging.getLogger(__name__)


class GrammarError(RuntimeError):
    """The matcher rejected a token or failed; the engine ends only this request."""


class GrammarMatcher:
    """The engine's LogitsMask for one request."""

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        # Host memory: llguidance writes into it through a raw pointer.
        self._bitmask = torch.empty((1, (vocab_size + 31) // 32), dtype=torch.int32)

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """[ceil(vocab_size / 32)] int32, the packed mask of the next token."""
        if self._bitmask.shape[1] != (vocab_size + 31) // 32:
            raise GrammarError(f"matcher built for another vocabulary than {vocab_size}")
        llguidance.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        self._raise_on_error()
        return self._bitmask[0]

    def accept_token(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            self._raise_on_error()
            raise GrammarError(f"the grammar rejects token {token_id}")

    def accept_tokens(self, token_ids: Iterable[int]) -> None:
        """Advances over tokens produced before (a request resumed from a checkpoint)."""
        for t in token_ids:
            self.accept_token(t)

    @property
    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def _raise_on_error(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())


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
                 max_workers: int = 2, cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
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
        return GrammarMatcher(template.deep_copy(), self.vocab_size)

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
