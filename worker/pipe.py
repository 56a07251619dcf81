"""Framed pickles over an OS pipe: the link between the worker front and its engine core.

A `multiprocessing.Queue` moves each message through a feeder thread on the sending side, and
its receiving side is a blocking call, which the front could only wait on from a thread of its
own that then wakes the event loop: three wake-ups per message, each about a millisecond on a
busy or virtualized machine, and all of them on the path of every request's first token. Here
the sender writes to the pipe itself and the front's event loop reads the pipe when it becomes
readable, so a message costs one wake-up of the process that receives it.

Frames are a 4-byte big-endian length and a pickle. The core's ends block (it has nothing else
to do while it waits); the front's ends never block its event loop: a write that does not fit in
the pipe is kept and finished when the pipe drains, and reads take what is there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import pickle
import queue
import select
import struct
import time
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct("!I")
_READ_CHUNK = 1 << 20
# A step's results for a few hundred streams run to tens of kilobytes; a pipe larger than the
# 64 KiB default lets the core write them without waiting for the front to read.
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _widen(fd: int) -> None:
    with contextlib.suppress(OSError):  # Linux only, and capped by /proc/sys/fs/pipe-max-size
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)


class _Frames:
    """Bytes read so far, cut into whole messages."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.items: collections.deque[Any] = collections.deque()
        self.eof = False

    def read_from(self, fd: int) -> None:
        """Takes everything the non-blocking `fd` holds now."""
        while True:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
            if len(chunk) < _READ_CHUNK:
                break
        buf, pos = self.buf, 0
        while len(buf) - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            end = pos + _HEADER.size + size
            if end > len(buf):
                break
            self.items.append(pickle.loads(buf[pos + _HEADER.size:end]))
            pos = end
        if pos:
            del buf[:pos]


def make_pipe(ctx: Any) -> tuple[Any, Any]:
    """A one-way pipe as two `multiprocessing` connections, (reader, writer): the spawn start
    method knows how to hand a connection to a child process. Wrap each end in one of the
    classes below."""
    reader, writer = ctx.Pipe(duplex=False)
    _widen(writer.fileno())
    return reader, writer


class BlockingReader:
    """The core's end for commands: `get(timeout)` and `get_nowait()`, as a queue has.

    Raises EOFError once the writer is gone and every message was taken.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn  # keeps the descriptor open
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._frames = _Frames()

    def get_nowait(self) -> Any:
        frames = self._frames
        if not frames.items and not frames.eof:
            frames.read_from(self._fd)
        if frames.items:
            return frames.items.popleft()
        if frames.eof:
            raise EOFError("the pipe's writer is gone")
        raise queue.Empty

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with contextlib.suppress(queue.Empty):
                return self.get_nowait()
            if not block:
                raise queue.Empty
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise queue.Empty
            select.select([self._fd], [], [], remaining)


class BlockingWriter:
    """The core's end for results: `put(obj)` writes the whole frame before it returns."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._fd = conn.fileno()
        os.set_blocking(self._fd, True)

    def put(self, obj: Any) -> None:
        view = memoryview(_frame(obj))
        while view:
            view = view[os.write(self._fd, view):]


class LoopReader:
    """The front's end for results: the event loop reads the pipe whenever it is readable and
    hands each message to `on_message`; `on_eof` runs once when the core's end closes."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[Any], None], on_eof: Callable[[], None]) -> None:
        self._conn = conn
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._frames = _Frames()
        self._loop = loop
        self._on_message = on_message
        self._on_eof = on_eof
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        frames = self._frames
        frames.read_from(self._fd)
        while frames.items:
            self._on_message(frames.items.popleft())
        if frames.eof:
            self.close()
            self._on_eof()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)


class LoopWriter:
    """The front's end for commands: `put(obj)` never blocks the event loop. What the pipe
    cannot take now is kept, in order, and written when the pipe drains."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._loop = loop
        self._pending = bytearray()
        self.closed = False

    def put(self, obj: Any) -> None:
        if self.closed:
            return  # the core is gone; the front is already stopping
        data = _frame(obj)
        if self._pending:
            self._pending += data
            return
        written = self._write(data)
        if written < len(data):
            self._pending += data[written:]
            self._loop.add_writer(self._fd, self._flush)

    def _write(self, data: bytes | bytearray) -> int:
        try:
            return os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except BrokenPipeError:
            self.closed = True
            self._pending.clear()
            return len(data)

    def _flush(self) -> None:
        written = self._write(self._pending)
        del self._pending[:written]
        if not self._pending:
            self._loop.remove_writer(self._fd)
