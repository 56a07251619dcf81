"""Streaming detokenization: deltas add up to the whole decode; stop strings cut cleanly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.detokenizer import IncrementalDetokenizer
from worker.engine.errors import InvalidRequestError
from worker.tokenizer import Tokenizer

VOCAB = 2048
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_model_dir)


def _stream(detok: IncrementalDetokenizer, ids: Sequence[int],
            chunks: Sequence[int] = (1,)) -> list[str]:
    """Feed ids in chunks of the given sizes (cycled); return every delta, flush's last."""
    deltas, i, k = [], 0, 0
    while i < len(ids):
        size = max(1, chunks[k % len(chunks)])
        deltas.append(detok.update(ids[i:i + size]))
        i, k = i + size, k + 1
    deltas.append(detok.flush())
    return deltas


ids_strategy = st.lists(st.integers(min_value=0, max_value=VOCAB - 1), max_size=40)
chunks_strategy = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5)


@PROPERTY_SETTINGS
@given(output=ids_strategy, prompt=st.lists(st.integers(0, VOCAB - 1), max_size=10),
       chunks=chunks_strategy, skip=st.booleans())
def test_deltas_join_to_the_whole_decode(tokenizer: Tokenizer, output: list[int],
                                         prompt: list[int], chunks: list[int], skip: bool) -> None:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    deltas = _stream(detok, output, chunks)
    expected = tokenizer.decode(output, skip_special_tokens=skip)
    assert "".join(deltas) == expected
    assert detok.text == expected
    assert not detok.finished and detok.stop_reason is None


@PROPERTY_SETTINGS
@given(text=st.text(alphabet=st.sampled_from("ab xy.é日本🙂🚀\n"), max_size=30),
       data=st.data(), chunks=chunks_strategy, include=st.booleans())
def test_streamed_stop_matches_cutting_the_whole_text(
        tokenizer: Tokenizer, text: str, data: st.DataObject, chunks: list[int],
        include: bool) -> None:
    ids = tokenizer.encode(text)
    start = data.draw(st.integers(0, len(text)))
    stop = data.draw(st.text(alphabet=st.sampled_from("ab xy.é日本🙂🚀\n"), min_size=1,
                             max_size=4)) if start == len(text) else text[start:start + 3]
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop], include_stop_str_in_output=include)
    released, deltas, i, k = [], [], 0, 0
    while i < len(ids) and not detok.finished:
        size = chunks[k % len(chunks)]
        deltas.append(detok.update(ids[i:i + size]))
        released.append(detok.text)
        i, k = i + size, k + 1
    deltas.append(detok.flush())
    at = text.find(stop)
    expected = text if at < 0 else text[:at + len(stop) if include else at]
    assert "".join(deltas) == detok.text == expected
    assert detok.finished == (at >= 0)
    assert detok.stop_reason == (stop if at >= 0 else None)
    # Nothing released along the way is ever taken back.
    assert all(expected.startswith(r) for r in released)


@pytest.mark.parametrize("text", ["🙂🚀🔥✅", "日本語のテキスト", "mixed: café → 中文 🙂 done", "👩‍👩‍👧🇳🇱"])
def test_multibyte_characters_never_show_replacement_chars(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    # The test means something only if some character really is split between tokens.
    assert any("\ufffd" in p for p in pieces)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt:"))
    deltas = _stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert "" in deltas[:-1]  # held back at least once, mid-character


def test_special_tokens_are_shown_only_when_not_skipped(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Sure.<|im_end|><|endoftext|>")
    shown = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(_stream(shown, ids)) == "Sure.<|im_end|><|endoftext|>"
    hidden = IncrementalDetokenizer(tokenizer, [])
    assert "".join(_stream(hidden, ids)) == "Sure."


def _stop_run(tokenizer: Tokenizer, text: str, stop: list[str], include: bool = False,
              prompt: str = "") -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), stop=stop,
                                   include_stop_str_in_output=include)
    deltas = [detok.update([i]) for i in tokenizer.encode(text)]
    return detok, deltas


def test_stop_string_is_excluded(tokenizer: Tokenizer) -> None:
    detok, deltas = _stop_run(tokenizer, "Answer: 42\nObservation: done", ["Observation:"])
    assert detok.finished and detok.stop_reason == "Observation:"
    assert "".join(deltas) == detok.text == "Answer: 42\n"
    assert detok.flush() == ""


def test_stop_string_is_included_on_request(tokenizer: Tokenizer) -> None:
    detok, deltas = _stop_run(tokenizer, "Answer: 42\nObservation: done", ["Observation:"],
                              include=True)
    assert detok.stop_reason == "Observation:"
    assert "".join(deltas) == "Answer: 42\nObservation:"


def test_stop_string_spanning_token_boundaries(tokenizer: Tokenizer) -> None:
    text, stop = "the scheduler preempts a request", "duler pree"
    ids = tokenizer.encode(text)
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # no single token holds it
    detok, deltas = _stop_run(tokenizer, text, [stop])
    assert detok.stop_reason == stop
    assert "".join(deltas) == "the sche"


def test_stop_inside_a_prompt_is_ignored(tokenizer: Tokenizer) -> None:
    detok, deltas = _stop_run(tokenizer, " and more", ["STOP"], prompt="Say STOP")
    assert not detok.finished
    assert "".join(deltas) + detok.flush() == " and more"


def test_text_after_a_stop_is_never_released(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["END"])
    # One update carries text on both sides of the stop string.
    assert detok.update(tokenizer.encode("alpha END omega")) == "alpha "
    assert detok.update(tokenizer.encode(" more text")) == ""
    assert detok.flush() == ""
    assert detok.text == "alpha "


def test_possible_stop_prefix_is_held_until_resolved(tokenizer: Tokenizer) -> None:
    detok, deltas = _stop_run(tokenizer, "wait for the gamma", ["gamma ray"])
    released = "".join(deltas)
    assert released == "wait for the "  # "gamma" could still become "gamma ray"
    assert not detok.finished
    assert detok.flush() == "gamma"
    assert detok.text == "wait for the gamma" and detok.stop_reason is None


def test_held_prefix_is_released_when_the_stop_fails_to_complete(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["gamma ray"])
    assert detok.update(tokenizer.encode("a gamma")) == "a "
    assert detok.update(tokenizer.encode(" burst")) == "gamma burst"


def test_the_stop_string_completing_first_wins(tokenizer: Tokenizer) -> None:
    text = "the quick brown fox jumps"
    detok, deltas = _stop_run(tokenizer, text, ["fox", "quick", "brown"])
    assert detok.stop_reason == "quick" and "".join(deltas) == "the "
    # Nested stops: "ick" completes before "quick brown" does, however the tokens fall.
    for feed in ([tokenizer.encode(text)], [[i] for i in tokenizer.encode(text)]):
        detok = IncrementalDetokenizer(tokenizer, [], stop=["quick brown", "ick"])
        released = "".join(detok.update(ids) for ids in feed)
        assert (released, detok.stop_reason) == ("the qu", "ick")


def test_flush_still_applies_stop_strings(tokenizer: Tokenizer) -> None:
    # The last token ends in an unfinished emoji, so its text, stop string included, is
    # held back until flush().
    emoji = tokenizer.encode("🙂")
    ids = [*tokenizer.encode("ok!"), emoji[0]]
    assert tokenizer.decode(ids).endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["k!"])
    released = "".join(detok.update([i]) for i in ids)
    assert released + detok.flush() == "o"
    assert detok.stop_reason == "k!"


def test_decode_cost_does_not_grow_with_the_reply(tokenizer: Tokenizer) -> None:
    class CountingTokenizer(Tokenizer):
        longest = 0

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, *,
                   spaces_between_special_tokens: bool | None = None) -> str:
            CountingTokenizer.longest = max(CountingTokenizer.longest, len(ids))
            return super().decode(ids, skip_special_tokens,
                                  spaces_between_special_tokens=spaces_between_special_tokens)

    counting = CountingTokenizer(tokenizer.hf, tokenizer.eos_token_ids)
    text = "Paged attention stores keys and values in blocks. 日本語 🙂 " * 40
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(counting, tokenizer.encode("a long prompt " * 50),
                                   stop=["never appears"])
    assert "".join(_stream(detok, ids)) == text
    assert len(ids) > 500 and CountingTokenizer.longest <= 12


def test_misuse_is_reported(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError):
        IncrementalDetokenizer(tokenizer, [], stop=[""])
    detok = IncrementalDetokenizer(tokenizer, [])
    detok.flush()
    with pytest.raises(RuntimeError, match="flush"):
        detok.update([5])


@PROPERTY_SETTINGS
@given(text=st.text(alphabet=st.sampled_from("ab xy.é日本🙂\n"), min_size=10, max_size=60),
       data=st.data(), include=st.booleans())
def test_released_text_moved_aside_keeps_stops_and_text_exact(
        tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, text: str, data: st.DataObject,
        include: bool) -> None:
    """With released text moved out of the working text every few characters (as a long reply
    has it every COMPACT_AT), stop strings that start in the moved part still cut right."""
    import worker.detokenizer as detokenizer

    monkeypatch.setattr(detokenizer, "COMPACT_AT", 3)
    ids = tokenizer.encode(text)
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start:start + data.draw(st.integers(1, 5))]
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop], include_stop_str_in_output=include)
    deltas = [detok.update([i]) for i in ids if not detok.finished] + [detok.flush()]
    at = text.find(stop)
    expected = text[:at + len(stop) if include else at]
    assert "".join(deltas) == detok.text == expected
    assert detok.stop_reason == stop
