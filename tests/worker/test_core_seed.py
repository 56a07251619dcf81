"""Unseeded sampling differs between workers unless a seed is configured."""

from __future__ import annotations

import pytest
import torch

from shared.settings import WorkerSettings, load_settings
from worker.core_process import seed_unseeded_sampling


def draws(seed: int | None) -> tuple[int, list[float]]:
    used = seed_unseeded_sampling(seed)
    return used, torch.rand(8).tolist()


def test_no_seed_gives_each_process_its_own_draws() -> None:
    (seed_a, a), (seed_b, b) = draws(None), draws(None)
    assert seed_a != seed_b and a != b


def test_a_configured_seed_repeats() -> None:
    assert draws(1234) == draws(1234)


def test_the_seed_is_a_worker_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().seed is None
    monkeypatch.setenv("SLUICE_SEED", "7")
    assert load_settings(WorkerSettings).seed == 7
