"""`sluice up` and `sluice scaler` flags: what they teach and how they refuse bad settings."""

from __future__ import annotations

import os
import subprocess
import sys


def _sluice(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_up_help_teaches_the_worker_bounds() -> None:
    proc = _sluice("up", "--help")
    assert proc.returncode == 0
    for flag in ("--min-workers", "--max-workers", "--idle-timeout"):
        assert flag in proc.stdout


def test_bounds_that_cross_are_refused_without_a_traceback() -> None:
    proc = _sluice("up", "--min-workers", "3", "--max-workers", "2")
    assert proc.returncode == 2
    assert "min_workers (3) must not exceed max_workers (2)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _sluice("scaler", "--max-workers", "1", SLUICE_MIN_WORKERS="2")
    assert proc.returncode == 2
    assert "must not exceed" in proc.stderr


def test_kubernetes_backend_outside_a_cluster_says_what_to_do() -> None:
    proc = _sluice("scaler", "--backend", "kubernetes", KUBECONFIG=os.devnull,
                   KUBERNETES_SERVICE_HOST="")
    assert proc.returncode == 2
    assert "kubernetes backend cannot start" in proc.stderr
    assert "KUBECONFIG" in proc.stderr and "Traceback" not in proc.stderr
