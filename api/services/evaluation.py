"""How the federation learns: the clients' own evaluation, attached to their uploads, summed per round.

A client may send, with an upload, the metrics it measured on its own test data — a few named finite
numbers and ``n_samples``, the samples they were measured on — as the ``Ktl-Metrics`` request header
(a JSON object: ``{"n_samples": 120, "accuracy": 0.81, "loss": 0.52}``). They are checked here
(`parse_upload_metrics`), stored with the upload (one transaction), and summarised per round
(`summarize`): for each name the sample-weighted mean over the clients that reported it (PFLlib's
accuracy: Σ correct / Σ tested when the value is an accuracy), the spread across those clients
(sample-weighted standard deviation, min, max) and how many clients and samples stand behind it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ktl.api.store import MetricSums
from ktl.errors import InvalidRequestError

__all__ = [
    "MAX_METRICS",
    "MAX_METRICS_HEADER",
    "METRICS_HEADER",
    "UploadMetrics",
    "parse_upload_metrics",
    "summarize",
]

METRICS_HEADER = "Ktl-Metrics"
MAX_METRICS_HEADER = 1024  # characters of the header: a few names and numbers need far less
MAX_METRICS = 8  # named values besides n_samples
MAX_N_SAMPLES = 2**31 - 1  # a client's test set; more would only make one client outweigh the rest
METRIC_BOUND = 1e12  # |value|: any accuracy, loss or count a client reports fits; squares stay exact enough
METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class UploadMetrics:
    """A client's evaluation for one round: ``values`` measured on ``n_samples`` samples."""

    n_samples: int
    values: dict[str, float]

    def to_json(self) -> str:
        """The stored form: one flat JSON object, keys sorted."""
        return json.dumps({"n_samples": self.n_samples, **self.values}, sort_keys=True)


def _refuse(message: str, field: str) -> InvalidRequestError:
    return InvalidRequestError("bad_metrics", f"{METRICS_HEADER}: {message}", field=field)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _refuse(f"{key!r} is given twice", key)
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise _refuse(f"{name} is not a number JSON allows", "body")


def parse_upload_metrics(text: str) -> UploadMetrics:
    """The ``Ktl-Metrics`` header's value, checked: a JSON object of at most `MAX_METRICS` names
    (lower-case ``[a-z][a-z0-9_]*``, ≤ 32 characters) with finite numbers within ±`METRIC_BOUND`, and
    ``n_samples``, an integer in [1, 2³¹). Duplicate names, strings, booleans, NaN and infinities are
    refused (422 ``bad_metrics`` naming the field), never coerced."""
    if len(text) > MAX_METRICS_HEADER:
        raise _refuse(f"{len(text)} characters; at most {MAX_METRICS_HEADER}", "body")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ValueError as exc:
        raise _refuse(f"not JSON ({exc})", "body") from None
    if not isinstance(data, dict):
        raise _refuse("must be a JSON object of named numbers", "body")
    n = data.pop("n_samples", None)
    if n is None:
        raise _refuse("n_samples (the samples the values were measured on) is required", "n_samples")
    if type(n) is not int or not 1 <= n <= MAX_N_SAMPLES:
        raise _refuse(f"n_samples must be an integer in [1, {MAX_N_SAMPLES}], got {n!r}", "n_samples")
    if not data:
        raise _refuse("no metric given besides n_samples", "body")
    if len(data) > MAX_METRICS:
        raise _refuse(f"{len(data)} metrics; at most {MAX_METRICS}", "body")
    values: dict[str, float] = {}
    for name, value in data.items():
        if not METRIC_NAME.fullmatch(name):
            raise _refuse(f"metric name {name[:40]!r} must match {METRIC_NAME.pattern}", name[:40])
        if type(value) not in (int, float):  # bool is an int in Python: refused here, not coerced
            raise _refuse(f"{name} must be a number, got {type(value).__name__}", name)
        if not math.isfinite(value) or abs(value) > METRIC_BOUND:
            raise _refuse(f"{name} must be finite and within ±{METRIC_BOUND:g}, got {value!r}", name)
        values[name] = float(value)
    return UploadMetrics(n_samples=n, values=values)


def summarize(sums: Iterable[MetricSums]) -> dict[int, dict[str, dict[str, float | int]]]:
    """round → metric name → ``{mean, std, min, max, clients, n_samples}``: the sample-weighted mean and
    standard deviation across the clients that reported the metric, and its extremes."""
    out: dict[int, dict[str, dict[str, float | int]]] = {}
    for s in sums:
        mean = s.weighted_sum / s.n_samples
        # E[v²] − E[v]²; rounding can leave a tiny negative (all clients equal): that is a spread of 0.
        variance = max(0.0, s.weighted_squares / s.n_samples - mean * mean)
        out.setdefault(s.round, {})[s.name] = {
            "mean": min(max(mean, s.min), s.max),  # rounding never puts the mean outside the values
            "std": math.sqrt(variance),
            "min": s.min,
            "max": s.max,
            "clients": s.clients,
            "n_samples": s.n_samples,
        }
    return out
