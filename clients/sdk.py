"""The HTTP client SDK for a ktl server (httpx): clients upload prototypes and fetch pairs; operators
create federations, register clients and run batch jobs.

Every call has a timeout. Transient failures — connection errors, 5xx, 429 — are retried with
exponential backoff and jitter (``Retry-After`` is honoured; 507, a full disk, is retried too); other 4xx answers raise `KtlApiError` at
once with the server's machine-readable ``reason``. Retrying an upload is safe: the server answers the
identical upload again with 200 and changes nothing.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import torch

from ktl.records import Pairs, Prototypes

__all__ = ["KtlApiError", "KtlHttpClient"]

logger = logging.getLogger(__name__)

# Transient answers: rate limits, server errors, a server that is starting or overloaded, a full disk.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504, 507})


class KtlApiError(Exception):
    """A non-retryable answer (or retries exhausted): ``status``, ``reason``, and the whole error body."""

    def __init__(self, status: int, reason: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}


def _error(response: httpx.Response) -> KtlApiError:
    try:
        err = response.json().get("error", {})
    except ValueError:
        err = {}
    return KtlApiError(
        response.status_code, err.get("reason", "http_error"), err.get("message", response.text[:200]), err
    )


class KtlHttpClient:
    """One connection to a ktl server, authenticated with one bearer token (a client's, or the admin's).

    Parameters
    ----------
    base_url
        e.g. ``http://127.0.0.1:8000``.
    token
        Bearer token.
    timeout
        Seconds for connect, read and write of each attempt.
    retries
        Extra attempts after the first for transient failures.
    backoff
        First retry delay in seconds; doubled each attempt (with ±50 % jitter), capped at 30 s.
    http
        An existing ``httpx.Client`` to use instead (e.g. FastAPI's ``TestClient``).
    sleep
        Injected for tests.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.25,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = http if http is not None else httpx.Client(base_url=base_url, timeout=timeout)
        self._headers = headers
        self.retries = retries
        self.backoff = backoff
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KtlHttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send with retries on connection errors, 5xx and 429; raise `KtlApiError` for other 4xx."""
        headers = {**self._headers, **kwargs.pop("headers", {})}
        attempt = 0
        while True:
            last = attempt >= self.retries
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                if last:
                    raise
                delay = self._delay(attempt, None)
                logger.warning("%s %s: %s; retrying in %.2fs", method, path, exc, delay)
            else:
                if response.status_code < 400:
                    return response
                if response.status_code not in _RETRY_STATUS or last:
                    raise _error(response)
                delay = self._delay(attempt, response.headers.get("retry-after"))
                logger.warning("%s %s: %d; retrying in %.2fs", method, path, response.status_code, delay)
            self._sleep(delay)
            attempt += 1

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(60.0, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(30.0, self.backoff * 2**attempt) * random.uniform(0.5, 1.5)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # -- client calls -----------------------------------------------------------------------------

    def federation(self, fid: str, *, include_etf: bool = False) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/federations/{fid}", params={"include_etf": include_etf}))

    def etf(self, fid: str) -> torch.Tensor:
        """The federation's ``(K, C)`` ETF classifier (safetensors: any size, exact float32)."""
        from safetensors.torch import load

        return load(self.request("GET", f"/v1/federations/{fid}/etf").content)["etf"]

    def round(self, fid: str, r: int) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/federations/{fid}/rounds/{r}"))

    def upload(
        self,
        fid: str,
        r: int,
        prototypes: Prototypes,
        *,
        dtype: torch.dtype = torch.float16,
        metrics: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Upload prototypes for round ``r`` as safetensors (fp16 by default: half the bytes)."""
        return self.upload_bytes(fid, r, prototypes.to_bytes(dtype), metrics=metrics)

    def upload_bytes(
        self, fid: str, r: int, payload: bytes, *, metrics: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """Upload a method's payload (safetensors bytes, as `Method.client_update` made them).

        ``metrics``: the client's own evaluation this round, sent with it (the ``Ktl-Metrics`` header) —
        ``n_samples`` (the samples measured on) and a few named finite numbers, e.g.
        ``{"n_samples": 120, "accuracy": 0.81}``; the server summarises them per round.
        """
        headers = {"Content-Type": "application/octet-stream"}
        if metrics is not None:
            headers["Ktl-Metrics"] = json.dumps(metrics, allow_nan=False, separators=(",", ":"))
        return dict(
            self._json(
                "POST", f"/v1/federations/{fid}/rounds/{r}/prototypes", content=payload, headers=headers
            )
        )

    def metrics(self, fid: str, *, after: int = 0, limit: int = 100) -> dict[str, Any]:
        """The clients' metrics round by round from round ``after`` + 1 (a page of ``limit`` rounds)."""
        return dict(
            self._json("GET", f"/v1/federations/{fid}/metrics", params={"after": after, "limit": limit})
        )

    def wait_for_round(
        self, fid: str, r: int, *, timeout: float = 600.0, poll: float = 0.2
    ) -> dict[str, Any]:
        """Poll until round ``r`` is published or failed; raises `TimeoutError` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.round(fid, r)
            if state["state"] in ("published", "failed"):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {r} of {fid} is still {state['state']} after {timeout:.0f}s")
            self._sleep(poll)

    def broadcast(self, fid: str, r: int) -> bytes:
        """A published round's broadcast bytes, whatever the federation's method (`Method.client_receive`
        takes them)."""
        return self.request("GET", f"/v1/federations/{fid}/rounds/{r}/broadcast").content

    def pairs(self, fid: str, r: int) -> Pairs:
        return Pairs.from_bytes(self.request("GET", f"/v1/federations/{fid}/rounds/{r}/pairs").content)

    def pairs_png(self, fid: str, r: int) -> bytes:
        return self.request("GET", f"/v1/federations/{fid}/rounds/{r}/pairs.png").content

    # -- admin calls ------------------------------------------------------------------------------

    def create_federation(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json("POST", "/v1/federations", json=spec))

    def register_client(self, fid: str, name: str | None = None) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/federations/{fid}/clients", json={"name": name}))

    def clients(self, fid: str, *, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        """One page of a federation's clients, in registration order (``after``: the last id before)."""
        params: dict[str, Any] = {"limit": limit} | ({"after": after} if after else {})
        return list(self._json("GET", f"/v1/federations/{fid}/clients", params=params))

    def remove_client(self, fid: str, client_id: str) -> dict[str, Any]:
        return dict(self._json("DELETE", f"/v1/federations/{fid}/clients/{client_id}"))

    def federations(self, *, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        """One page of federations (``after``: the last id of the page before)."""
        params: dict[str, Any] = {"limit": limit} | ({"after": after} if after else {})
        return list(self._json("GET", "/v1/federations", params=params))

    def pause_federation(self, fid: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/federations/{fid}/pause"))

    def resume_federation(self, fid: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/federations/{fid}/resume"))

    def delete_federation(self, fid: str) -> None:
        self.request("DELETE", f"/v1/federations/{fid}")

    def cancel_round(self, fid: str, r: int) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/federations/{fid}/rounds/{r}/cancel"))

    def submit_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json("POST", "/v1/jobs", json=spec))

    def jobs(self, *, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        """One page of jobs, newest first (``after``: the last id of the page before)."""
        params: dict[str, Any] = {"limit": limit} | ({"after": after} if after else {})
        return list(self._json("GET", "/v1/jobs", params=params))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("DELETE", f"/v1/jobs/{job_id}"))

    def wait_for_job(self, job_id: str, *, timeout: float = 3600.0, poll: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['state']} after {timeout:.0f}s")
            self._sleep(poll)

    def job_result_bytes(self, job_id: str) -> bytes:
        """A finished job's safetensors file, as the server stored it."""
        return self.request("GET", f"/v1/jobs/{job_id}/result").content

    def job_result(self, job_id: str) -> dict[str, torch.Tensor]:
        """``images`` (uint8 NCHW), ``latents``, ``class_ids`` of a finished job."""
        from safetensors.torch import load

        return load(self.request("GET", f"/v1/jobs/{job_id}/result").content)
