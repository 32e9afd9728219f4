"""The service's layers: HTTP status codes live only at the HTTP edge; routes go through the services."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRANSPORT_FREE = [
    ROOT / "api" / "service.py",
    *sorted((ROOT / "api" / "store").glob("*.py")),
    *sorted((ROOT / "api" / "services").glob("*.py")),
]


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_service_and_the_store_know_no_http() -> None:
    assert len(TRANSPORT_FREE) >= 12
    for path in TRANSPORT_FREE:
        tree = ast.parse(path.read_text())
        web = {
            m
            for m in _imports(tree)
            if m.split(".")[0] in ("fastapi", "starlette")
            or m in ("ktl.api.errors", "ktl.api.limits", "ktl.api.deps")
        }
        assert not web, f"{path.name} imports {web}"
        statuses = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and type(n.value) is int and 400 <= n.value < 600
        ]
        assert not statuses, f"{path.name} holds HTTP status codes {statuses}"


def test_routers_go_through_the_services_never_the_store() -> None:
    for path in sorted((ROOT / "api" / "routers").glob("*.py")):
        tree = ast.parse(path.read_text())
        reach = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "store"]
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
        assert not reach and "Store" not in imported, path.name  # record types may be imported


def test_every_service_error_kind_has_one_status() -> None:
    from ktl import errors
    from ktl.api.errors import SERVICE_STATUS

    kinds = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ServiceError) and cls is not errors.ServiceError
    }
    assert kinds == set(SERVICE_STATUS)
