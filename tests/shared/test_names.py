"""Redis names: a model's keys share its hash tag, and no two names collide."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable

import pytest

from shared import names

MODELS = ["tiny", "llama-3.1-8b", "Qwen/Qwen3-0.6B", "a.b_c"]


def _builders() -> dict[str, Callable[..., str]]:
    """Every public name builder of shared.names, found by introspection so new ones are covered."""
    return {n: f for n, f in inspect.getmembers(names, inspect.isfunction)
            if not n.startswith("_") and f.__module__ == names.__name__}


def _model_builders() -> dict[str, Callable[..., str]]:
    """The builders of per-model keys: those whose first parameter is the model."""
    return {n: f for n, f in _builders().items()
            if next(iter(inspect.signature(f).parameters)) == "model"}


def _call(f: Callable[..., str], **known: str) -> str:
    """Call a builder, filling parameters not in `known` with a value named after the parameter."""
    params = inspect.signature(f).parameters
    return f(**{p: known.get(p, f"{p}-1") for p in params})


def _hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes: the text between the first '{' and the next '}', if non-empty."""
    start = key.find("{")
    end = key.find("}", start + 1)
    if start < 0 or end < 0 or end == start + 1:
        return None
    return key[start + 1:end]


def test_the_per_model_builders_are_found() -> None:
    assert {"queue", "dead_letters", "request_record", "cancel_channel"} <= set(_model_builders())


@pytest.mark.parametrize("model", MODELS)
def test_every_key_of_a_model_carries_its_hash_tag(model: str) -> None:
    for name, build in _model_builders().items():
        key = _call(build, model=model)
        assert f"{{{model}}}" in key, f"names.{name} -> {key!r}"
        assert _hash_tag(key) == model, f"names.{name} -> {key!r} hashes on {_hash_tag(key)!r}"


def test_names_are_distinct() -> None:
    per_model = _model_builders()
    keys = [(f"{n}({m!r})", _call(f, model=m)) for n, f in per_model.items() for m in MODELS]
    keys += [(n, _call(f)) for n, f in _builders().items() if n not in per_model]
    seen: dict[str, str] = {}
    for where, key in keys:
        assert key not in seen, f"{where} and {seen[key]} both give {key!r}"
        seen[key] = where


def test_same_arguments_give_distinct_names_across_builders() -> None:
    # Every builder fed the same string for every parameter: a collision here would mean two
    # kinds of data could overwrite each other.
    keys = {name: build(*["x"] * len(inspect.signature(build).parameters))
            for name, build in _builders().items()}
    assert len(set(keys.values())) == len(keys), keys


def test_constants_are_not_empty_and_the_heartbeat_pattern_matches() -> None:
    assert names.PREFIX and names.WORKER_GROUP and names.JOB_FIELD
    assert fnmatch.fnmatchcase(names.worker_heartbeat("host-1-abc"), names.WORKER_HEARTBEAT_PATTERN)
    for model in MODELS:
        for build in _model_builders().values():
            key = _call(build, model=model)
            assert not fnmatch.fnmatchcase(key, names.WORKER_HEARTBEAT_PATTERN), key
