"""A request's progress as its clients saw it, so that another worker can resume it exactly.

One Redis string per request (`names.checkpoint`), appended to in the pipeline that publishes a
step's events and ahead of the PUBLISH: whatever a client received is in the checkpoint. With
random sampling a resumed completion must continue from every token its client has, or the
client's text would splice two generations. Each line is one completion's delta of one step,
JSON `[index, token_ids, seq]` (`seq`: the completion's tokens before it), or `[index, token_ids,
finish_reason, stop_reason, seq]` on its last line. A step the front sent again after losing
Redis may be appended twice; `seq` tells the copy, which `parse` skips. (Lines without `seq`, of
earlier workers, are read as they are.) The
deltas are kept as they were published so that replaying them rebuilds the detokenizer's state,
held-back text included, exactly.

A step's lines for all its requests go in one script call rather than one APPEND each: the
commands, not the bytes, are what cost the worker's front per step (measured: 2.3 ms against
5.0 ms a step for 256 streams). All keys of a model share its hash tag, so this stays legal on
a Redis Cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# KEYS: checkpoints (a key twice for two completions); ARGV[1]: their lines concatenated, one
# per key in order, each ending in a newline; ARGV[2]: the TTL in seconds (kept fresh as it
# grows). One packed argument rather than one per line: the front encodes every argument in
# Python, each step, for every request.
APPEND_SCRIPT = """
local data, pos = ARGV[1], 1
for _, key in ipairs(KEYS) do
    local stop = string.find(data, '\\n', pos, true)
    redis.call('APPEND', key, string.sub(data, pos, stop))
    redis.call('EXPIRE', key, ARGV[2])
    pos = stop + 1
end"""


@dataclass
class CompletionProgress:
    """One completion, as far as it was published."""

    chunks: list[list[int]] = field(default_factory=list)  # token ids, one list per step
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def line(index: int, token_ids: list[int], finish_reason: str | None,
         stop_reason: int | str | None, seq: int) -> str:
    if finish_reason is None:  # the common line, every step: cheaper than json.dumps
        return f"[{index},[{','.join(map(str, token_ids))}],{seq}]\n"
    return json.dumps([index, token_ids, finish_reason, stop_reason, seq],
                      separators=(",", ":")) + "\n"


def parse(raw: bytes | str, n: int) -> list[CompletionProgress]:
    """The progress of each of a request's `n` completions. A line for an index outside `n` (a
    checkpoint of some other shape) is ignored."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    progress = [CompletionProgress() for _ in range(n)]
    if text.startswith("{"):
        # Written by earlier workers for n == 1: the tokens up to a point with no held-back text.
        saved = json.loads(text)
        progress[0].chunks.append(list(saved["token_ids"]))
        return progress
    read = [0] * n  # tokens read so far, per completion
    for row in text.splitlines():
        if not row:
            continue
        index, token_ids, *rest = json.loads(row)
        if not 0 <= index < n:
            continue
        p = progress[index]
        # A line with its seq has one item (or three, with the end) after the tokens.
        seq, end = (rest[-1], rest[:-1]) if len(rest) % 2 else (None, rest)
        if seq is not None and (seq < read[index] or p.finish_reason is not None):
            continue  # a copy of a step already read
        p.chunks.append(token_ids)
        read[index] += len(token_ids)
        if end:
            p.finish_reason, p.stop_reason = end
    return progress
