"""Requests whose grammar is still compiling, held back from the engine until it is ready.

The engine only ever sees requests it can step, so a slow grammar delays its own request and no
other: the batch keeps running while the pool compiles.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from llguidance import LLMatcher

from worker.structured.matcher import GrammarCompiler, GrammarMatcher

T = TypeVar("T")


@dataclass
class _Waiting(Generic[T]):
    request_id: str
    item: T  # what the caller will add to the engine
    compiled: Future[LLMatcher]
    prefix_token_ids: list[int] = field(default_factory=list)


class PendingGrammars(Generic[T]):
    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._waiting: list[_Waiting[T]] = []

    def add(self, request_id: str, item: T, grammar: str,
            prefix_token_ids: list[int] | None = None) -> None:
        """`prefix_token_ids`: output tokens produced before (a resumed request); the matcher
        is advanced over them before the request starts."""
        self._waiting.append(_Waiting(request_id, item, self.compiler.submit(grammar),
                                      list(prefix_token_ids or [])))

    def __len__(self) -> int:
        return len(self._waiting)

    def any_ready(self) -> bool:
        return any(w.compiled.done() for w in self._waiting)

    def pop_ready(self) -> list[tuple[str, T, GrammarMatcher | None, str | None]]:
        """(request id, item, matcher, None) for each compiled grammar, or (id, item, None,
        why) where it failed or rejects the prefix."""
        done = [w for w in self._waiting if w.compiled.done()]
        self._waiting = [w for w in self._waiting if not w.compiled.done()]
        out: list[tuple[str, T, GrammarMatcher | None, str | None]] = []
        for w in done:
            try:
                matcher = self.compiler.matcher(w.compiled.result())
                matcher.accept_tokens(w.prefix_token_ids)
            except Exception as e:  # a compile or prefix failure ends this request only
                out.append((w.request_id, w.item, None, str(e)))
                continue
            out.append((w.request_id, w.item, matcher, None))
        return out

    def remove(self, request_ids: list[str]) -> list[str]:
        """Drops waiting requests (aborted); returns the ids that were waiting."""
        gone = [w.request_id for w in self._waiting if w.request_id in request_ids]
        self._waiting = [w for w in self._waiting if w.request_id not in request_ids]
        return gone
