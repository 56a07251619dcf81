"""What the scaler needs from whatever runs the workers: local processes or a Kubernetes Deployment.

The scaler never kills a worker that holds requests. To shrink the fleet it first asks the chosen
workers to drain through their control channel (stop pulling, finish or hand back in-flight work,
report state "drained"), and only then tells the backend to remove exactly those workers.
"""

from __future__ import annotations

from typing import Protocol


class Backend(Protocol):
    """Starts and removes workers of one model."""

    name: str  # "local" or "kubernetes", for logs and metrics

    def replicas(self) -> int:
        """Workers the backend runs now: starting, ready and draining ones alike."""
        ...

    def scale_up(self, count: int) -> None:
        """Start `count` more workers. Returns at once; new workers announce themselves by heartbeat."""
        ...

    def remove(self, worker_ids: list[str]) -> None:
        """Remove these workers, which have already drained (state "drained" or gone), or
        which did not finish draining within the scaler's drain timeout.

        A backend that cannot pick which replica goes (a Deployment) must make these the ones
        that go, e.g. with the pod-deletion-cost annotation, before lowering the count.
        """
        ...

    def close(self) -> None:
        """Release what the backend holds; local processes are drained and stopped."""
        ...
