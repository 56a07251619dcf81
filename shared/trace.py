"""Trace points on a first token's path, for `loadtest/first_token.py`.

With SLUICE_TRACE_DIR set, each process appends `epoch_seconds tag request_id` lines to a file
of its own in that folder; without it `point` does nothing and `ON` is False, so code that would
work out whether to call it (per token) can skip that too. Tags, in path order:

    g_in      the gateway took the request (its body read)
    g_xadd    the gateway sends the job (admission script)
    f_read    the worker front's XREADGROUP returned it
    f_engine  the front writes it to the engine core
    c_add     the core took it
    c_token   the core's step made its first token
    f_result  the front read that step's results
    f_publish the front sends the first token's PUBLISH
    g_reply   the gateway's reply channel delivered it
    g_sse     the gateway hands the first SSE chunk to the server
"""

from __future__ import annotations

import os
import time
from typing import TextIO

_DIR = os.environ.get("SLUICE_TRACE_DIR")
ON = bool(_DIR)
_file: TextIO | None = None


def _write(tag: str, request_id: str, at: float | None = None) -> None:
    global _file
    if _file is None:  # opened in the process that writes: the core is a spawned child
        assert _DIR is not None
        os.makedirs(_DIR, exist_ok=True)
        _file = open(os.path.join(_DIR, f"{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115
    _file.write(f"{time.time() if at is None else at:.6f} {tag} {request_id}\n")


def _nothing(tag: str, request_id: str, at: float | None = None) -> None:
    return None


point = _write if ON else _nothing
