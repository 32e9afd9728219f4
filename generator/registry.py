"""Registry of generator adapters: ``kind`` → loader. No if/elif over names."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ktl.errors import GeneratorLoadError
from ktl.generator.base import Generator, GeneratorSpec

__all__ = ["register_generator", "load_generator", "available_generators"]

GeneratorLoader = Callable[[GeneratorSpec, torch.device], Generator]
_LOADERS: dict[str, GeneratorLoader] = {}


def register_generator(kind: str) -> Callable[[GeneratorLoader], GeneratorLoader]:
    """Decorator: make ``loader(spec, device)`` available as ``GeneratorSpec(kind=kind)`` (registering the
    same loader again under the same kind does nothing; another loader raises ``ValueError``)."""

    def wrap(loader: GeneratorLoader) -> GeneratorLoader:
        if kind in _LOADERS and _LOADERS[kind] is not loader:
            raise ValueError(f"generator kind {kind!r} is registered twice")
        _LOADERS[kind] = loader
        return loader

    return wrap


def available_generators() -> list[str]:
    return sorted(_LOADERS)


def load_generator(spec: GeneratorSpec, device: torch.device | str = "cpu") -> Generator:
    """Load the generator ``spec`` names onto ``device``; raises `GeneratorLoadError` with one clear line."""
    loader = _LOADERS.get(spec.kind)
    if loader is None:
        raise GeneratorLoadError(
            f"unknown generator kind {spec.kind!r}; available: {', '.join(available_generators())}"
        )
    return loader(spec, torch.device(device))
