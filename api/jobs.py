"""Batch generation jobs: what to generate, and a safetensors file written batch by batch.

A job is deterministic in its spec: image ``i`` comes from source ``i // per_class`` (a class centroid or
a given latent) plus ``spread · ε`` with ε drawn from the generator's prior by an RNG seeded from the
job's seed and the batch's first index, always on the CPU (then moved to the device). Batches have a
fixed size (``job_batch_size``), so a job's bytes do not depend on how many devices share its batches nor
on which one ran each; a job that a restart interrupts re-runs to the same result.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ktl.api.store import commit_temp, is_no_space, sha256_file
from ktl.errors import InsufficientStorageError
from ktl.generator import Generator
from ktl.seeding import torch_generator

__all__ = ["JobPlan", "StreamingSafetensors", "WriterClosedError", "prior_noise"]


@dataclass(frozen=True)
class JobPlan:
    """The generator (the first device's copy: its shapes), sources ``(s, W)`` and their class ids
    ``(s,)`` on the CPU, and images per source."""

    generator: Generator
    sources: torch.Tensor
    class_ids: torch.Tensor
    per_source: int
    spread: float
    seed: int
    generator_name: str = "default"

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


def prior_noise(generator: Generator, n: int, seed: int, *keys: str | int) -> torch.Tensor:
    """``(n, W)`` draws from the generator's prior, from a stream seeded by ``(seed, *keys)`` alone, returned
    on the CPU (a batch job's: ``"job", start``; ``ktl generate``'s: ``"generate", shard``). A standard-
    normal prior is drawn on the CPU: the same on every device. Another prior (StyleGAN's mapping network)
    is sampled by the generator itself from that stream on its device: the same on every device of a kind,
    not bit-equal between the CPU and CUDA."""
    if getattr(generator, "latent_prior", None) == "standard-normal":
        return torch.randn(n, generator.latent_dim, generator=torch_generator(seed, *keys))
    rng = torch_generator(seed, *keys, device=generator.device)
    return generator.sample_latents(n, rng).float().cpu()


class WriterClosedError(RuntimeError):
    """A write to a `StreamingSafetensors` after it was finished or aborted (another batch failed, or the
    job was cancelled)."""


_DTYPES = {torch.uint8: "U8", torch.float32: "F32", torch.int64: "I64"}


class StreamingSafetensors:
    """Write a safetensors file whose tensor shapes are known up front, one row range at a time.

    The header (shapes, dtypes, offsets) is written first; each `write` is a positional write
    (``os.pwrite``) into the data section, so batches may be written from several threads in any order.
    A lock keeps `abort` and `finish` from closing the file under a write (a write after them raises
    `WriterClosedError`); the generator's work happens before, outside it.
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
        self._lock = threading.RLock()
        self._closed = False
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - kept open across batches, closed in finish/abort
        with self._storage_guard():
            self._file.write(struct.pack("<Q", len(raw)) + raw)
            self._file.flush()
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
        data = memoryview(values.detach().cpu().contiguous().numpy().tobytes())
        at = self._data_start + offset + start_row * row
        with self._lock, self._storage_guard():
            if self._closed:
                raise WriterClosedError(f"{self.path.name} was already finished or aborted")
            fd = self._file.fileno()
            while data:
                written = os.pwrite(fd, data, at)
                data, at = data[written:], at + written

    def finish(self) -> None:
        """Fsync, hash and rename into place; once (a second call raises `WriterClosedError`)."""
        with self._lock:
            if self._closed:
                raise WriterClosedError(f"{self.path.name} was already finished or aborted")
            with self._storage_guard():
                self._file.flush()
                os.fsync(self._file.fileno())
            self._closed = True
            self._file.close()
        self.sha256, self.size = sha256_file(self._tmp)
        commit_temp(self._tmp, self.path)
        if self.on_commit is not None:
            self.on_commit(self.path, self.sha256, self.size)

    def abort(self) -> None:
        """Close and remove the partial file (idempotent; leaves a finished file alone)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.close()
            self._tmp.unlink(missing_ok=True)
