"""Errors a request can end with, each knowing its HTTP status and OpenAI error body.

Code anywhere (gateway, settings, a worker's reply) raises one of these; the gateway turns it into
a response in one place (`gateway.errors`). No web framework is imported here, so processes
without one can raise and serialize them too.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SluiceError(Exception):
    """Base of every error a client is meant to see. `message` is shown to the client as is."""

    # Class-level defaults; plain attributes rather than ClassVars so that an error for a bare
    # status (`error_for_status`) can set them per instance.
    status_code: int = 500
    error_type: str = "server_error"  # the OpenAI body's `type`
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        # Only answers that invite a retry (429, 503) set it; the gateway sends it as Retry-After.
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class BadRequestError(SluiceError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(SluiceError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(SluiceError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(SluiceError):
    status_code = 404
    error_type = "not_found_error"


class PayloadTooLargeError(SluiceError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimitError(SluiceError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"


class RequestTimeoutError(SluiceError):
    status_code = 408
    error_type = "timeout"
    default_code = "timeout"


class ServiceUnavailableError(SluiceError):
    status_code = 503
    error_type = "service_unavailable_error"


class InternalError(SluiceError):
    status_code = 500
    error_type = "server_error"


_BY_STATUS: dict[int, type[SluiceError]] = {
    cls.status_code: cls
    for cls in (BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError,
                PayloadTooLargeError, RateLimitError, RequestTimeoutError,
                ServiceUnavailableError, InternalError)
}

# The `type` strings workers put on Event.error_type / RequestRecord.error_type. Several classes
# share "invalid_request_error"; the 400 one is what a worker means by it.
_BY_TYPE: dict[str, type[SluiceError]] = {
    "invalid_request_error": BadRequestError,
    "authentication_error": AuthenticationError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "rate_limit_exceeded": RateLimitError,
    "timeout": RequestTimeoutError,
    "service_unavailable_error": ServiceUnavailableError,
    "server_error": InternalError,
}


class _StatusError(SluiceError):
    """An error for a status no subclass covers (405, 415, ...): framework errors only."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = "server_error" if status_code >= 500 else "invalid_request_error"


def error_for_status(status_code: int, message: str) -> SluiceError:
    """The error a bare HTTP status stands for, e.g. a framework's 404 or 405."""
    cls = _BY_STATUS.get(status_code)
    return cls(message) if cls is not None else _StatusError(status_code, message)


def error_from_type(error_type: str | None, message: str) -> SluiceError:
    """Rebuilds the error a worker reported as (error_type, message); unknown types are 500s."""
    return _BY_TYPE.get(error_type or "", InternalError)(message)


def to_openai_body(err: SluiceError) -> dict[str, Any]:
    """The JSON body OpenAI clients parse: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": err.message, "type": err.error_type, "param": err.param,
                      "code": err.code}}
