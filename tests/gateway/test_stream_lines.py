"""The template-built SSE lines of plain mid-stream tokens equal what the general chunk
builders and json.dumps produce, byte for byte."""

from __future__ import annotations

import json

import pytest

from gateway.app import _stream_chunks, _TextLines
from shared.messages import Event, Job

TEXTS = [" hello", "\"quoted\"", "back\\slash", "line\nbreak", "tab\t", "é ü 中文 🙂", "\x00\x1f",
         "</script>", "{\"json\": [1]}"]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_template_lines_match_the_general_chunks(kind: str) -> None:
    job = Job(id="req-1", model="m", kind=kind, prompt="x" if kind == "completion" else None,
              messages=[{"role": "user", "content": "x"}] if kind == "chat" else None,
              created=1_795_000_000.7)
    lines = _TextLines(kind, job)
    offsets: dict[int, int] = {}
    for seq, text in enumerate(TEXTS):
        for index in (0, 1):
            ev = Event(req_id=job.id, index=index, seq=seq, text=text, token_ids=[seq])
            fast = lines.line(ev, first=False)
            (chunk,) = _stream_chunks(ev, kind, job, offsets, first=False)
            assert fast == f"data: {json.dumps(chunk)}\n\n"


@pytest.mark.parametrize(("changes", "first"), [
    ({"finish_reason": "stop", "stop_reason": None}, False),
    ({"logprobs": [{"token": "a", "token_id": 1, "logprob": -0.1, "top": []}]}, False),
    ({"text": ""}, False),
    ({}, True),  # a chat choice's first event carries the role
])
def test_other_events_take_the_general_path(changes: dict, first: bool) -> None:
    job = Job(id="req-2", model="m", kind="chat", messages=[{"role": "user", "content": "x"}])
    ev = Event(**{"req_id": job.id, "index": 0, "seq": 0, "text": "a", "token_ids": [1],
                  **changes})
    assert _TextLines("chat", job).line(ev, first=first) is None
