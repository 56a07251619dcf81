"""The bare hop chain runs end to end: real redis-server, front, core and gateway processes."""

from loadtest import hop_floor


def test_bare_chain_answers_every_request() -> None:
    out = hop_floor.measure([0.0, 1.0], requests=5, warmup=1, aof=False)
    assert set(out) == {"gap_0ms", "gap_1ms"}
    for summary in out.values():
        assert summary["n"] == 5
        assert 0 < summary["p50"] < 1000  # ms: one request's first event came back
