"""Turns engine token ids into text and result objects: detokenization, stop strings, logprobs.

Shared by the offline `LLM` and the worker service, so both end requests and shape results the
same way. The engine core never sees text; this side tells it when a stop string ended a
completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.detokenizer import IncrementalDetokenizer, joined
from worker.engine.engine import EngineOutput
from worker.engine.sampler import TokenLogprobs
from worker.engine.sampling_params import SamplingParams
from worker.tokenizer import Tokenizer


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    error: str | None = None
    # The text in pieces as it streamed (`text` joins them): appending to one string would copy
    # the whole reply for every token.
    _pieces: list[str] = field(default_factory=list, repr=False)

    @property
    def text(self) -> str:
        return joined(self._pieces)

    @text.setter
    def text(self, value: str) -> None:
        self._pieces[:] = [value]

    def add_text(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass
class CompletionDelta:
    """What a streaming client receives for one completion after one step."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    error: str | None


def merge_deltas(deltas: list[CompletionDelta]) -> list[CompletionDelta]:
    """Several steps' deltas as one per completion, in the order completions first appear:
    text, tokens and logprobs joined in step order, the end taken from the last (no delta
    follows a completion's end). What the client and the checkpoint get is the same as from
    the steps one by one, in fewer pieces."""
    merged: dict[tuple[str, int], CompletionDelta] = {}
    for d in deltas:
        key = (d.request_id, d.index)
        m = merged.get(key)
        if m is None:
            merged[key] = d
            continue
        merged[key] = CompletionDelta(
            d.request_id, d.index, m.text + d.text, m.token_ids + d.token_ids,
            None if m.logprobs is None or d.logprobs is None else m.logprobs + d.logprobs,
            d.finish_reason, d.stop_reason, d.error)
    return list(merged.values())


@dataclass
class _Completion:
    output: CompletionOutput
    detok: IncrementalDetokenizer | None  # None when the model has no tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, tuple[RequestOutput, SamplingParams, list[_Completion]]] = {}
        # Engine request id -> (request id, completion index), for a completion that runs in
        # the engine as a request of its own (resumed from a checkpoint).
        self._routes: dict[str, tuple[str, int]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        completions = []
        for index in range(params.n):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
            out = CompletionOutput(index=index, logprobs=[] if params.logprobs is not None else None,
                                   cumulative_logprob=0.0 if params.logprobs is not None else None)
            completions.append(_Completion(out, detok))
        result = RequestOutput(request_id, prompt, list(prompt_token_ids),
                               [c.output for c in completions])
        self._requests[request_id] = (result, params, completions)

    def get(self, request_id: str) -> RequestOutput | None:
        entry = self._requests.get(request_id)
        return entry[0] if entry else None

    def pop(self, request_id: str) -> RequestOutput | None:
        entry = self._requests.pop(request_id, None)
        if self._routes:
            for engine_id in [e for e, (rid, _) in self._routes.items() if rid == request_id]:
                del self._routes[engine_id]
        return entry[0] if entry else None

    def route(self, engine_request_id: str, request_id: str, index: int) -> None:
        """The outputs of the engine's single-completion request `engine_request_id` belong to
        completion `index` of `request_id`: completions resumed from different prefixes cannot
        share one engine request."""
        self._routes[engine_request_id] = (request_id, index)

    def owner(self, engine_request_id: str) -> tuple[str, int]:
        """(request id, completion index) of an engine request's first completion."""
        return self._routes.get(engine_request_id, (engine_request_id, 0))

    def replay(self, request_id: str, index: int, chunks: list[list[int]],
               finish_reason: str | None, stop_reason: int | str | None) -> CompletionOutput:
        """Feeds a completion the tokens an earlier run produced, step by step as they were
        produced, so its text and detokenizer state are those the client saw; returns it."""
        outputs = [EngineOutput(request_id, index, chunk) for chunk in chunks]
        if finish_reason is not None:
            outputs.append(EngineOutput(request_id, index, [], finish_reason=finish_reason,
                                        stop_reason=stop_reason))
        self.process(outputs)
        return self._requests[request_id][0].outputs[index]

    def process(self, engine_outputs: list[EngineOutput]
                ) -> tuple[list[CompletionDelta], list[tuple[str, int, str]]]:
        """Applies one step's engine outputs.

        Returns the deltas for clients and the completions a stop string just ended, as
        (engine request id, its completion index, stop string): the caller must end those in
        the engine.
        """
        deltas: list[CompletionDelta] = []
        stops: list[tuple[str, int, str]] = []
        for eo in engine_outputs:
            rid, index = self._routes.get(eo.request_id, (eo.request_id, eo.index))
            entry = self._requests.get(rid)
            if entry is None:
                continue
            result, _, completions = entry
            comp = completions[index]
            out = comp.output
            if out.finished:  # already ended by a stop string; late tokens are dropped
                continue
            result.num_cached_tokens = max(result.num_cached_tokens, eo.num_cached_tokens)
            out.token_ids += eo.new_token_ids
            new_lps = self._logprobs(eo.new_logprobs) if out.logprobs is not None else None
            if new_lps is not None and out.logprobs is not None:
                out.logprobs += new_lps
                out.cumulative_logprob = (out.cumulative_logprob or 0.0) + sum(
                    lp.logprob for lp in eo.new_logprobs)
            text = ""
            if comp.detok is not None:
                text = comp.detok.update(eo.new_token_ids)
                if eo.finished and not comp.detok.finished:
                    # Held-back text can itself complete a stop string, so check after flushing.
                    text += comp.detok.flush()
                if comp.detok.finished:
                    out.finish_reason, out.stop_reason = "stop", comp.detok.stop_reason
                    if not eo.finished:
                        stops.append((eo.request_id, eo.index, str(comp.detok.stop_reason)))
            if out.finish_reason is None and eo.finished:
                out.finish_reason, out.stop_reason, out.error = (
                    eo.finish_reason, eo.stop_reason, eo.error)
            out.add_text(text)
            deltas.append(CompletionDelta(rid, index, text, eo.new_token_ids, new_lps,
                                          out.finish_reason, out.stop_reason, out.error))
        return deltas, stops

    def _logprobs(self, lps: list[TokenLogprobs]) -> list[dict[int, Logprob]]:
        out = []
        for lp in lps:
            entry = {lp.token_id: Logprob(lp.logprob, lp.rank, self._decode_one(lp.token_id))}
            for rank, (tid, value) in enumerate(zip(lp.top_token_ids, lp.top_logprobs,
                                                    strict=True), start=1):
                if tid not in entry:
                    entry[tid] = Logprob(value, rank, self._decode_one(tid))
            out.append(entry)
        return out

    def _decode_one(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
