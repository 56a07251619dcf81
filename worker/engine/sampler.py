"""Turns one step's logits into next tokens.

Per row: raw logprobs, then the structured-output mask, min_tokens, penalties, and finally
greedy argmax or temperature/top-k/top-p/min-p sampling. Everything runs batched on the logits'
device; per-row parameters travel there as small tensors, and results come back to the host in a
single transfer at the end, so the step never waits on the device midway.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.engine.request import Request
from worker.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# Exponential draws can be exactly 0; dividing a zero probability by 0 would give NaN, which
# argmax would pick. The smallest normal float keeps the race well defined.
_MIN_EXP_DRAW = torch.finfo(torch.float32).tiny


@dataclass
class TokenLogprobs:
    token_id: int  # the sampled token
    logprob: float  # its log-probability under the raw model distribution
    rank: int  # 1-based rank of the sampled token in that distribution (1 = most likely)
    top_token_ids: list[int]  # the params.logprobs most likely tokens, best first (may be empty)
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row of logits
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None
    errors: list[str | None]  # set where that row's logits_mask failed; its token is meaningless


class PendingSample:
    """A batch's sampling, queued on the device; `result()` brings it to the host (once)."""

    def __init__(self, sampler: Sampler, tokens: torch.Tensor, raw: _RawLogprobs | None,
                 masks: _MaskState | None, params: list[SamplingParams],
                 errors: list[str | None]) -> None:
        self.tokens = tokens  # [num_reqs] int64 on the device: the next step's inputs
        self._raw, self._masks, self._params, self._errors = raw, masks, params, errors
        flat = sampler._pack(tokens, raw, masks)
        self._event: torch.cuda.Event | None = None
        if flat.device.type == "cuda":
            # Lands in pinned memory without blocking the host; the event says when.
            self._flat = flat.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._flat = flat
        self._result: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            self._result = Sampler._unpack(self._flat.tolist(), self._raw, self._masks,
                                           self._params, self._errors)
        return self._result


@dataclass
class _RawLogprobs:
    """Raw-distribution logprobs of the rows that asked for them, kept until the token is known."""

    rows: list[int]
    index: torch.Tensor | None  # [n_lp] row ids; None when every row asked
    logprobs: torch.Tensor  # [n_lp, vocab] float32
    top_ids: torch.Tensor | None  # [n_lp, max_k]; None when max_k == 0
    top_values: torch.Tensor | None  # [n_lp, max_k]


@dataclass
class _MaskState:
    """Masked rows and what turns into their errors once the tokens are on the host.

    Packed host masks (the usual case) are checked there: a row had a token to give exactly when
    its sampled token is one the mask allows and min_tokens does not block (a row with any finite
    logit never samples a -inf one), so nothing is computed on the device for it. Other masks
    carry device-side flags in `empty` and `dead` instead.
    """

    rows: list[int]
    vocab_size: int
    packed: np.ndarray | None = None  # [n_mask, words] int32 host masks, bit t = token t allowed
    blocked: dict[int, set[int]] | None = None  # row -> the stop tokens min_tokens blocked there
    empty: torch.Tensor | None = None  # [n_mask] bool: the mask itself allowed nothing
    dead: torch.Tensor | None = None  # [n_mask] bool: nothing left once min_tokens blocked too

    def error(self, j: int, row: int, token_id: int, dead: float = 0.0, empty: float = 0.0
              ) -> str | None:
        """The error of masked row j (batch row `row`), or None when its token stands."""
        if self.packed is None:
            if empty:
                return _EMPTY_MASK
            return _ONLY_BLOCKED if dead else None
        blocked = self.blocked.get(row, ()) if self.blocked else ()
        words = self.packed[j]
        if (int(words[token_id >> 5]) >> (token_id & 31)) & 1 and token_id not in blocked:
            return None
        if not _any_bit(words, self.vocab_size):
            return _EMPTY_MASK
        if blocked:
            return _ONLY_BLOCKED
        return "ValueError: the logits were not finite where the mask allows tokens"


class _History:
    """A request's token history in array form, kept across steps for the penalties.

    Rebuilding it from Python lists every step would cost time linear in prompt + output length
    per step; here the prompt is converted once and the output grows by the new tokens only.
    """

    def __init__(self) -> None:
        self.prompt_seen: torch.Tensor | None = None  # [vocab] bool, on the logits' device
        self.prompt_len = 0  # prompt length prompt_seen was built from
        self.output = np.empty(0, dtype=np.int64)  # output token ids, filled up to num_output
        self.num_output = 0

    def output_ids(self, req: Request) -> np.ndarray:
        tokens = req.output_token_ids
        n = len(tokens)
        if n < self.num_output:
            self.num_output = 0  # the output was rewound: recount from the start
        if n > len(self.output):
            grown = np.empty(max(n, 2 * len(self.output), 16), dtype=np.int64)
            grown[:self.num_output] = self.output[:self.num_output]
            self.output = grown
        if n > self.num_output:
            self.output[self.num_output:n] = tokens[self.num_output:n]
            self.num_output = n
        return self.output[:n]


class Sampler:
    """Samples one token per row.

    All sampling state lives on the requests (history, generator); the sampler only caches
    array forms of each request's history, dropped when the request is garbage-collected.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        # Keyed by id(request): requests are unhashable; a finalizer evicts each entry.
        self._histories: dict[int, _History] = {}

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        return self.sample_async(logits, requests).result()

    def sample_async(self, logits: torch.Tensor, requests: Sequence[Request]) -> PendingSample:
        """Queues the sampling on the logits' device; the host reads the result later, so the
        next step can be queued behind this one first."""
        num_reqs = len(requests)
        if logits.dim() != 2 or logits.shape[0] != num_reqs or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [{num_reqs}, {self.vocab_size}] (one row per "
                             f"request), got {list(logits.shape)}")
        if num_reqs == 0:
            return PendingSample(self, logits.new_empty(0, dtype=torch.long), None, None, [], [])
        params = [req.sampling_params for req in requests]
        errors: list[str | None] = [None] * num_reqs

        # The stages below edit logits in place; the caller's tensor must stay raw. An all-greedy
        # batch with no masks or penalties reads only, so it skips the copy.
        edits = any(_is_random(p) or has_penalty(p) or p.min_tokens > 0 for p in params) or any(
            req.logits_mask is not None for req in requests)
        # logits: [num_reqs, vocab] float32
        if logits.dtype != torch.float32:
            logits = logits.float()
        elif edits:
            logits = logits.clone()

        raw = self._raw_logprobs(logits, params)
        # min_tokens runs before the mask (both only set -inf, so the order does not change the
        # result) so that a mask leaving only blocked stop tokens is caught as a dead row too.
        blocked = self._block_stop_tokens(logits, requests)
        masks = self._apply_masks(logits, requests, errors, blocked)
        self._apply_penalties(logits, requests)
        tokens = self._sample(logits, requests)  # [num_reqs] int64
        return PendingSample(self, tokens, raw, masks, params, errors)

    # -- stages -------------------------------------------------------------------------------

    def _raw_logprobs(self, logits: torch.Tensor,
                      params: list[SamplingParams]) -> _RawLogprobs | None:
        """log_softmax of the unprocessed logits: users ask for the model's own distribution."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return None
        index = None if len(rows) == len(params) else self._tensor(rows, torch.long, logits)
        # log_softmax allocates, so later in-place edits of logits leave this untouched.
        selected = logits if index is None else logits.index_select(0, index)
        logprobs = torch.log_softmax(selected, dim=-1)  # [n_lp, vocab]
        max_k = min(max(params[i].logprobs or 0 for i in rows), self.vocab_size)
        top_ids = top_values = None
        if max_k > 0:
            top_values, top_ids = logprobs.topk(max_k, dim=-1)  # [n_lp, max_k], best first
        return _RawLogprobs(rows, index, logprobs, top_ids, top_values)

    def _block_stop_tokens(self, logits: torch.Tensor, requests: Sequence[Request]
                           ) -> dict[int, set[int]]:
        """Until min_tokens outputs exist, no token that would end the sequence may be chosen.
        Returns the blocked tokens by row."""
        rows: list[int] = []
        token_ids: list[int] = []
        for i, req in enumerate(requests):
            p = req.sampling_params
            if req.num_output_tokens >= p.min_tokens:
                continue
            stop = set(p.stop_token_ids)
            # Under ignore_eos, EOS does not end the sequence, so it stays an ordinary token.
            if not p.ignore_eos:
                stop |= req.eos_token_ids
            for t in stop:
                if 0 <= t < self.vocab_size:
                    rows.append(i)
                    token_ids.append(t)
        if rows:
            index = self._tensor([rows, token_ids], torch.long, logits)  # [2, n_pairs]
            logits.index_put_((index[0], index[1]), logits.new_full((), _NEG_INF))
        blocked: dict[int, set[int]] = {}
        for i, t in zip(rows, token_ids, strict=True):
            blocked.setdefault(i, set()).add(t)
        return blocked

    def _apply_masks(self, logits: torch.Tensor, requests: Sequence[Request],
                     errors: list[str | None], blocked: dict[int, set[int]]
                     ) -> _MaskState | None:
        """Structured output: disallowed tokens get -inf. A failing hook fails only its row.

        Hooks with a `fill_packed(row)` method (the grammar matcher) write their packed mask
        straight into one host buffer for the batch: no tensor, check or copy per row."""
        rows: list[int] = []
        # Pinned on a GPU host, so the packed rows cross without waiting for the device.
        packed = torch.empty((len(requests), (self.vocab_size + 31) // 32), dtype=torch.int32,
                             pin_memory=logits.device.type == "cuda")
        other: dict[int, torch.Tensor] = {}  # row of packed -> a bool or device mask instead
        for i, req in enumerate(requests):
            mask = req.logits_mask
            if mask is None:
                continue
            try:
                fill = getattr(mask, "fill_packed", None)
                if fill is not None:
                    if not fill(packed[len(rows)]):
                        continue
                else:
                    allowed = mask.allowed_tokens(self.vocab_size)
                    if allowed is None:
                        continue
                    allowed = self._check_mask(allowed)
                    if allowed.dtype == torch.int32 and allowed.device.type == "cpu":
                        packed[len(rows)].copy_(allowed)
                    else:
                        other[len(rows)] = allowed
            except Exception as e:
                # The row stays unrestricted; the engine finishes that request with this error.
                errors[i] = f"{type(e).__name__}: {e}"
                continue
            rows.append(i)
        if not rows:
            return None
        # bias: [n_mask, vocab] float32, 0 where allowed and -inf elsewhere; empty: [n_mask]
        state = _MaskState(rows, self.vocab_size)
        if other:
            bias, state.empty = self._mask_bias(
                [other.get(k, packed[k]) for k in range(len(rows))], logits.device)
        else:  # the usual case: packed rows cross to the device together, 32x smaller
            host = packed[:len(rows)]
            bias = _bits_to_bias(self._to_device(host, logits.device), self.vocab_size)
            state.packed, state.blocked = host.numpy(), blocked
        # logits is the sampler's own copy here (a mask counts as an edit), so it is edited in
        # place: each pass over [n, vocab] counts at a large vocabulary. Adding the bias is one
        # fused pass, cheaper than filling through a bool mask (logits are finite: no inf - inf).
        index = None
        if len(rows) == len(requests):
            logits.add_(bias)
        else:
            index = self._tensor(rows, torch.long, logits)
            logits.index_add_(0, index, bias)
        if other:
            # A row with no finite logit left samples a meaningless token (NaN probabilities in
            # that row alone); it is discarded with the error these flags raise after the one
            # transfer. (Packed rows are checked on the host instead: see _MaskState.)
            sub = logits if index is None else logits.index_select(0, index)  # [n_mask, vocab]
            state.dead = torch.isneginf(sub.amax(dim=-1))  # [n_mask]
        return state

    def _mask_bias(self, masks: list[torch.Tensor], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row masks, bool [vocab] or packed int32 [ceil(vocab / 32)], as one additive bias
        [n, vocab] on `device` and which rows allow nothing [n]: the general case, for a batch
        with some bool or device-side mask (all-packed host rows take `_apply_masks`' path)."""
        vocab = self.vocab_size
        if all(m.device.type == "cpu" and m.dtype == torch.bool for m in masks):
            # Hooks usually build masks on the host: stack there and cross over once.
            allowed = self._to_device(torch.stack(masks), device)
            return torch.where(allowed, 0.0, _NEG_INF), ~allowed.any(dim=-1)
        bias = torch.cat([
            _bits_to_bias(self._to_device(m, device)[None], vocab) if m.dtype == torch.int32
            else torch.where(self._to_device(m, device)[None], 0.0, _NEG_INF) for m in masks])
        return bias, torch.isneginf(bias.amax(dim=-1))

    def _check_mask(self, allowed: object) -> torch.Tensor:
        mask = torch.as_tensor(allowed)
        if mask.dtype == torch.int32:
            words = (self.vocab_size + 31) // 32
            if tuple(mask.shape) != (words,):
                raise ValueError(f"logits mask packed as int32 must have shape [{words}], "
                                 f"got {list(mask.shape)}")
            return mask
        if mask.dtype != torch.bool:
            raise TypeError(f"logits mask must be a bool or packed int32 tensor, got dtype "
                            f"{mask.dtype}")
        if tuple(mask.shape) != (self.vocab_size,):
            raise ValueError(f"logits mask must have shape [{self.vocab_size}], "
                             f"got {list(mask.shape)}")
        return mask

    def _apply_penalties(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """Repetition over prompt and output; presence and frequency over output only."""
        rows = [i for i, req in enumerate(requests) if has_penalty(req.sampling_params)]
        if not rows:
            return
        pen_reqs = [requests[i] for i in rows]
        pen = [req.sampling_params for req in pen_reqs]
        index = None if len(rows) == len(requests) else self._tensor(rows, torch.long, logits)
        sub = logits if index is None else logits.index_select(0, index)  # [n_pen, vocab]

        # Counts of each output token: [n_pen, vocab], by one scatter_add over padded ids.
        output_ids = [self._history(req).output_ids(req) for req in pen_reqs]
        output_counts = _bincount_rows(self._padded(output_ids, logits), self.vocab_size)

        if any(p.repetition_penalty != 1.0 for p in pen):
            rep = self._tensor([p.repetition_penalty for p in pen], torch.float32,
                               logits)[:, None]  # [n_pen, 1]
            no_prompt = logits.new_zeros(self.vocab_size, dtype=torch.bool)
            prompt_seen = torch.stack([
                self._prompt_seen(req, logits.device) if p.repetition_penalty != 1.0
                else no_prompt for req, p in zip(pen_reqs, pen, strict=True)])  # [n_pen, vocab]
            seen = prompt_seen | (output_counts > 0)
            # Dividing positive and multiplying negative logits both make the token less likely.
            penalized = torch.where(sub > 0, sub / rep, sub * rep)
            sub = torch.where(seen, penalized, sub)

        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in pen):
            pf = self._tensor([[p.presence_penalty, p.frequency_penalty] for p in pen],
                              torch.float32, logits)  # [n_pen, 2]
            sub = sub - pf[:, 0:1] * (output_counts > 0) - pf[:, 1:2] * output_counts

        if index is None:
            logits.copy_(sub)
        else:
            logits.index_copy_(0, index, sub)

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Greedy rows take the argmax; random rows race probabilities against Exp(1) draws."""
        rand_rows = [i for i, req in enumerate(requests) if _is_random(req.sampling_params)]
        if not rand_rows:
            return logits.argmax(dim=-1)  # ties go to the lowest token id
        index = None if len(rand_rows) == len(requests) else self._tensor(rand_rows, torch.long,
                                                                          logits)
        sub = logits if index is None else logits.index_select(0, index)  # [n_rand, vocab]
        sampled = self._sample_random(sub, [requests[i] for i in rand_rows])
        if index is None:
            return sampled
        tokens = logits.argmax(dim=-1)
        tokens.index_copy_(0, index, sampled)
        return tokens

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits: [n, vocab], edited in place. Returns [n] int64 token ids."""
        vocab = self.vocab_size
        params = [req.sampling_params for req in requests]
        # One transfer for all per-row knobs: temperature, top_k, top_p, log(min_p).
        knobs = self._tensor(
            [[p.temperature,
              float(p.top_k if 0 < p.top_k < vocab else vocab),
              # top_p = 1 must be a no-op; an inf bound keeps float rounding in the cumsum from
              # dropping tail tokens.
              p.top_p if p.top_p < 1.0 else math.inf,
              math.log(p.min_p) if p.min_p > 0 else _NEG_INF] for p in params],
            torch.float32, logits)  # [n, 4]

        if any(p.temperature != 1.0 for p in params):
            logits.div_(knobs[:, 0:1])
        self._truncate(logits, params, knobs)
        if any(p.min_p > 0 for p in params):
            # prob < min_p * max_prob  <=>  logit - max_logit < log(min_p); no softmax needed.
            max_logit = logits.amax(dim=-1, keepdim=True)
            logits.masked_fill_(logits - max_logit < knobs[:, 3:4], _NEG_INF)

        probs = logits.softmax(dim=-1)  # [n, vocab]
        q = self._exponential_draws(requests, probs)  # [n, vocab]
        # argmax(p / q) with q ~ Exp(1) draws token i with probability p_i (exponential race),
        # and lets each row use its own generator without a per-row multinomial call.
        return probs.div_(q).argmax(dim=-1)

    def _truncate(self, logits: torch.Tensor, params: list[SamplingParams],
                  knobs: torch.Tensor) -> None:
        """top_k, then top_p over what top_k kept, on just the rows that use them.

        Tokens tied with the k-th largest logit are all kept, so a cut never depends on how
        equal values happen to be ordered.
        """
        vocab = self.vocab_size
        rows = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
        if not rows:
            return
        index = None if len(rows) == len(params) else self._tensor(rows, torch.long, logits)
        sub = logits if index is None else logits.index_select(0, index)  # [n_cut, vocab]
        cut = knobs if index is None else knobs.index_select(0, index)  # [n_cut, 4]
        k = cut[:, 1:2].long()  # [n_cut, 1]; vocab where top_k is off

        if all(params[j].top_p >= 1.0 for j in rows):
            # top_k alone: a partial selection finds each k-th value without a full sort.
            max_k = max(params[j].top_k for j in rows)
            kth = sub.topk(max_k, dim=-1).values.gather(1, k - 1)  # [n_cut, 1]
            sub.masked_fill_(sub < kth, _NEG_INF)
        else:
            # Stable sort: among equal logits the lowest id comes first at the top_p boundary.
            sorted_logits, sorted_ids = sub.sort(dim=-1, descending=True, stable=True)
            if any(0 < params[j].top_k < vocab for j in rows):
                kth = sorted_logits.gather(1, k - 1)
                sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
            probs = sorted_logits.softmax(dim=-1)
            # Keep a token while the mass strictly before it is below top_p: the smallest set
            # reaching top_p. The first token's preceding mass is 0, so it always survives.
            mass_before = probs.cumsum(dim=-1) - probs
            sorted_logits.masked_fill_(mass_before >= cut[:, 2:3], _NEG_INF)
            sub.scatter_(1, sorted_ids, sorted_logits)

        if index is not None:
            logits.index_copy_(0, index, sub)

    def _exponential_draws(self, requests: list[Request], like: torch.Tensor) -> torch.Tensor:
        """One vocab-sized Exp(1) row per request: from its own generator when seeded."""
        seeded = [j for j, req in enumerate(requests) if req.generator is not None]
        q = torch.empty_like(like)  # [n, vocab]
        if not seeded:
            return q.exponential_().clamp_min_(_MIN_EXP_DRAW)
        unseeded = [j for j, req in enumerate(requests) if req.generator is None]
        # Each seeded row draws a fresh standalone row, so its numbers depend only on its
        # generator's state, never on the row's position or the batch around it.
        draws = [self._draw_row(requests[j].generator, like.device) for j in seeded]
        q.index_copy_(0, self._tensor(seeded, torch.long, like), torch.stack(draws))
        if unseeded:
            shared = torch.empty((len(unseeded), like.shape[1]), dtype=torch.float32,
                                 device=like.device).exponential_()
            q.index_copy_(0, self._tensor(unseeded, torch.long, like), shared)
        return q.clamp_min_(_MIN_EXP_DRAW)

    def _draw_row(self, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        # A generator lives on one device; a CPU generator with CUDA logits still works (the row
        # is drawn on the host and copied), it is just slower than a generator on the device.
        row = torch.empty(self.vocab_size, dtype=torch.float32, device=generator.device)
        return self._to_device(row.exponential_(generator=generator), device)

    # -- result ---------------------------------------------------------------------------------

    @staticmethod
    def _pack(tokens: torch.Tensor, raw: _RawLogprobs | None,
              masks: _MaskState | None) -> torch.Tensor:
        """Every result in one float64 vector, so the host reads the device once."""
        # float64 holds int token ids and ranks exactly, and float32 logprobs without rounding.
        parts: list[torch.Tensor] = [tokens]
        if raw is not None:
            chosen = tokens if raw.index is None else tokens.index_select(0, raw.index)
            chosen_lp = raw.logprobs.gather(1, chosen[:, None])  # [n_lp, 1]
            # Rank counts strictly better tokens, so tied tokens share the better rank.
            rank = (raw.logprobs > chosen_lp).sum(dim=-1) + 1  # [n_lp]
            parts += [chosen_lp, rank]
            if raw.top_ids is not None and raw.top_values is not None:
                parts += [raw.top_ids, raw.top_values]
        if masks is not None and masks.empty is not None and masks.dead is not None:
            parts += [masks.empty, masks.dead]
        return torch.cat([t.reshape(-1).to(torch.float64) for t in parts])

    @staticmethod
    def _unpack(flat: list[float], raw: _RawLogprobs | None, masks: _MaskState | None,
                params: list[SamplingParams], errors: list[str | None]) -> SamplerOutput:
        num_reqs = len(params)
        token_ids = [int(t) for t in flat[:num_reqs]]
        pos = num_reqs
        logprobs: list[TokenLogprobs | None] = [None] * num_reqs
        if raw is not None:
            n_lp = len(raw.rows)
            chosen_values = flat[pos:pos + n_lp]
            ranks = flat[pos + n_lp:pos + 2 * n_lp]
            pos += 2 * n_lp
            max_k = 0 if raw.top_ids is None else raw.top_ids.shape[1]
            top_ids = flat[pos:pos + n_lp * max_k]
            top_values = flat[pos + n_lp * max_k:pos + 2 * n_lp * max_k]
            pos += 2 * n_lp * max_k
            for j, i in enumerate(raw.rows):
                k = min(params[i].logprobs or 0, max_k)
                start = j * max_k
                logprobs[i] = TokenLogprobs(
                    token_id=token_ids[i],
                    logprob=chosen_values[j],
                    rank=int(ranks[j]),
                    top_token_ids=[int(t) for t in top_ids[start:start + k]],
                    top_logprobs=top_values[start:start + k],
                )
        if masks is not None:
            n_mask = len(masks.rows)
            # Device-side flags (empty, then dead) travel only for masks not checked on the host.
            flags = flat[pos:pos + 2 * n_mask] if masks.packed is None else None
            for j, i in enumerate(masks.rows):
                error = (masks.error(j, i, token_ids[i]) if flags is None else
                         masks.error(j, i, token_ids[i], dead=flags[n_mask + j], empty=flags[j]))
                if error is not None:
                    errors[i] = error
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs, errors=errors)

    # -- history and host-to-device helpers -------------------------------------------------------

    def _history(self, req: Request) -> _History:
        key = id(req)
        history = self._histories.get(key)
        if history is None:
            history = self._histories[key] = _History()
            # The finalizer holds no reference to the request, so it does not keep it alive.
            weakref.finalize(req, self._histories.pop, key, None)
        return history

    def _prompt_seen(self, req: Request, device: torch.device) -> torch.Tensor:
        """[vocab] bool: which tokens the prompt contains; built once per request."""
        history = self._history(req)
        prompt = req.prompt_token_ids
        if (history.prompt_seen is None or history.prompt_seen.device != device
                or history.prompt_len != len(prompt)):
            seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            seen[torch.as_tensor(np.asarray(prompt, dtype=np.int64))] = True
            history.prompt_seen = self._to_device(seen, device)
            history.prompt_len = len(prompt)
        return history.prompt_seen

    def _tensor(self, data: list, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        """A small host-built tensor on like's device, copied without waiting on the device."""
        # Pinned, so the copy is truly asynchronous: from pageable memory it may wait for the
        # device to drain the work queued before it, the step launched ahead included.
        pin = like.device.type == "cuda"
        return self._to_device(torch.tensor(data, dtype=dtype, pin_memory=pin), like.device)

    @staticmethod
    def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if t.device == device:
            return t
        # Host-to-device with non_blocking is queued behind the forward pass instead of waiting
        # for it; the source is staged before the call returns, so it may be freed right after.
        return t.to(device, non_blocking=t.device.type == "cpu")

    def _padded(self, rows: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
        """Token-id rows padded with vocab_size (a spare bin) to [n, max_len], on like's device."""
        width = max(1, max(len(r) for r in rows))
        padded = np.full((len(rows), width), self.vocab_size, dtype=np.int64)
        for j, r in enumerate(rows):
            padded[j, :len(r)] = r
        return self._to_device(torch.from_numpy(padded), like.device)


def _is_random(p: SamplingParams) -> bool:
    # top_k = 1 leaves a single candidate: the argmax path gives the same token without a draw.
    return not p.is_greedy and p.top_k != 1


def has_penalty(p: SamplingParams) -> bool:
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0)


_BYTE_BIAS: dict[torch.device, torch.Tensor] = {}


def _bits_to_bias(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """packed: [n, ceil(vocab / 32)] int32, bit t % 32 of word t // 32 set = token t allowed
    -> [n, vocab] float32, 0 where allowed and -inf elsewhere.

    A table lookup per byte (int32 words are little-endian on every supported device): one
    row gather writes the bias, with no shifts over 32x expanded words and no bool intermediate.
    (index_select, not advanced indexing: a third of the time on the CPU.)"""
    table = _BYTE_BIAS.get(packed.device)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # [256, 8]
        table = _BYTE_BIAS[packed.device] = torch.where(bits.bool(), 0.0, _NEG_INF).to(
            packed.device)
    as_bytes = packed.contiguous().view(torch.uint8).reshape(-1).long()  # [n * words * 4]
    return table.index_select(0, as_bytes).view(packed.shape[0], -1)[:, :vocab_size]


def _any_bit(words: np.ndarray, vocab_size: int) -> bool:
    """Whether a packed host row allows any token below vocab_size."""
    full, tail = divmod(vocab_size, 32)
    return bool(words[:full].any()) or bool(tail and int(words[full]) & ((1 << tail) - 1))


_EMPTY_MASK = "ValueError: logits mask allows no token"
_ONLY_BLOCKED = "ValueError: logits mask allows only stop tokens, which min_tokens blocks"


def _bincount_rows(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """token_ids: [n, len] padded with vocab_size -> counts: [n, vocab_size] float32."""
    counts = torch.zeros((token_ids.shape[0], vocab_size + 1), dtype=torch.float32,
                         device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]
