"""The SDK retries transient failures (connection errors, 5xx, 429) with backoff, and nothing else."""

from __future__ import annotations

import httpx
import pytest

from ktl.clients.sdk import KtlApiError, KtlHttpClient


def client_with(responses: list, **kwargs) -> tuple[KtlHttpClient, list[float], list[httpx.Request]]:  # type: ignore[no-untyped-def]
    seen: list[httpx.Request] = []
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    http = httpx.Client(base_url="http://ktl.test", transport=httpx.MockTransport(handler))
    return KtlHttpClient("http://ktl.test", "tok", http=http, sleep=sleeps.append, **kwargs), sleeps, seen


def err(status: int, reason: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"reason": reason, "message": reason}}, headers=headers)


def test_retries_5xx_then_succeeds_with_growing_backoff() -> None:
    client, sleeps, seen = client_with(
        [err(503, "busy"), err(502, "gw"), httpx.Response(200, json={"ok": 1})], backoff=0.1
    )
    assert client.round("f", 1) == {"ok": 1}
    assert len(seen) == 3 and seen[0].headers["authorization"] == "Bearer tok"
    assert 0.05 <= sleeps[0] <= 0.15 and 0.1 <= sleeps[1] <= 0.3


def test_429_honours_retry_after() -> None:
    client, sleeps, _ = client_with(
        [err(429, "rate_limited", **{"Retry-After": "2"}), httpx.Response(200, json={})]
    )
    client.round("f", 1)
    assert sleeps == [2.0]


def test_connection_errors_are_retried() -> None:
    client, sleeps, seen = client_with([httpx.ConnectError("refused"), httpx.Response(200, json={"a": 1})])
    assert client.federation("f") == {"a": 1} and len(sleeps) == 1 and len(seen) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 415, 422])
def test_other_4xx_raise_at_once(status: int) -> None:
    client, sleeps, seen = client_with([err(status, "nope"), httpx.Response(200, json={})])
    with pytest.raises(KtlApiError) as info:
        client.round("f", 1)
    assert info.value.status == status and info.value.reason == "nope" and sleeps == [] and len(seen) == 1


def test_retries_are_bounded() -> None:
    client, sleeps, seen = client_with([err(500, "boom")] * 4, retries=3)
    with pytest.raises(KtlApiError) as info:
        client.round("f", 1)
    assert info.value.status == 500 and len(seen) == 4 and len(sleeps) == 3


def test_timeout_is_set_on_the_connection() -> None:
    client = KtlHttpClient("http://127.0.0.1:9", "t", timeout=1.5)
    assert client._http.timeout == httpx.Timeout(1.5)
    client.close()
