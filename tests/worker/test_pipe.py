"""The front <-> engine core link: framed pickles over a pipe, read and written without a
thread between the pipe and the front's event loop."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import time
from typing import Any

import pytest

from worker.pipe import BlockingReader, BlockingWriter, LoopReader, LoopWriter, make_pipe

CTX = mp.get_context("spawn")
BIG = 3 << 20  # larger than the pipe: the frame crosses it in many reads


def echo_core(command_conn: Any, result_conn: Any) -> None:
    """A child that sends back every message it gets until None, then exits."""
    commands, results = BlockingReader(command_conn), BlockingWriter(result_conn)
    while (msg := commands.get()) is not None:
        results.put(msg)


def send_then_exit(result_conn: Any, messages: list[Any]) -> None:
    results = BlockingWriter(result_conn)
    for m in messages:
        results.put(m)


async def _collect(reader_conn: Any, expected: int) -> tuple[list[Any], bool]:
    loop = asyncio.get_running_loop()
    got: list[Any] = []
    ended = asyncio.Event()
    LoopReader(reader_conn, loop, got.append, ended.set)
    await asyncio.wait_for(ended.wait(), timeout=30)
    return got, len(got) == expected


def test_loop_reader_takes_every_message_in_order_then_sees_the_writer_exit() -> None:
    r, w = make_pipe(CTX)
    messages: list[Any] = [{"i": i, "pad": "x" * (i * 997)} for i in range(200)]
    messages.append(b"\x00" * BIG)
    proc = CTX.Process(target=send_then_exit, args=(w, messages))
    proc.start()
    w.close()  # the child's copy is the only writer left: its exit is the end of the pipe
    got, _ = asyncio.run(_collect(r, len(messages)))
    proc.join(timeout=10)
    assert got == messages


def test_round_trip_through_a_child_with_a_full_pipe_never_blocks_the_loop() -> None:
    cmd_r, cmd_w = make_pipe(CTX)
    res_r, res_w = make_pipe(CTX)
    proc = CTX.Process(target=echo_core, args=(cmd_r, res_w))
    proc.start()
    cmd_r.close()
    res_w.close()

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        got: list[Any] = []
        ended = asyncio.Event()
        LoopReader(res_r, loop, got.append, ended.set)
        writer = LoopWriter(cmd_w, loop)
        sent = [os.urandom(64 << 10) for _ in range(64)]  # 4 MiB: more than the pipe holds
        t0 = time.perf_counter()
        for m in sent:
            writer.put(m)
        assert time.perf_counter() - t0 < 1.0  # queued, not written while the loop waited
        writer.put(None)
        await asyncio.wait_for(ended.wait(), timeout=30)
        assert got == sent
        return got

    asyncio.run(main())
    proc.join(timeout=10)
    assert proc.exitcode == 0


def test_blocking_reader_waits_then_times_out_and_reports_the_end() -> None:
    r, w = make_pipe(CTX)
    reader, writer = BlockingReader(r), BlockingWriter(w)
    with pytest.raises(queue.Empty):
        reader.get_nowait()
    t0 = time.perf_counter()
    with pytest.raises(queue.Empty):
        reader.get(timeout=0.05)
    assert time.perf_counter() - t0 >= 0.05
    writer.put("a")
    writer.put(("b", 2))
    assert reader.get(timeout=1) == "a"
    assert reader.get_nowait() == ("b", 2)
    w.close()
    with pytest.raises(EOFError):
        reader.get(timeout=1)


def test_loop_writer_to_a_closed_reader_drops_quietly() -> None:
    r, w = make_pipe(CTX)
    r.close()

    async def main() -> None:
        writer = LoopWriter(w, asyncio.get_running_loop())
        writer.put("lost")  # the core is gone: the front learns it from the results pipe
        writer.put("lost too")
        assert writer.closed

    asyncio.run(main())


def _waits_then_reports(_args: dict[str, Any], commands: Any, results: Any) -> None:
    results.put("ready")
    commands.get()  # the front's end is closed: EOF


def _reports_into_a_closed_pipe(_args: dict[str, Any], _commands: Any, results: Any) -> None:
    results.put("x" * (2 << 20))  # more than the pipe holds, and nobody reads: broken pipe


@pytest.mark.parametrize("close", ["commands", "results"])
def test_core_main_ends_quietly_once_the_front_is_gone(close: str) -> None:
    from worker.core_process import core_main

    cmd_r, cmd_w = make_pipe(CTX)
    res_r, res_w = make_pipe(CTX)
    target = _waits_then_reports if close == "commands" else _reports_into_a_closed_pipe
    proc = CTX.Process(target=core_main, args=(target, {}, cmd_r, res_w))
    proc.start()
    cmd_r.close()
    res_w.close()
    if close == "commands":
        assert BlockingReader(res_r).get(timeout=30) == "ready"
        cmd_w.close()
    else:
        res_r.close()
    proc.join(timeout=30)
    assert proc.exitcode == 0  # no traceback, no error exit
