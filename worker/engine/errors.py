"""Typed errors raised by the engine.

Every error a caller can cause is raised at `Engine.add_request` (never inside a step), as a
subclass of `InvalidRequestError`, so a serving layer maps the whole family to a 400 in one place.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be run as given; the message says which field and why."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range or inconsistent with another."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus any requested output) does not fit the model's context."""


class DuplicateRequestError(InvalidRequestError):
    """A request with this id is already in the engine."""


class ModelLoadError(EngineError):
    """A model directory, config or checkpoint could not be loaded."""
