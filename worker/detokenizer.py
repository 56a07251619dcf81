"""Incremental detokenization for streaming, with stop strings.

Each update decodes only a small window of recent tokens twice (without and with the new ones)
and releases the difference, so the cost per token does not grow with the length of the reply.
Text is held back while it ends in an incomplete UTF-8 sequence, and, when stop strings are set,
while its tail could still turn into a stop string: a client never sees text that is later cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.engine.errors import InvalidRequestError
from worker.tokenizer import Tokenizer

# Prompt tokens decoded in front of the output. Byte-level tokenizers need none, but decoders
# that strip a leading space at the start of a text (SentencePiece) need one word of context.
PROMPT_CONTEXT_TOKENS = 6
# What a decoder writes for bytes that are not (yet) valid UTF-8.
REPLACEMENT_CHAR = "\ufffd"
# Released text past this many characters moves out of the working text (see _release): appending
# to a string that holds the whole reply copies the whole reply, every token.
COMPACT_AT = 1024


def joined(pieces: list[str]) -> str:
    """The pieces of a text as one string, left in `pieces` as its only piece, so the join is
    paid once however often the text is read."""
    if len(pieces) > 1:
        pieces[:] = ["".join(pieces)]
    return pieces[0] if pieces else ""


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas.

    With no stop strings, the deltas plus `flush()` join to exactly the decode of all output
    ids. Stop strings are searched in the output only; the one that completes first in the text
    wins (on a tie, the one starting earlier), which does not depend on how tokens split it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidRequestError("stop strings must be non-empty strings", param="stop")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output

        # The decode window: ids[:read] were already turned into text and are decoded again only
        # as context (their text is _prefix_text); ids[read:] are not yet in _text.
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_text = self._decode(self._ids)
        if self._prefix_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: context would glue the output's first bytes
            # onto it, while the reply on its own decodes them separately.
            self._ids, self._prefix_text = [], ""
        self._read_offset = len(self._ids)

        # The output text decoded so far, cut at a stop string once found, is
        # "".join(_done) + _text: _done holds released text that no stop string can reach any
        # more, _text the rest (the unreleased text and a tail of the released).
        self._done: list[str] = []
        self._text = ""
        self._released = 0  # how much of _text the caller has been given
        self._closed = False
        self.finished = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """Everything released so far."""
        return joined(self._done) + self._text[:self._released]

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Add output tokens; return the text that can now be released (maybe "")."""
        if self._closed:
            raise RuntimeError("update() after flush(): the stream has already ended")
        if self.finished or not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """Release everything held back; call once, when the request ends for another reason.

        Bytes that never completed a character come out as U+FFFD, as in a whole decode. A
        stop string completed by the released text still cuts it and sets `stop_reason`.
        """
        if self._closed or self.finished:
            self._closed = True
            return ""
        self._closed = True
        self._advance(final=True)
        return self._release(final=True)

    def _advance(self, *, final: bool) -> None:
        """Decode the window and move newly decoded text into _text."""
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text):
            return  # e.g. skipped special tokens: nothing to show yet
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return  # maybe a character cut between tokens: wait for its remaining bytes
        old_len = len(self._text)
        self._text += new_text[len(self._prefix_text):]
        # The just-read tokens become the context for the next ones; older ids are dropped so
        # memory and decode cost stay bounded by the window, not by the reply.
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._check_stop(search_from=max(0, old_len - self._max_stop_len + 1))

    def _check_stop(self, search_from: int) -> None:
        if not self._stop:
            return
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self._stop:
            start = self._text.find(s, search_from)
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is None:
            return
        end, start, s = best
        self._text = self._text[:end if self._include_stop else start]
        self.finished = True
        self.stop_reason = s

    def _release(self, *, final: bool) -> str:
        upto = len(self._text)
        if not (final or self.finished or self._include_stop):
            # With the stop string kept in the output, whatever precedes a match's end is
            # released either way, so only exclusion needs to hold anything back.
            upto -= self._partial_stop_len()
        if upto <= self._released:
            return ""
        delta = self._text[self._released:upto]
        self._released = upto
        if upto > COMPACT_AT:
            # A later stop string can start at most its length - 1 characters back.
            cut = upto - max(self._max_stop_len - 1, 0)
            self._done.append(self._text[:cut])
            self._text, self._released = self._text[cut:], upto - cut
        return delta

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text, longest = self._text, 0
        if not text:
            return 0
        last = text[-1]
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if s[k - 1] == last and text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens)
