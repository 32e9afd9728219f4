"""Choosing the torch device named in a config or setting."""

from __future__ import annotations

import torch

from ktl.errors import ConfigError

__all__ = ["resolve_device", "synchronize"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA device that is not there is a `ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} asked for, but no CUDA device is available; use --device cpu or auto"
        )
    return device


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA kernels run asynchronously; a timer must wait for them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
