"""The tool-call format the grammar enforces and its parsing back into OpenAI `tool_calls`.

The model writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the format Qwen and
Hermes-style templates use). `ToolCallParser` reads text as it streams: text before the first
call is content; each closed call becomes one OpenAI tool call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the OpenAI API sends it

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index  # streamed deltas carry their call's position
        return out


@dataclass
class ToolCallParser:
    """Feed text as it arrives; get content to show now and tool calls as they close."""

    _buffer: str = ""
    _in_calls: bool = False
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content released by this text, calls closed by it)."""
        self._buffer += text
        released = ""
        if not self._in_calls:
            at = self._buffer.find(TOOL_CALL_OPEN)
            if at < 0:
                # Hold back a tail that may be the start of the opening tag.
                keep = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
                released, self._buffer = self._buffer[:len(self._buffer) - keep], \
                    self._buffer[len(self._buffer) - keep:]
                self.content += released
                return released, []
            released, self._buffer = self._buffer[:at], self._buffer[at:]
            self.content += released
            self._in_calls = True
        closed = []
        while True:
            start = self._buffer.find(TOOL_CALL_OPEN)
            end = self._buffer.find(TOOL_CALL_CLOSE, max(start, 0))
            if start < 0 or end < 0:
                break
            call = _parse_call(self._buffer[start + len(TOOL_CALL_OPEN):end])
            self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE):]
            if call is not None:
                self.calls.append(call)
                closed.append(call)
        return released, closed

    def finish(self) -> str:
        """Text left over at the end: content if no call ever started, else dropped (an
        unclosed call, e.g. cut by max_tokens)."""
        rest, self._buffer = self._buffer, ""
        if not self._in_calls:
            self.content += rest
            return rest
        return ""


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _parse_call(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=data["name"],
                    arguments=json.dumps(data.get("arguments", {}), ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output: (content or None, calls)."""
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    return (parser.content or None) if parser.calls else parser.content, parser.calls
