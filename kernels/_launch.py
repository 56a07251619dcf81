"""Launch settings shared by the elementwise kernels."""

from __future__ import annotations

import triton


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (CPU tests), which takes CPU tensors."""
    return bool(triton.knobs.runtime.interpret)


def num_warps(width: int) -> int:
    """Warps for a program that sweeps one row of `width` elements."""
    if width <= 256:
        return 1
    if width <= 512:
        return 2
    if width <= 1024:
        return 4
    if width <= 4096:
        return 8
    return 16
