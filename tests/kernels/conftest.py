"""Kernel tests run on the CPU under the Triton interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before any kernel module is imported (`triton.jit` picks the
interpreter when it decorates a function), so this is done here, at conftest import time, ahead
of the test modules. On a GPU host the same tests run the compiled kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def capture_graph() -> Callable[[Callable[[], object]], tuple[torch.cuda.CUDAGraph, object]]:
    """Runs `fn` once on a side stream (compiling its kernels), then captures it into a CUDA
    graph; returns the graph and whatever the captured call returned (its static outputs)."""

    def capture(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph, out

    return capture
