"""Errors a user can act on.

`KtlError` and its subclasses carry a message meant to be shown as-is: the CLI prints it as one line
(`ktl: error: ...`) and the API turns it into a 4xx with a machine-readable ``reason``. This module has
no dependencies so that every package (the leaves included) may raise these.
"""

from __future__ import annotations


class KtlError(Exception):
    """An error caused by input a user can fix (config, data, a payload)."""


class ConfigError(KtlError):
    """A configuration value is invalid."""


class DataError(KtlError):
    """A data set is missing, unreadable or cannot be partitioned as asked."""


class GeneratorLoadError(KtlError):
    """A generator folder is missing, corrupted or of the wrong kind."""


class PayloadError(KtlError):
    """A tensor payload (prototypes, pairs) is malformed.

    Parameters
    ----------
    reason
        A short machine-readable code, e.g. ``"shape"``, ``"non_finite"``, ``"class_range"``.
    message
        A human-readable sentence.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ServiceError(KtlError):
    """A request the server refuses, with a machine-readable ``reason`` and extra fields for the answer.

    The service and the store raise the subclasses below, which say what kind of refusal it is; only the
    HTTP layer (``ktl.api.errors``) turns a kind into a status code.
    """

    def __init__(
        self, reason: str, message: str, *, headers: dict[str, str] | None = None, **extra: object
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.headers = headers
        self.extra = extra


class NotFoundError(ServiceError):
    """The named federation, client, round or job does not exist."""


class ConflictError(ServiceError):
    """The request contradicts the current state (a closed round, a different second upload, …)."""


class InvalidRequestError(ServiceError):
    """The request is well-formed but its values cannot be used (an unknown generator, too many images)."""


class UnauthorizedError(ServiceError):
    """No credentials, or credentials nobody issued."""


class ForbiddenError(ServiceError):
    """Valid credentials that do not allow this request."""


class RateLimitedError(ServiceError):
    """Too many requests from one caller; ``retry_after_s`` says when to come back."""


class TooLargeError(ServiceError):
    """A request body over its limit."""


class UnsupportedMediaError(ServiceError):
    """A body in an encoding the route does not read."""


class BadRequestError(ServiceError):
    """A malformed request (e.g. a Content-Length that is not a number)."""


class RequestTimeoutError(ServiceError):
    """A request body that did not arrive in time."""


class InsufficientStorageError(ServiceError):
    """The disk is (nearly) full: nothing was written; try again later."""


class CorruptFileError(ServiceError):
    """A stored file does not match the checksum recorded when it was written."""


class UnavailableError(ServiceError):
    """The server cannot take this now (e.g. a paused federation, a full queue); try again later."""
