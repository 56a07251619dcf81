"""When each request is sent: offsets in seconds from the start of a benchmark run.

`request_rate` and `burstiness` mean what they mean in `vllm bench serve`: gaps between requests
are gamma-distributed with shape `burstiness` and mean 1 / rate, so burstiness 1 is a Poisson
process, below 1 burstier, above 1 more even; rate inf sends everything at once. The first
request goes at 0, as vLLM sends it before the first gap.

A burst profile (idle, spike, idle) sends every request inside a spike window after an idle
lead-in, then leaves the service idle again: the shape that makes an autoscaler scale up from
nothing and back down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class ArrivalError(ValueError):
    """Arrival options that describe no schedule (a rate <= 0, a burstiness <= 0)."""


@dataclass(frozen=True)
class BurstProfile:
    """Idle for `idle_before_s`, all requests within `spike_s`, idle for `idle_after_s`."""

    idle_before_s: float
    spike_s: float
    idle_after_s: float

    @classmethod
    def parse(cls, text: str) -> BurstProfile:
        """'IDLE:SPIKE:IDLE' seconds, e.g. '10:20:30'."""
        try:
            a, b, c = (float(x) for x in text.split(":"))
        except ValueError:
            raise ArrivalError(f"expected IDLE_S:SPIKE_S:IDLE_S, e.g. 10:20:30, got {text!r}"
                               ) from None
        if min(a, c) < 0 or b <= 0:
            raise ArrivalError(f"need idle times >= 0 and a spike > 0 s, got {text!r}")
        return cls(a, b, c)


def send_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0,
                 seed: int = 0) -> list[float]:
    """Send time of each request, from 0, for a gamma (Poisson when burstiness is 1) process."""
    if request_rate <= 0 or math.isnan(request_rate):
        raise ArrivalError(f"request rate must be > 0 (inf for all at once), got {request_rate}")
    if burstiness <= 0:
        raise ArrivalError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness),
                     size=max(0, num_requests - 1))
    return [0.0, *np.cumsum(gaps).tolist()][:num_requests]


def burst_offsets(num_requests: int, profile: BurstProfile, burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Send times for a burst profile: a gamma process at num_requests / spike_s, shifted past
    the idle lead-in and squeezed into the spike window when it runs over."""
    offsets = send_offsets(num_requests, num_requests / profile.spike_s, burstiness, seed)
    span = offsets[-1] if offsets else 0.0
    scale = min(1.0, profile.spike_s / span) if span > 0 else 1.0
    return [profile.idle_before_s + t * scale for t in offsets]
