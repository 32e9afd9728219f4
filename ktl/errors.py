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
