"""The one place where errors become HTTP answers: ``{"error": {"reason": <code>, "message": ..., ...}}``.

The service and the store raise the project's own errors (`ktl.errors`): a `ServiceError` subclass says
what kind of refusal it is, a `PayloadError` which check an upload failed. `http_error` maps them to a
status here, and nowhere else.
"""

from __future__ import annotations

from typing import Any

from ktl.errors import (
    BadRequestError,
    ConflictError,
    CorruptFileError,
    ForbiddenError,
    InsufficientStorageError,
    InvalidRequestError,
    KtlError,
    NotFoundError,
    PayloadError,
    RateLimitedError,
    RequestTimeoutError,
    ServiceError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaError,
)

__all__ = ["ApiError", "PAYLOAD_STATUS", "SERVICE_STATUS", "http_error"]


class ApiError(Exception):
    """An HTTP answer with a machine-readable reason (built only by `http_error` and the app's handlers).

    Parameters
    ----------
    status
        HTTP status code.
    reason
        Short code, stable across versions (``"norm"``, ``"round_closed"``, …).
    message
        A sentence for humans.
    extra
        More fields for the error body (e.g. ``current_round``).
    headers
        Response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.extra = extra
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"reason": self.reason, "message": self.message, **self.extra}}


# The kind of refusal → HTTP status.
SERVICE_STATUS: dict[type[ServiceError], int] = {
    BadRequestError: 400,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    RequestTimeoutError: 408,
    ConflictError: 409,
    TooLargeError: 413,
    UnsupportedMediaError: 415,
    InvalidRequestError: 422,
    RateLimitedError: 429,
    CorruptFileError: 500,
    UnavailableError: 503,
    InsufficientStorageError: 507,
}

# PayloadError reasons (`Method.validate_upload`, `ktl.records`) → HTTP status: unreadable is 400, a
# readable upload whose values do not fit the federation is 422.
PAYLOAD_STATUS = {
    "not_safetensors": 400,
    "duplicate_tensor": 400,
    "missing_tensor": 400,
    "unexpected_tensor": 400,
    "bad_json": 400,
    "shape": 422,
    "dim": 422,
    "dtype": 422,
    "non_finite": 422,
    "norm": 422,
    "range": 422,
    "class_range": 422,
    "class_repeated": 422,
    "counts": 422,
    "empty": 422,
    "too_many_rows": 422,
}


def http_error(exc: KtlError) -> ApiError:
    """The HTTP answer for one of the project's errors."""
    if isinstance(exc, ServiceError):
        status = next((code for kind, code in SERVICE_STATUS.items() if isinstance(exc, kind)), 422)
        return ApiError(status, exc.reason, exc.message, headers=exc.headers, **exc.extra)
    if isinstance(exc, PayloadError):
        return ApiError(PAYLOAD_STATUS.get(exc.reason, 422), exc.reason, str(exc))
    return ApiError(422, "invalid", str(exc))
