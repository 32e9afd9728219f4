"""Derived seeds: one run seed fans out into independent, stable streams (data, models, rounds)."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "torch_generator"]


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 63-bit seed determined by ``seed`` and ``keys`` alone (stable across runs and platforms)."""
    digest = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def torch_generator(seed: int, *keys: str | int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))
