"""Sampler: greedy/random choice, truncation, penalties, masks, min_tokens, seeds, logprobs."""

from __future__ import annotations

import gc
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from worker.engine.request import Request
from worker.engine.sampler import Sampler, SamplerOutput
from worker.engine.sampling_params import SamplingParams

VOCAB = 64
EOS = 2


def make_request(params: SamplingParams | None = None, *, prompt: list[int] | None = None,
                 output: list[int] | None = None, seed: int | None = None,
                 mask: object = None, eos: frozenset[int] = frozenset({EOS}),
                 rid: str = "r0") -> Request:
    req = Request(request_id=rid, prompt_token_ids=list(prompt or [1, 3, 5]),
                  sampling_params=params or SamplingParams(), max_tokens=16, eos_token_ids=eos,
                  logits_mask=mask)  # type: ignore[arg-type]
    for t in output or []:
        req.append_output_token(t)
    if seed is not None:
        req.generator = torch.Generator().manual_seed(seed)
    return req


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, vocab), generator=g) * scale  # [rows, vocab]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def empirical(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


class ConstMask:
    """A logits_mask hook that always allows the same tokens."""

    def __init__(self, allowed: list[int] | None, vocab: int = VOCAB) -> None:
        self.allowed = allowed
        self.vocab = vocab
        self.accepted: list[int] = []

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor | None:
        if self.allowed is None:
            return None
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.allowed] = True
        return mask

    def accept_token(self, token_id: int) -> None:
        self.accepted.append(token_id)


class RaisingMask:
    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        raise RuntimeError("grammar exploded")

    def accept_token(self, token_id: int) -> None:
        pass


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


# -- greedy ------------------------------------------------------------------------------------


def test_greedy_equals_argmax() -> None:
    logits = random_logits(8)
    out = Sampler(VOCAB)(logits, [make_request(SamplingParams.greedy()) for _ in range(8)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8
    assert out.errors == [None] * 8


def test_greedy_ties_break_to_lowest_token_id() -> None:
    logits = torch.zeros((1, VOCAB))
    logits[0, [7, 30, 41]] = 5.0
    out = Sampler(VOCAB)(logits, [make_request(SamplingParams.greedy())])
    assert out.token_ids == [7]


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(32, seed=1)
    reqs = [make_request(SamplingParams(temperature=1.5, top_k=1, top_p=0.9)) for _ in range(32)]
    assert Sampler(VOCAB)(logits, reqs).token_ids == logits.argmax(dim=-1).tolist()
    tied = torch.zeros((1, VOCAB))
    tied[0, [9, 3, 40]] = 4.0
    out = Sampler(VOCAB)(tied, [make_request(SamplingParams(top_k=1, seed=0), seed=0)])
    assert out.token_ids == [3]


def test_bf16_logits_are_upcast() -> None:
    logits = random_logits(4).to(torch.bfloat16)
    reqs = [make_request(SamplingParams.greedy(logprobs=2)) for _ in range(4)]
    out = Sampler(VOCAB)(logits, reqs)
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    for i, lp in enumerate(out.logprobs):
        assert lp is not None
        assert lp.logprob == pytest.approx(float(ref[i, out.token_ids[i]]), abs=1e-6)


def test_caller_logits_are_not_modified() -> None:
    logits = random_logits(3)
    before = logits.clone()
    reqs = [make_request(SamplingParams(temperature=0.5, top_p=0.5, min_p=0.1,
                                        repetition_penalty=1.3, min_tokens=2),
                         mask=ConstMask(list(range(10)))) for _ in range(3)]
    Sampler(VOCAB)(logits, reqs)
    assert torch.equal(logits, before)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        Sampler(VOCAB)(random_logits(2), [make_request()])
    with pytest.raises(ValueError, match="logits must be"):
        Sampler(VOCAB)(random_logits(1, vocab=VOCAB + 1), [make_request()])
    assert Sampler(VOCAB)(torch.empty((0, VOCAB)), []) == SamplerOutput([], [], [])


# -- random sampling -----------------------------------------------------------------------------


def test_temperature_frequencies_match_softmax() -> None:
    vocab, n, temperature = 16, 20_000, 0.7
    row = random_logits(1, vocab=vocab, seed=3, scale=1.0)
    reqs = [make_request(SamplingParams(temperature=temperature)) for _ in range(n)]
    out = Sampler(vocab)(row.expand(n, vocab), reqs)
    freq = empirical(out.token_ids, vocab)
    expected = torch.softmax(row[0].double() / temperature, dim=-1)
    # Sampling noise here is ~0.01 in total variation; a wrong temperature is far off.
    assert total_variation(freq, expected) < 0.03
    for wrong in (0.5, 1.0):
        assert total_variation(expected, torch.softmax(row[0].double() / wrong, dim=-1)) > 0.08


def test_seeded_rows_follow_the_same_distribution() -> None:
    vocab, n, temperature = 16, 4_000, 0.6
    row = random_logits(1, vocab=vocab, seed=4, scale=1.0)
    reqs = [make_request(SamplingParams(temperature=temperature, seed=s), seed=s)
            for s in range(n)]
    out = Sampler(vocab)(row.expand(n, vocab), reqs)
    expected = torch.softmax(row[0].double() / temperature, dim=-1)
    assert total_variation(empirical(out.token_ids, vocab), expected) < 0.06
    assert total_variation(expected, torch.softmax(row[0].double(), dim=-1)) > 0.12


def reference_kept(row: torch.Tensor, temperature: float, top_k: int, top_p: float,
                   min_p: float) -> tuple[set[int], float]:
    """Tokens top_k/top_p/min_p keep, by a plain float64 walk down the sorted distribution.
    Also returns how close any token's preceding mass came to top_p."""
    scaled = row.double() / temperature
    order = torch.argsort(scaled, descending=True, stable=True).tolist()
    if top_k > 0:
        order = order[:top_k]
    probs = torch.softmax(scaled[order], dim=-1).tolist()
    kept: list[int] = []
    mass_before, gap = 0.0, math.inf
    for token, p in zip(order, probs, strict=True):
        gap = min(gap, abs(mass_before - top_p))
        if kept and mass_before >= top_p:
            break
        kept.append(token)
        mass_before += p
    full = torch.softmax(scaled, dim=-1)
    best = float(full[kept[0]])
    return {t for t in kept if float(full[t]) >= min_p * best}, gap


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.2, 2.0),
       top_k=st.integers(0, VOCAB), top_p=st.floats(0.05, 1.0), min_p=st.sampled_from([0.0, 0.2]))
def test_truncation_never_picks_excluded_tokens(seed: int, temperature: float, top_k: int,
                                                top_p: float, min_p: float) -> None:
    row = random_logits(1, seed=seed, scale=1.5)[0]
    kept, boundary_gap = reference_kept(row, temperature, top_k, top_p, min_p)
    # float32 and float64 cumulative sums may disagree on a token sitting on the top_p boundary.
    assume(top_p == 1.0 or boundary_gap > 1e-4)
    n = 300
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out = Sampler(VOCAB)(row.expand(n, VOCAB), [make_request(params) for _ in range(n)])
    assert set(out.token_ids) <= kept


def test_top_p_renormalizes_over_the_kept_set() -> None:
    logits = torch.full((VOCAB,), -5.0)
    logits[[10, 20, 30, 40]] = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])) + 5.0
    probs = torch.softmax(logits.double(), dim=-1)
    # Mass before token 30 is ~0.7 (< 0.75), so it is kept; before 40 it is ~0.9.
    n = 12_000
    out = Sampler(VOCAB)(logits.expand(n, VOCAB),
                         [make_request(SamplingParams(top_p=0.75)) for _ in range(n)])
    assert set(out.token_ids) == {10, 20, 30}
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[[10, 20, 30]] = probs[[10, 20, 30]] / probs[[10, 20, 30]].sum()
    assert total_variation(empirical(out.token_ids, VOCAB), expected) < 0.03


def test_top_k_keeps_exactly_the_k_largest() -> None:
    row = random_logits(1, seed=5, scale=0.3)[0]  # flat: every kept token shows up
    n = 4_000
    out = Sampler(VOCAB)(row.expand(n, VOCAB),
                         [make_request(SamplingParams(top_k=5)) for _ in range(n)])
    assert set(out.token_ids) == set(torch.topk(row, 5).indices.tolist())


@pytest.mark.parametrize("top_p", [1.0, 0.999])  # top_k alone, and top_k before top_p
def test_top_k_differs_per_row(top_p: float) -> None:
    row = random_logits(1, seed=19, scale=0.3)[0]  # flat: every kept token shows up
    ks = [3, 12, 0, 7]
    n = 800  # per k
    reqs = [make_request(SamplingParams(top_k=k, top_p=top_p)) for k in ks for _ in range(n)]
    out = Sampler(VOCAB)(row.expand(len(reqs), VOCAB), reqs)
    for j, k in enumerate(ks):
        picked = set(out.token_ids[j * n:(j + 1) * n])
        expected = set(torch.topk(row, k or VOCAB).indices.tolist())
        assert picked <= expected and len(picked) >= min(len(expected), 3 * k or 40)


@pytest.mark.parametrize("top_p", [1.0, 0.999])  # top_k alone, and top_k before top_p
def test_top_k_keeps_ties_at_the_cut(top_p: float) -> None:
    logits = torch.zeros((VOCAB,))
    logits[[5, 6, 7, 8]] = torch.tensor([4.0, 3.0, 3.0, 2.0])
    n = 600
    out = Sampler(VOCAB)(logits.expand(n, VOCAB),
                         [make_request(SamplingParams(top_k=2, top_p=top_p)) for _ in range(n)])
    assert set(out.token_ids) == {5, 6, 7}


def test_top_k_and_top_p_together() -> None:
    logits = torch.full((VOCAB,), -5.0)
    logits[[10, 20, 30, 40, 50]] = torch.log(torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])) + 5.0
    n = 6_000
    # top_k=4 renormalizes to 0.333, 0.278, 0.222, 0.167; top_p=0.7 then stops after three.
    out = Sampler(VOCAB)(logits.expand(n, VOCAB),
                         [make_request(SamplingParams(top_k=4, top_p=0.7)) for _ in range(n)])
    assert set(out.token_ids) == {10, 20, 30}
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[[10, 20, 30]] = torch.tensor([0.3, 0.25, 0.2], dtype=torch.float64) / 0.75
    assert total_variation(empirical(out.token_ids, VOCAB), expected) < 0.03


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.full((VOCAB,), -10.0)
    # probs relative to the best: 1, 0.5, 0.3, 0.05 (the rest ~0)
    logits[[4, 8, 15, 16]] = torch.log(torch.tensor([1.0, 0.5, 0.3, 0.05]))
    n = 6_000
    out = Sampler(VOCAB)(logits.expand(n, VOCAB),
                         [make_request(SamplingParams(min_p=0.25)) for _ in range(n)])
    assert set(out.token_ids) == {4, 8, 15}
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[[4, 8, 15]] = torch.tensor([1.0, 0.5, 0.3], dtype=torch.float64) / 1.8
    assert total_variation(empirical(out.token_ids, VOCAB), expected) < 0.03


# -- penalties -----------------------------------------------------------------------------------

PROBE = 60  # a token in no history, used to read back a processed logit


def penalized_rows(cases: list[tuple[SamplingParams, list[int], list[int], int, float,
                                     float]]) -> list[int]:
    """For each (params, prompt, output, token, raw logit, probe logit) case, greedy-sample a row
    where only `token` and the probe compete; returns the winners."""
    rows, reqs = [], []
    for params, prompt, output, token, raw, probe in cases:
        row = torch.full((VOCAB,), -50.0)
        row[token] = raw
        row[PROBE] = probe
        rows.append(row)
        reqs.append(make_request(params, prompt=prompt, output=output, eos=frozenset()))
    return Sampler(VOCAB)(torch.stack(rows), reqs).token_ids


def assert_processed_logit(params: SamplingParams, prompt: list[int], output: list[int],
                           token: int, raw: float, expected: float) -> None:
    """The processed logit of `token` lies within 1e-3 of `expected`: a probe just below it
    loses, one just above wins."""
    eps = 1e-3
    winners = penalized_rows([(params, prompt, output, token, raw, expected - eps),
                              (params, prompt, output, token, raw, expected + eps)])
    assert winners == [token, PROBE], f"token {token}: raw {raw} should become {expected}"


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    params = SamplingParams.greedy(repetition_penalty=1.5)
    prompt, output = [7, 8], [9, 11]
    assert_processed_logit(params, prompt, output, 7, 2.0, 2.0 / 1.5)  # prompt token
    assert_processed_logit(params, prompt, output, 9, 3.0, 3.0 / 1.5)  # output token
    assert_processed_logit(params, prompt, output, 11, -1.0, -1.5)  # negative: multiplied
    assert_processed_logit(params, prompt, output, 12, 2.0, 2.0)  # unseen: untouched


def test_presence_and_frequency_penalties_count_output_only() -> None:
    params = SamplingParams.greedy(presence_penalty=0.5, frequency_penalty=0.25)
    prompt, output = [7, 3], [3, 3, 3, 5]
    assert_processed_logit(params, prompt, output, 3, 1.0, 1.0 - 0.5 - 3 * 0.25)
    assert_processed_logit(params, prompt, output, 5, 1.0, 1.0 - 0.5 - 0.25)
    assert_processed_logit(params, prompt, output, 7, 1.0, 1.0)  # prompt only: no penalty
    negative = SamplingParams.greedy(presence_penalty=-1.0)
    assert_processed_logit(negative, prompt, output, 5, 1.0, 2.0)


def test_repetition_then_presence_and_frequency() -> None:
    params = SamplingParams.greedy(repetition_penalty=2.0, presence_penalty=0.5,
                                   frequency_penalty=0.1)
    assert_processed_logit(params, [4], [6, 6], 6, 3.0, 3.0 / 2.0 - 0.5 - 0.2)
    assert_processed_logit(params, [4], [6, 6], 4, 3.0, 3.0 / 2.0)


def test_penalties_stay_on_their_own_rows() -> None:
    logits = random_logits(3, seed=6)
    top = logits.argmax(dim=-1).tolist()
    reqs = [make_request(SamplingParams.greedy(), output=[top[0]]),
            make_request(SamplingParams.greedy(repetition_penalty=20.0, presence_penalty=2.0),
                         prompt=[top[1]], output=[top[1]]),
            make_request(SamplingParams.greedy(), prompt=[top[2]])]
    out = Sampler(VOCAB)(logits, reqs)
    assert out.token_ids[0] == top[0]
    assert out.token_ids[2] == top[2]
    assert out.token_ids[1] != top[1]


def test_penalty_history_follows_the_request_across_steps() -> None:
    sampler = Sampler(VOCAB)
    params = SamplingParams.greedy(frequency_penalty=1.0, repetition_penalty=2.0)
    req = make_request(params, prompt=[30], eos=frozenset())
    logits = torch.zeros((1, VOCAB))
    logits[0, [10, 11, 12]] = torch.tensor([3.0, 2.6, 1.2])
    logits[0, 30] = 2.8  # prompt token: 1.4 after the repetition penalty
    picked = []
    for _ in range(4):
        token = sampler(logits, [req]).token_ids[0]
        picked.append(token)
        req.append_output_token(token)
    # Once output, 10 drops to 3.0 / 2 - 1 = 0.5 and 11 to 2.6 / 2 - 1 = 0.3; the prompt token
    # 30 sits at 2.8 / 2 = 1.4 until it is output too, then 12 (1.2) is the best left.
    assert picked == [10, 11, 30, 12]
    # A rewound output is recounted from scratch, not from the cached counts.
    req.output_token_ids[:] = [11]
    assert sampler(logits, [req]).token_ids == [10]
    # The cached history goes away with the request.
    del req
    gc.collect()
    assert sampler._histories == {}


# -- seeds -----------------------------------------------------------------------------------------


def run_steps(batch_of: list[list[Request]], logits_per_step: list[torch.Tensor],
              row_of: list[int]) -> list[list[int]]:
    """Runs several steps; at each, batch `b` sees the same logits row for the tracked request,
    which sits at row_of[b]. Returns the tracked request's tokens per batch."""
    sampler = Sampler(VOCAB)
    seqs: list[list[int]] = [[] for _ in batch_of]
    for step_logits in logits_per_step:
        for b, batch in enumerate(batch_of):
            logits = random_logits(len(batch), seed=len(seqs[b]) + 100 * b + 7)
            logits[row_of[b]] = step_logits
            out = sampler(logits, batch)
            for req, token in zip(batch, out.token_ids, strict=True):
                req.append_output_token(token)
            seqs[b].append(out.token_ids[row_of[b]])
    return seqs


def test_seeded_request_ignores_the_rest_of_the_batch() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    alone = [make_request(params, seed=42)]
    crowded = [make_request(SamplingParams(temperature=0.9)),
               make_request(SamplingParams(seed=7, top_k=10), seed=7),
               make_request(SamplingParams.greedy()),
               make_request(params, seed=42),
               make_request(SamplingParams(seed=8), seed=8)]
    steps = [random_logits(1, seed=200 + s, scale=0.5)[0] for s in range(8)]
    torch.manual_seed(1)
    seq_alone = run_steps([alone], steps, [0])[0]
    torch.manual_seed(999)  # the global RNG must not matter to seeded rows
    seq_crowded = run_steps([crowded], steps, [3])[0]
    assert seq_alone == seq_crowded
    # Flat logits and 8 steps: a different seed giving the same sequence would be a broken test.
    other = run_steps([[make_request(params, seed=43)]], steps, [0])[0]
    assert other != seq_alone


def test_seeded_request_repeats_across_runs() -> None:
    params = SamplingParams(temperature=1.2, seed=5)
    steps = [random_logits(1, seed=300 + s, scale=0.5)[0] for s in range(6)]
    first = run_steps([[make_request(params, seed=5)]], steps, [0])[0]
    second = run_steps([[make_request(params, seed=5)]], steps, [0])[0]
    assert first == second
    assert len(set(first)) > 1  # it really samples


# -- logprobs --------------------------------------------------------------------------------------


def check_logprobs(out: SamplerOutput, raw: torch.Tensor, ks: list[int | None]) -> None:
    ref = torch.log_softmax(raw.float(), dim=-1)  # [n, vocab]
    for i, k in enumerate(ks):
        lp = out.logprobs[i]
        if k is None:
            assert lp is None
            continue
        assert lp is not None
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(ref[i, token]), abs=1e-6)
        assert lp.rank == 1 + int((ref[i] > ref[i, token]).sum())
        order = torch.argsort(ref[i], descending=True)[:k]
        assert lp.top_token_ids == order.tolist()
        assert lp.top_logprobs == pytest.approx(ref[i, order].tolist(), abs=1e-6)
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)


def test_logprobs_match_log_softmax_of_raw_logits() -> None:
    ks: list[int | None] = [0, 3, None, 5, 1]
    logits = random_logits(len(ks), seed=8)
    reqs = [make_request(SamplingParams.greedy(logprobs=ks[0])),
            make_request(SamplingParams(logprobs=ks[1])),
            make_request(SamplingParams()),
            make_request(SamplingParams(temperature=0.8, logprobs=ks[3]), seed=3),
            make_request(SamplingParams.greedy(logprobs=ks[4]))]
    out = Sampler(VOCAB)(logits, reqs)
    check_logprobs(out, logits, ks)
    assert out.logprobs[0] is not None and out.logprobs[0].top_token_ids == []
    assert out.logprobs[0].rank == 1


def test_logprobs_are_raw_despite_processing() -> None:
    logits = random_logits(3, seed=9)
    top = logits.argmax(dim=-1).tolist()
    reqs = [
        # Penalized greedy: picks something other than the raw best, so rank must be > 1.
        make_request(SamplingParams.greedy(logprobs=4, presence_penalty=2.0,
                                           repetition_penalty=20.0), output=[top[0]]),
        make_request(SamplingParams(temperature=0.3, top_k=3, logprobs=2, frequency_penalty=1.0),
                     output=[top[1], top[1]]),
        make_request(SamplingParams(temperature=2.0, min_p=0.1, logprobs=3),
                     mask=ConstMask([0, 1, 2, 3])),
    ]
    out = Sampler(VOCAB)(logits, reqs)
    check_logprobs(out, logits, [4, 2, 3])
    assert out.token_ids[0] != top[0]
    assert out.logprobs[0] is not None and out.logprobs[0].rank > 1


# -- structured-output mask ------------------------------------------------------------------------


def test_mask_restricts_choice() -> None:
    allowed = [5, 17, 33, 50]
    logits = random_logits(1, seed=10)[0]
    n = 500
    reqs = [make_request(SamplingParams(temperature=2.0), mask=ConstMask(allowed))
            for _ in range(n)]
    reqs.append(make_request(SamplingParams.greedy(), mask=ConstMask(allowed)))
    out = Sampler(VOCAB)(logits.expand(n + 1, VOCAB), reqs)
    assert set(out.token_ids[:n]) == set(allowed)  # hot temperature: all of them, nothing else
    assert out.token_ids[n] == allowed[int(logits[allowed].argmax())]
    assert out.errors == [None] * (n + 1)


def test_mask_returning_none_does_not_restrict() -> None:
    logits = random_logits(2, seed=11)
    out = Sampler(VOCAB)(logits, [make_request(SamplingParams.greedy(), mask=ConstMask(None)),
                                  make_request(SamplingParams.greedy())])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.errors == [None, None]


def mixed_batch(bad_mask: object) -> list[Request]:
    return [make_request(SamplingParams.greedy(), mask=ConstMask([1, 2, 3])),
            make_request(SamplingParams(seed=11), seed=11, mask=bad_mask),
            make_request(SamplingParams(temperature=0.7, seed=12), seed=12),
            make_request(SamplingParams(seed=13, logprobs=2), seed=13, mask=ConstMask([4, 9]))]


@pytest.mark.parametrize("bad_mask, error", [
    (RaisingMask(), "RuntimeError: grammar exploded"),
    (ConstMask([]), "ValueError: logits mask allows no token"),
])
def test_failing_mask_marks_only_its_row(bad_mask: object, error: str) -> None:
    logits = random_logits(4, seed=12)
    out = Sampler(VOCAB)(logits, mixed_batch(bad_mask))
    clean = Sampler(VOCAB)(logits, mixed_batch(None))
    assert out.errors == [None, error, None, None]
    assert clean.errors == [None] * 4
    for i in (0, 2, 3):
        assert out.token_ids[i] == clean.token_ids[i]
    assert out.logprobs[3] == clean.logprobs[3]
    assert out.token_ids[0] in {1, 2, 3} and out.token_ids[3] in {4, 9}


def test_mask_of_wrong_shape_or_dtype_is_an_error() -> None:
    class WrongShape:
        def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
            return torch.ones(vocab_size + 1, dtype=torch.bool)

    class WrongDtype:
        def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
            return torch.ones(vocab_size, dtype=torch.float32)

    logits = random_logits(3, seed=13)
    reqs = [make_request(SamplingParams.greedy(), mask=WrongShape()),
            make_request(SamplingParams.greedy(), mask=WrongDtype()),
            make_request(SamplingParams.greedy())]
    out = Sampler(VOCAB)(logits, reqs)
    assert out.errors[0] is not None and out.errors[0].startswith("ValueError: logits mask")
    assert out.errors[1] is not None and out.errors[1].startswith("TypeError: logits mask")
    assert out.errors[2] is None
    assert out.token_ids == logits.argmax(dim=-1).tolist()  # failed rows stay unrestricted


class PackedMask(ConstMask):
    """The same mask packed 32 tokens to an int32 word, as grammar backends fill it."""

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor | None:
        mask = super().allowed_tokens(vocab_size)
        if mask is None:
            return None
        bits = np.zeros((vocab_size + 31) // 32 * 32, dtype=bool)
        bits[:vocab_size] = mask.numpy()
        return torch.from_numpy(np.packbits(bits, bitorder="little").view("<i4").copy())


@pytest.mark.parametrize("allowed", [[1, 2, 3], [31], [0, 31, VOCAB - 1]])
def test_packed_mask_restricts_like_a_bool_mask(allowed: list[int]) -> None:
    logits = random_logits(3, seed=15)
    params = SamplingParams.greedy()
    packed = Sampler(VOCAB)(logits, [make_request(params, mask=PackedMask(allowed)),
                                     make_request(params, mask=ConstMask([4, 9])),
                                     make_request(params)])
    plain = Sampler(VOCAB)(logits, [make_request(params, mask=ConstMask(allowed)),
                                    make_request(params, mask=ConstMask([4, 9])),
                                    make_request(params)])
    assert packed.errors == [None] * 3
    assert packed.token_ids[0] in allowed and packed.token_ids[1] in {4, 9}
    assert packed.token_ids == plain.token_ids


def test_packed_bits_past_the_vocabulary_allow_nothing() -> None:
    class PastTheEnd:
        def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
            return torch.tensor([0, -256], dtype=torch.int32)  # bits 40..63 of 2 words

        def accept_token(self, token_id: int) -> None:
            pass

    vocab = 40
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(16))
    out = Sampler(vocab)(logits, [make_request(SamplingParams.greedy(), mask=PastTheEnd()),
                                  make_request(SamplingParams.greedy())])
    assert out.errors == ["ValueError: logits mask allows no token", None]
    assert out.token_ids[1] == int(logits[1].argmax())


def test_mask_allowing_only_blocked_stop_tokens_is_an_error() -> None:
    logits = random_logits(2, seed=14)
    reqs = [make_request(SamplingParams.greedy(min_tokens=3), mask=ConstMask([EOS])),
            make_request(SamplingParams.greedy(min_tokens=3), mask=ConstMask([EOS, 9]))]
    out = Sampler(VOCAB)(logits, reqs)
    assert out.errors[0] == ("ValueError: logits mask allows only stop tokens, "
                             "which min_tokens blocks")
    assert out.errors[1] is None and out.token_ids[1] == 9


def test_packed_masks_report_empty_and_blocked_rows_from_the_host() -> None:
    """Packed rows are checked on the host against the sampled token: the same errors as the
    device-side flags of other masks, in a batch mixing greedy, random and unmasked rows."""
    logits = random_logits(6, seed=17)
    reqs = [make_request(SamplingParams.greedy(), mask=FillingMask([])),
            make_request(SamplingParams(seed=21, min_tokens=3), seed=21, mask=FillingMask([EOS])),
            make_request(SamplingParams(seed=22, min_tokens=3), seed=22,
                         mask=FillingMask([EOS, 9])),
            make_request(SamplingParams(seed=23), seed=23),
            make_request(SamplingParams(seed=24), seed=24, mask=PackedMask([2, 3])),
            make_request(SamplingParams.greedy(min_tokens=3), mask=PackedMask([EOS, 31]))]
    out = Sampler(VOCAB)(logits, reqs)
    assert out.errors == ["ValueError: logits mask allows no token",
                          "ValueError: logits mask allows only stop tokens, which min_tokens "
                          "blocks", None, None, None, None]
    assert out.token_ids[2] == 9 and out.token_ids[4] in {2, 3} and out.token_ids[5] == 31


# -- min_tokens ------------------------------------------------------------------------------------


def test_min_tokens_blocks_eos_and_stop_ids_until_reached() -> None:
    stop_id = 20
    logits = random_logits(1, seed=15)[0]
    logits[EOS], logits[stop_id] = 50.0, 40.0  # the model wants to stop
    params = SamplingParams.greedy(min_tokens=2, stop_token_ids=[stop_id])
    expected_free = int(logits.argsort(descending=True)[2])
    sampler = Sampler(VOCAB)
    for num_out, expected in [(0, expected_free), (1, expected_free), (2, EOS), (3, EOS)]:
        out = sampler(logits[None], [make_request(params, output=[7] * num_out)])
        assert out.token_ids == [expected], f"after {num_out} output tokens"
    # Only the stop token left to block: EOS already allowed past min_tokens, stop id still not.
    logits[EOS] = -50.0
    out = sampler(logits[None], [make_request(params, output=[7])])
    assert out.token_ids == [expected_free]
    out = sampler(logits[None], [make_request(params, output=[7, 7])])
    assert out.token_ids == [stop_id]


def test_min_tokens_holds_for_random_rows() -> None:
    logits = torch.zeros((VOCAB,))
    logits[[EOS, 20]] = 3.0
    n = 400
    params = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[20])
    out = Sampler(VOCAB)(logits.expand(n, VOCAB), [make_request(params) for _ in range(n)])
    assert not {EOS, 20} & set(out.token_ids)
    done = Sampler(VOCAB)(logits.expand(n, VOCAB),
                          [make_request(params, output=[5]) for _ in range(n)])
    assert {EOS, 20} <= set(done.token_ids)


def test_min_tokens_leaves_eos_alone_under_ignore_eos() -> None:
    logits = torch.zeros((1, VOCAB))
    logits[0, EOS] = 5.0
    params = SamplingParams.greedy(min_tokens=4, ignore_eos=True)
    assert Sampler(VOCAB)(logits, [make_request(params)]).token_ids == [EOS]


# -- mixed batches ---------------------------------------------------------------------------------


def test_mixed_greedy_and_random_batch() -> None:
    logits = random_logits(6, seed=16)
    greedy_rows = (0, 2, 5)
    reqs = [make_request(SamplingParams.greedy()),
            make_request(SamplingParams(temperature=0.8, seed=1), seed=1),
            make_request(SamplingParams.greedy(logprobs=1)),
            make_request(SamplingParams(top_k=1, temperature=1.7)),
            make_request(SamplingParams(top_p=0.9, seed=2), seed=2),
            make_request(SamplingParams(temperature=0.0))]
    out = Sampler(VOCAB)(logits, reqs)
    argmax = logits.argmax(dim=-1).tolist()
    for i in (*greedy_rows, 3):
        assert out.token_ids[i] == argmax[i]
    # The seeded random rows match what they sample on their own.
    for i, params, seed in [(1, SamplingParams(temperature=0.8, seed=1), 1),
                            (4, SamplingParams(top_p=0.9, seed=2), 2)]:
        alone = Sampler(VOCAB)(logits[i:i + 1], [make_request(params, seed=seed)])
        assert out.token_ids[i] == alone.token_ids[0]


def test_random_rows_are_not_stuck_on_the_argmax() -> None:
    logits = random_logits(1, seed=17, scale=0.5)[0]
    n = 200
    out = Sampler(VOCAB)(logits.expand(n, VOCAB), [make_request() for _ in range(n)])
    assert len(set(out.token_ids)) > 20


# -- device ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_never_syncs_the_stream() -> None:
    device = torch.device("cuda")
    logits = random_logits(6, seed=18)

    def batch(on: torch.device) -> list[Request]:
        reqs = [make_request(SamplingParams.greedy(logprobs=3, repetition_penalty=1.3),
                             output=[1, 4]),
                make_request(SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05,
                                            presence_penalty=0.4, logprobs=2), output=[6]),
                make_request(SamplingParams(min_tokens=2), mask=ConstMask([EOS, 3, 8])),
                make_request(SamplingParams.greedy(), mask=RaisingMask()),
                make_request(SamplingParams(frequency_penalty=0.3), output=[9, 9]),
                make_request(SamplingParams())]
        for req, seed in zip(reqs, range(100, 106), strict=True):
            req.generator = torch.Generator(device=on).manual_seed(seed)
        return reqs

    sampler = Sampler(VOCAB)
    cpu = sampler(logits, batch(torch.device("cpu")))
    gpu_logits = logits.to(device)
    sampler(gpu_logits, batch(device))  # warm up allocators
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pending = sampler.sample_async(gpu_logits, batch(device))
            queued = [w for w in caught if "called a synchronizing" in str(w.message)]
            # The host then waits on the result's own event, never on the whole stream, so a
            # step launched behind this one keeps running.
            gpu = pending.result()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert queued == [] and syncs == [], [str(w.message) for w in syncs]
    assert gpu.errors == cpu.errors
    # Greedy rows and logprobs agree across devices (random draws differ by device RNG).
    assert gpu.token_ids[0] == cpu.token_ids[0] and gpu.token_ids[3] == cpu.token_ids[3]
    assert gpu.logprobs[0] is not None and cpu.logprobs[0] is not None
    assert gpu.logprobs[0].top_token_ids == cpu.logprobs[0].top_token_ids
    assert gpu.token_ids[2] in {3, 8}

    # A seeded CUDA row alone vs. in the batch.
    alone = sampler(gpu_logits[1:2], batch(device)[1:2])
    assert alone.token_ids[0] == gpu.token_ids[1]


class FillingMask(PackedMask):
    """A hook that writes its packed mask into the sampler's batch buffer, as the grammar
    matcher does; `fail` raises after a partial write."""

    def __init__(self, allowed: list[int] | None, fail: bool = False) -> None:
        super().__init__(allowed)
        self.fail = fail

    def fill_packed(self, out: torch.Tensor) -> bool:
        packed = self.allowed_tokens(VOCAB)
        if packed is None:
            return False
        out.copy_(packed)
        if self.fail:
            out.fill_(0)  # a half-done row that must not stay in the batch
            raise RuntimeError("fill failed")
        return True


def test_masks_filled_in_place_mix_with_other_hooks_and_failures() -> None:
    logits = random_logits(6, seed=16)
    params = SamplingParams.greedy()
    hooks: list[object] = [FillingMask([3, 5]), FillingMask([7], fail=True), ConstMask([4, 9]),
                           None, FillingMask(None), FillingMask([0, 63])]
    out = Sampler(VOCAB)(logits, [make_request(params, mask=h) for h in hooks])
    ref = Sampler(VOCAB)(logits, [make_request(params, mask=m) for m in (
        ConstMask([3, 5]), None, ConstMask([4, 9]), None, None, ConstMask([0, 63]))])
    assert out.errors == [None, "RuntimeError: fill failed", None, None, None, None]
    assert out.token_ids == ref.token_ids
    assert out.token_ids[0] in {3, 5} and out.token_ids[2] in {4, 9} and out.token_ids[5] in {0, 63}
    # Only filled rows: every request a hook restricts, none it does not.
    only = Sampler(VOCAB)(logits, [make_request(params, mask=FillingMask([10, 11]))
                                   for _ in range(6)])
    assert set(only.token_ids) <= {10, 11}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masks_filled_in_place_match_cpu_without_a_sync() -> None:
    logits = random_logits(5, seed=19)
    hooks = [FillingMask([3, 5]), None, FillingMask([0, 63]), FillingMask([7], fail=True), None]

    def batch() -> list[Request]:
        return [make_request(SamplingParams.greedy(), mask=h) for h in hooks]

    sampler = Sampler(VOCAB)
    cpu = sampler(logits, batch())
    gpu_logits = logits.to("cuda")
    sampler(gpu_logits, batch())  # warm up allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = sampler.sample_async(gpu_logits, batch())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gpu = pending.result()
    assert gpu.token_ids == cpu.token_ids and gpu.errors == cpu.errors
    assert gpu.token_ids[0] in {3, 5} and gpu.token_ids[2] in {0, 63}
