"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny checkpoint, built once per test session. Treat it as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
