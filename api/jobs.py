"""Batch generation jobs: what to generate, and a safetensors file written batch by batch.

A job is deterministic in its spec: image ``i`` comes from source ``i // per_class`` (a class centroid or
a given latent) plus ``spread · ε`` with ε drawn from the generator's prior by an RNG seeded from the
job's seed and the batch's first index. A job that a restart interrupts therefore re-runs to the same
result.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ktl.api.store import commit_temp, is_no_space, sha256_file
from ktl.errors import InsufficientStorageError
from ktl.generator import Generator

__all__ = ["JobPlan", "StreamingSafetensors"]


@dataclass(frozen=True)
class JobPlan:
    """The generator, sources ``(s, W)`` on its device, their class ids ``(s,)``, and images per source."""

    generator: Generator
    sources: torch.Tensor
    class_ids: torch.Tensor
    per_source: int
    spread: float
    seed: int

    @property
    def total(self) -> int:
        return int(self.sources.shape[0]) * self.per_source

    def latents(self, start: int, end: int, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and class ids of images ``start … end-1``; ``noise`` is ``(end-start, W)`` or None."""
        index = torch.arange(start, end, device=self.sources.device) // self.per_source
        latents = self.sources[index]
        if noise is not None and self.spread > 0:
            latents = latents + self.spread * noise
        return latents, self.class_ids[index.cpu()]


_DTYPES = {torch.uint8: "U8", torch.float32: "F32", torch.int64: "I64"}


class StreamingSafetensors:
    """Write a safetensors file whose tensor shapes are known up front, one row range at a time.

    The header (shapes, dtypes, offsets) is written first; each `write` seeks into the data section.
    `finish` fsyncs, hashes (SHA-256, kept in ``sha256`` and ``size``) and renames the file into place,
    then calls ``on_commit(path, sha256, size)`` (e.g. `Store.record_file`); until then readers never see
    a partial file. A full disk raises `InsufficientStorageError` and removes the partial file.
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        *,
        on_commit: Callable[[Path, str, int], None] | None = None,
    ) -> None:
        self.path = path
        self.on_commit = on_commit
        self.sha256: str | None = None
        self.size: int | None = None
        self._tmp = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        header: dict[str, dict[str, object]] = {}
        self._layout: dict[str, tuple[int, int]] = {}  # name -> (start offset, bytes per row)
        offset = 0
        for name, (dtype, shape) in tensors.items():
            itemsize = torch.empty((), dtype=dtype).element_size()
            row = itemsize * int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else itemsize
            size = row * shape[0]
            header[name] = {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._layout[name] = (offset, row)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - kept open across batches, closed in finish/abort
        with self._storage_guard():
            self._file.write(struct.pack("<Q", len(raw)) + raw)
            self._file.truncate(self._data_start + offset)

    @contextmanager
    def _storage_guard(self) -> Iterator[None]:
        """A full disk: drop the partial file and raise `InsufficientStorageError` (507)."""
        try:
            yield
        except OSError as exc:
            if not is_no_space(exc):
                raise
            self.abort()
            raise InsufficientStorageError(
                "insufficient_storage",
                f"the server's disk is full: {self.path.name} was not stored; try again later",
                headers={"Retry-After": "30"},
            ) from None

    def write(self, name: str, start_row: int, values: torch.Tensor) -> None:
        offset, row = self._layout[name]
        with self._storage_guard():
            self._file.seek(self._data_start + offset + start_row * row)
            self._file.write(values.detach().cpu().contiguous().numpy().tobytes())

    def finish(self) -> None:
        with self._storage_guard():
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        self.sha256, self.size = sha256_file(self._tmp)
        commit_temp(self._tmp, self.path)
        if self.on_commit is not None:
            self.on_commit(self.path, self.sha256, self.size)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)
