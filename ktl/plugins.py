"""Plugins: backbones, data sets, methods and generators from outside ktl (see docs/extending.md).

Two ways in, both ending in the same registries (`ktl.clients.backbones.BACKBONES`, `ktl.data.DATASETS`,
`ktl.methods.METHODS`, the generator adapters of `ktl.generator.registry`):

- **Entry points** of an installed package, in the groups of `GROUPS` (``ktl.backbones``,
  ``ktl.datasets``, ``ktl.methods``, ``ktl.generators``). Each entry point is loaded (its module is
  imported). If it names a *module* (``my_cnn = "my_pkg.cnn"``), importing it is the registration: the
  module uses the decorators (``@register_backbone``, …). If it names an *object*
  (``my-cnn = "my_pkg.cnn:MyCnn"``), that object is registered under the entry point's name by its
  group's rule (a backbone builder, a data set loader, a `Method` subclass, a generator loader) — unless
  that name already holds that very object (it was decorated as well).
- **``--plugin SPEC``** on the command line (or ``KTL_PLUGINS``, comma-separated): a dotted module path
  (imported) or a ``.py`` file (imported by path under a module name of its own); either registers with
  the decorators.

Entry points are discovered once per process (`discover_plugins`); a spec is loaded once per process
(`load_plugin`), so repeating it is harmless. Whatever goes wrong — no such module or file, an import
error, a name registered twice — is one `KtlError` line naming the plugin. This module imports nothing
heavy itself: the registries are imported only when an entry point is found.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType

from ktl.errors import KtlError

__all__ = [
    "GROUPS",
    "ENV_VAR",
    "discover_plugins",
    "load_plugin",
    "load_plugins",
    "loaded_plugins",
    "plugins_from_env",
]

logger = logging.getLogger(__name__)

ENV_VAR = "KTL_PLUGINS"

_discovered = False
_loaded: dict[str, ModuleType] = {}  # spec key (a module name or a resolved file path) → its module


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "(plugin)"


def _register_backbone(name: str, obj: object) -> None:
    from ktl.clients.backbones import BACKBONES, register_backbone

    if name in BACKBONES and BACKBONES[name].build is obj:
        return
    if not callable(obj):
        raise TypeError(f"a backbone is a callable (num_channels, image_size) -> nn.Module, got {obj!r}")
    register_backbone(name, _summary(obj))(obj)


def _register_dataset(name: str, obj: object) -> None:
    from ktl.data import DATASETS, register_dataset

    if DATASETS.get(name) is obj:
        return
    if not callable(obj):
        raise TypeError(f"a data set is a callable (DataConfig, seed) -> (ImageSet, splits), got {obj!r}")
    register_dataset(name)(obj)


def _register_method(name: str, obj: object) -> None:
    from ktl.methods import METHODS, Method, register_method

    if METHODS.get(name) is obj:
        return
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise TypeError(f"a method is a subclass of ktl.methods.Method, got {obj!r}")
    register_method(name)(obj)


def _register_generator(name: str, obj: object) -> None:
    from ktl.generator.registry import register_generator

    if not callable(obj):
        raise TypeError(f"a generator loader is a callable (GeneratorSpec, device) -> Generator, got {obj!r}")
    register_generator(name)(obj)


# group → how an entry point's object (not a module) is registered under the entry point's name
GROUPS: dict[str, Callable[[str, object], None]] = {
    "ktl.backbones": _register_backbone,
    "ktl.datasets": _register_dataset,
    "ktl.methods": _register_method,
    "ktl.generators": _register_generator,
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    kind = type(exc).__name__
    return f"{kind}: {detail}" if detail and not isinstance(exc, ValueError | KtlError) else detail or kind


def _load_entry_point(group: str, ep: EntryPoint) -> None:
    where = f"entry point {ep.name!r} ({ep.value}) of group {group}"
    try:
        obj = ep.load()
        if not isinstance(obj, ModuleType):
            GROUPS[group](ep.name, obj)
    except Exception as exc:
        raise KtlError(f"plugin {where} failed to load: {_one_line(exc)}") from exc
    logger.debug("loaded plugin %s", where)


def discover_plugins() -> None:
    """Load every entry point of the `GROUPS` once per process (later calls do nothing)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    found = entry_points()
    for group in GROUPS:
        for ep in found.select(group=group):
            _load_entry_point(group, ep)


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _import_file(spec: str) -> tuple[str, Callable[[], ModuleType]]:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise KtlError(f"plugin {spec!r}: no such file")
    path = path.resolve()
    key = str(path)

    def load() -> ModuleType:
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        stem = re.sub(r"\W", "_", path.stem)
        name = f"ktl_plugin_{stem}_{digest}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look a class's module up here
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module

    return key, load


def _import_module(spec: str) -> tuple[str, Callable[[], ModuleType]]:
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", spec):
        raise KtlError(f"plugin {spec!r}: neither a .py file nor a dotted module path")

    def load() -> ModuleType:
        return importlib.import_module(spec)

    return spec, load


def load_plugin(spec: str) -> ModuleType:
    """Import the plugin ``spec`` — a ``.py`` file path or a dotted module path — once per process.
    Raises `KtlError` (one line naming the plugin) if it cannot be found or fails to import."""
    spec = spec.strip()
    if not spec:
        raise KtlError("plugin '': an empty plugin spec")
    key, load = _import_file(spec) if _is_file_spec(spec) else _import_module(spec)
    if key in _loaded:
        return _loaded[key]
    try:
        module = load()
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and not _is_file_spec(spec) and (spec == missing or spec.startswith(missing + ".")):
            raise KtlError(f"plugin {spec!r}: no module named {missing!r}") from None
        raise KtlError(f"plugin {spec!r} failed to load: {_one_line(exc)}") from exc
    except Exception as exc:
        raise KtlError(f"plugin {spec!r} failed to load: {_one_line(exc)}") from exc
    _loaded[key] = module
    logger.debug("loaded plugin %s", spec)
    return module


def loaded_plugins() -> list[str]:
    """The specs of the plugins loaded in this process, in load order (each loads again by its spec):
    what another process must load to read this one's configuration (`ktl.config.SimulateConfig`)."""
    return list(_loaded)


def plugins_from_env(value: str | None) -> list[str]:
    """The specs of a ``KTL_PLUGINS`` value (comma-separated; blanks ignored)."""
    return [s.strip() for s in (value or "").split(",") if s.strip()]


def load_plugins(specs: Iterable[str] = ()) -> None:
    """Entry points (`discover_plugins`), then each spec of ``specs`` in order (`load_plugin`)."""
    discover_plugins()
    for spec in specs:
        load_plugin(spec)
