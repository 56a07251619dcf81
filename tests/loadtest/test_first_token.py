"""The first-token trace: every hop of a request's path is written and lined up, through a
real service (redis-server, worker, gateway processes)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import first_token


@pytest.mark.parametrize("busy_poll_ms", ["0", "2"])
def test_every_hop_of_every_request_is_traced(tmp_path: Path, busy_poll_ms: str) -> None:
    """With busy polling on too: the gateway, the front and the core poll between events."""
    out = tmp_path / "first_token.json"
    assert first_token.main(["--requests", "3", "--warmup", "1", "--output-len", "4",
                             "--no-redis-aof", "--busy-poll-ms", busy_poll_ms,
                             "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["traced"] == 3, report["missing_points"]
    hops = report["hops_ms"]
    for a, b in itertools.pairwise(first_token.HOPS):
        assert hops[f"{a} -> {b}"]["p50"] >= 0, (a, b)
    assert 0 < hops["outside the engine"]["p50"] < hops["in all"]["p50"]


def test_trace_points_write_only_when_asked(tmp_path: Path) -> None:
    code = "from shared import trace; trace.point('g_in', 'r1', 12.5); print(trace.ON)"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, check=True, cwd=Path.cwd())
    assert off.stdout.strip() == "False"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={"PATH": "/usr/bin:/bin", "SLUICE_TRACE_DIR": str(tmp_path / "t")},
                        check=True, cwd=Path.cwd())
    assert on.stdout.strip() == "True"
    (log,) = (tmp_path / "t").glob("*.log")
    assert log.read_text() == "12.500000 g_in r1\n"
