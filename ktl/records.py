"""Typed values that cross the client/server boundary, and their safetensors wire format.

Everything a client sends or receives is one of these. They serialise with ``safetensors`` only:
nothing here ever unpickles.

Shapes (one vocabulary everywhere): C classes, K prototype dim (K = C), W generator latent dim,
n uploaded rows, m pairs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ktl.errors import PayloadError

__all__ = [
    "DuplicateKeyError",
    "Prototypes",
    "Pairs",
    "Weights",
    "PROTOTYPE_NORM_TOLERANCE",
    "WEIGHT_LIMIT",
    "loads_unique",
]

# Uploaded prototypes are unit vectors; fp16 rounding moves a norm by < 1e-3, so 1e-2 only rejects
# vectors that were never normalised.
PROTOTYPE_NORM_TOLERANCE = 1e-2
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Model weights travel as plain values; trained weights of the models here stay within ±10, so ±1e4 only
# rejects a broken or hostile upload (it would swamp any average it enters).
WEIGHT_LIMIT = 1e4
_WEIGHT_PREFIX = "weights."
_COUNTS = "counts"


class DuplicateKeyError(ValueError):
    """A JSON object (a request body, a safetensors header) names one key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r} in a JSON object")
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def loads_unique(text: str | bytes) -> Any:
    """``json.loads`` that raises `DuplicateKeyError` for a key given twice in one object (the standard
    parser, and safetensors' header parser, keep one silently: a reviewer and the server would read
    different values)."""
    return json.loads(text, object_pairs_hook=_unique)


def _st_load(data: bytes) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load`` after checking that the header names each tensor once."""
    if len(data) >= 8:
        (size,) = struct.unpack("<Q", data[:8])
        if size <= len(data) - 8:
            try:
                loads_unique(data[8 : 8 + size])
            except DuplicateKeyError as exc:
                raise PayloadError(
                    "duplicate_tensor", f"the safetensors header names tensor {exc.key!r} twice"
                ) from None
            except ValueError:
                pass  # not JSON: safetensors says what is wrong
    return st_load(data)


def _load_tensors(data: bytes, required: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        tensors = _st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise PayloadError("not_safetensors", f"body is not a safetensors file: {exc}") from exc
    missing = [k for k in required if k not in tensors]
    if missing:
        raise PayloadError("missing_tensor", f"safetensors body lacks tensor(s) {missing}")
    extra = sorted(set(tensors) - set(required))
    if extra:
        raise PayloadError("unexpected_tensor", f"safetensors body has unexpected tensor(s) {extra}")
    return tensors


@dataclass(frozen=True)
class Prototypes:
    """One client's per-class prototypes for one round.

    Attributes
    ----------
    vectors
        ``(n, K)`` float, each row unit-norm: the renormalised mean of L2-normalised head outputs.
    class_ids
        ``(n,)`` int64, distinct class indices; classes a client lacks are not sent.
    counts
        ``(n,)`` int64, the number of local training samples behind each row (weights aggregation).
    """

    vectors: torch.Tensor
    class_ids: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self) -> None:
        v, c, n = self.vectors, self.class_ids, self.counts
        if v.dim() != 2:
            raise PayloadError("shape", f"prototypes must be 2-D (n, K), got shape {tuple(v.shape)}")
        if c.dim() != 1 or n.dim() != 1 or c.shape[0] != v.shape[0] or n.shape[0] != v.shape[0]:
            raise PayloadError(
                "shape",
                f"class_ids and counts must be 1-D of length n={v.shape[0]}, "
                f"got {tuple(c.shape)} and {tuple(n.shape)}",
            )
        if v.dtype not in _FLOAT_DTYPES:
            raise PayloadError("dtype", f"prototypes must be floating point, got {v.dtype}")
        if c.dtype != torch.int64 or n.dtype != torch.int64:
            raise PayloadError("dtype", f"class_ids and counts must be int64, got {c.dtype} and {n.dtype}")

    @property
    def rows(self) -> int:
        """n, the rows uploaded (a store's row count)."""
        return int(self.vectors.shape[0])

    def validate(
        self, *, num_classes: int, dim: int, norm_tolerance: float | None = PROTOTYPE_NORM_TOLERANCE
    ) -> None:
        """Check the values against a federation's shape; raise `PayloadError` with a reason code.
        ``norm_tolerance`` None: rows need not be unit vectors (e.g. FedDistill's mean cosines)."""
        v = self.vectors
        if v.shape[0] == 0:
            raise PayloadError("empty", "an upload must hold at least one prototype")
        if v.shape[1] != dim:
            raise PayloadError("dim", f"prototypes have K={v.shape[1]}, this federation expects K={dim}")
        if not bool(torch.isfinite(v).all()):
            raise PayloadError("non_finite", "prototypes contain NaN or Inf")
        if norm_tolerance is not None:
            worst = float((v.double().norm(dim=1) - 1).abs().max())
            if worst > norm_tolerance:
                raise PayloadError(
                    "norm", f"prototype norms must be 1 (±{norm_tolerance}); worst is off by {worst:.3g}"
                )
        ids = self.class_ids
        if bool(((ids < 0) | (ids >= num_classes)).any()):
            raise PayloadError("class_range", f"class_ids must lie in [0, {num_classes})")
        if ids.unique().numel() != ids.numel():
            raise PayloadError("class_repeated", "class_ids must be distinct")
        if bool((self.counts <= 0).any()):
            raise PayloadError("counts", "counts must be positive")

    def to_bytes(self, dtype: torch.dtype = torch.float32) -> bytes:
        """Serialise as safetensors (``prototypes``, ``class_ids``, ``counts``); fp16 halves the upload."""
        return st_save(
            {
                "prototypes": self.vectors.detach().to("cpu", dtype).contiguous(),
                "class_ids": self.class_ids.detach().cpu().contiguous(),
                "counts": self.counts.detach().cpu().contiguous(),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Prototypes:
        t = _load_tensors(data, ("prototypes", "class_ids", "counts"))
        return cls(vectors=t["prototypes"], class_ids=t["class_ids"], counts=t["counts"])


@dataclass(frozen=True)
class Pairs:
    """Image-vector pairs the server returns: generated images and the latents they came from.

    Attributes
    ----------
    images
        ``(m, 3, H, W)`` float in [0, 1] in memory; uint8 on the wire.
    latents
        ``(m, W)`` float, the generator inputs (the distillation targets).
    class_ids
        ``(m,)`` int64, the class each pair was generated for.
    """

    images: torch.Tensor
    latents: torch.Tensor
    class_ids: torch.Tensor

    def __post_init__(self) -> None:
        m = self.images.shape[0]
        if self.images.dim() != 4:
            raise PayloadError("shape", f"images must be NCHW, got shape {tuple(self.images.shape)}")
        if self.latents.dim() != 2 or self.latents.shape[0] != m or self.class_ids.shape != (m,):
            raise PayloadError(
                "shape",
                f"latents (m, W) and class_ids (m,) must match m={m} images, got "
                f"{tuple(self.latents.shape)} and {tuple(self.class_ids.shape)}",
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def images_uint8(self) -> torch.Tensor:
        return (self.images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def to_bytes(self) -> bytes:
        """Serialise as safetensors: ``images`` uint8 NCHW, ``latents`` float32, ``class_ids`` int64."""
        return st_save(
            {
                "images": self.images_uint8.contiguous(),
                "latents": self.latents.detach().to("cpu", torch.float32).contiguous(),
                "class_ids": self.class_ids.detach().cpu().to(torch.int64).contiguous(),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Pairs:
        t = _load_tensors(data, ("images", "latents", "class_ids"))
        images = t["images"]
        if images.dtype != torch.uint8:
            raise PayloadError("dtype", f"pair images must be uint8 on the wire, got {images.dtype}")
        return cls(images=images.float() / 255.0, latents=t["latents"].float(), class_ids=t["class_ids"])


@dataclass(frozen=True)
class Weights:
    """Named float tensors — a classifier, a small shared model, a generator — and the training samples
    behind them (the weights of a sample-weighted average).

    Attributes
    ----------
    tensors
        name → float tensor (a ``state_dict``'s floating entries).
    counts
        ``(n,)`` int64 sample counts: one total (n = 1), or one per class (n = C) where a method needs the
        label distribution (FedGen).
    """

    tensors: dict[str, torch.Tensor]
    counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.counts.dim() != 1 or self.counts.dtype != torch.int64:
            raise PayloadError(
                "counts", f"counts must be 1-D int64, got {self.counts.dtype} {tuple(self.counts.shape)}"
            )
        for name, t in self.tensors.items():
            if t.dtype not in _FLOAT_DTYPES:
                raise PayloadError("dtype", f"weight tensor {name} must be floating point, got {t.dtype}")

    @property
    def rows(self) -> int:
        """How many tensors the upload holds (a store's row count)."""
        return len(self.tensors)

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def validate(self, layout: Mapping[str, tuple[int, ...]] | None, *, counts: int) -> None:
        """Check against the expected ``layout`` (name → shape; None: any names, not empty) and ``counts``
        entries; every value finite and within ±`WEIGHT_LIMIT`; at least one sample. Raise `PayloadError`."""
        if not self.tensors:
            raise PayloadError("empty", "an upload must hold at least one weight tensor")
        if layout is not None:
            if set(self.tensors) != set(layout):
                missing = sorted(set(layout) - set(self.tensors))
                extra = sorted(set(self.tensors) - set(layout))
                raise PayloadError(
                    "layout", f"weights do not match the layout: they lack {missing}, have unexpected {extra}"
                )
            for name, shape in layout.items():
                if tuple(self.tensors[name].shape) != tuple(shape):
                    raise PayloadError(
                        "layout",
                        f"weight {name} has shape {tuple(self.tensors[name].shape)}, the layout's is {tuple(shape)}",
                    )
        for name, t in self.tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise PayloadError("non_finite", f"weight {name} holds NaN or Inf")
            worst = float(t.abs().max()) if t.numel() else 0.0
            if worst > WEIGHT_LIMIT:
                raise PayloadError("range", f"weight {name} reaches {worst:.3g}, beyond ±{WEIGHT_LIMIT:g}")
        if self.counts.shape[0] != counts:
            raise PayloadError("counts", f"counts must hold {counts} entries, got {self.counts.shape[0]}")
        if bool((self.counts < 0).any()) or self.num_samples < 1:
            raise PayloadError("counts", "counts must be non-negative with at least one sample")

    def to_bytes(self, dtype: torch.dtype = torch.float32) -> bytes:
        """Serialise as safetensors (``weights.<name>`` in ``dtype``, ``counts``)."""
        out = {_WEIGHT_PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in self.tensors.items()}
        out[_COUNTS] = self.counts.detach().cpu().contiguous()
        return st_save(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Weights:
        try:
            tensors = _st_load(data)
        except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
            raise PayloadError("not_safetensors", f"body is not a safetensors file: {exc}") from exc
        if _COUNTS not in tensors:
            raise PayloadError("missing_tensor", f"safetensors body lacks tensor {_COUNTS!r}")
        odd = sorted(k for k in tensors if k != _COUNTS and not k.startswith(_WEIGHT_PREFIX))
        if odd:
            raise PayloadError("unexpected_tensor", f"safetensors body has unexpected tensor(s) {odd}")
        weights = {k.removeprefix(_WEIGHT_PREFIX): v for k, v in tensors.items() if k != _COUNTS}
        return cls(tensors=weights, counts=tensors[_COUNTS])
