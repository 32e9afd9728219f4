"""JSON request bodies are values: read strictly, before FastAPI's own (lax) validation.

FastAPI parses a body with ``json.loads`` and validates it in pydantic's lax mode, which takes ``"1"``
and ``true`` for a number and keeps the last of two equal keys. Every route of the API (`StrictJSONRoute`,
the routers' ``route_class``) reads its JSON body model first as pydantic's strict JSON mode does:

* a key twice in one object (``{"epsilon": 1, "epsilon": 0}``) is refused, naming the key;
* ``"1"`` or ``true`` where a number is expected, ``1`` where a string is, are refused, naming the field
  (an integer for a float and an array for a tuple are still fine: JSON has no other spelling);
* ``1e400``, ``Infinity`` and ``NaN`` reach the models, whose every float field refuses non-finite values
  (``allow_inf_nan=False``) and lies in a documented range.

Each is a 422 ``validation`` whose message names the field; nothing is stored. The strict reading happens
first, but its refusal is raised only once the route's dependencies have passed (as the endpoint is
called), so a caller without the right token still hears 401/403 first, as with FastAPI's own
validation. The upload route reads its body itself (`ktl.api.services.rounds`), under the same rules.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from ktl.records import DuplicateKeyError, loads_unique

__all__ = ["StrictJSONRoute", "strict_errors"]


def strict_errors(model: type[BaseModel], body: bytes) -> list[dict[str, Any]]:
    """What is wrong with ``body`` as a ``model`` read strictly (empty: nothing). Invalid JSON is left to
    FastAPI's own parser, which names the position."""
    try:
        loads_unique(body)
    except DuplicateKeyError as exc:
        return [{"type": "duplicate_key", "loc": ("body", exc.key), "msg": str(exc), "input": exc.key}]
    except ValueError:
        return []
    try:
        model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        return [
            {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"], "input": e.get("input")}
            for e in exc.errors(include_url=False)
        ]
    return []


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return (
        media == ""
        or media == "application/json"
        or (media.startswith("application/") and media.endswith("+json"))
    )


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    """The route's body model (``Model`` or ``Model | None``), or None."""
    if route.body_field is None:
        return None
    annotation = route.body_field.field_info.annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


# The strict reading's errors for the request being handled (a context variable: the endpoint may run on
# a worker thread, which gets a copy of the context).
_pending: ContextVar[list[dict[str, Any]] | None] = ContextVar("ktl_strict_errors", default=None)


def _refusing(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint``, raising the pending strict errors (if any) before it runs: after the dependencies."""

    def check() -> None:
        errors = _pending.get()
        if errors:
            raise RequestValidationError(errors)

    if inspect.iscoroutinefunction(endpoint):

        @functools.wraps(endpoint)
        async def async_endpoint(*args: Any, **kwargs: Any) -> Any:
            check()
            return await endpoint(*args, **kwargs)

        return async_endpoint

    @functools.wraps(endpoint)
    def sync_endpoint(*args: Any, **kwargs: Any) -> Any:
        check()
        return endpoint(*args, **kwargs)

    return sync_endpoint


class StrictJSONRoute(APIRoute):
    """An `APIRoute` whose JSON body, when it is one pydantic model, is also read strictly
    (`strict_errors`): 422 ``validation`` naming the field, once the route's dependencies have passed."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, _refusing(endpoint), **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = _body_model(self)
        if model is None:
            return handler

        async def strict_handler(request: Request) -> Response:
            errors = None
            if _is_json(request):
                body = await request.body()  # cached: FastAPI reads the same bytes after
                if body:
                    errors = strict_errors(model, body) or None
            token = _pending.set(errors)
            try:
                return await handler(request)
            finally:
                _pending.reset(token)

        return strict_handler
