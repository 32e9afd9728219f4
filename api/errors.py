"""API errors: every 4xx carries ``{"error": {"reason": <code>, "message": <sentence>, ...}}``."""

from __future__ import annotations

from typing import Any

from ktl.errors import PayloadError

__all__ = ["ApiError", "PAYLOAD_STATUS", "from_payload_error"]


class ApiError(Exception):
    """An HTTP error with a machine-readable reason.

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


# PayloadError reasons (ktl.records) → HTTP status.
PAYLOAD_STATUS = {
    "not_safetensors": 400,
    "missing_tensor": 400,
    "unexpected_tensor": 400,
    "bad_json": 400,
    "shape": 422,
    "dim": 422,
    "dtype": 422,
    "non_finite": 422,
    "norm": 422,
    "class_range": 422,
    "class_repeated": 422,
    "counts": 422,
    "empty": 422,
    "too_many_rows": 422,
}


def from_payload_error(exc: PayloadError) -> ApiError:
    return ApiError(PAYLOAD_STATUS.get(exc.reason, 422), exc.reason, str(exc))
