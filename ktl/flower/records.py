"""A method's payload bytes and a client's state as Flower records — tensors, never pickles.

A payload is safetensors bytes (`ktl.records`); on Flower it travels as an ``ArrayRecord`` of the same named
tensors, and is turned back into exactly the same bytes on the other side (safetensors writes a given
set of tensors deterministically). A client's state between rounds lives in ``context.state`` the same way.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["from_record", "from_tensors", "to_record", "to_tensors"]


def to_record(payload: bytes) -> ArrayRecord:
    """Safetensors bytes → an ``ArrayRecord`` of its tensors."""
    return from_tensors(st_load(payload))


def from_record(record: ArrayRecord) -> bytes:
    """An ``ArrayRecord`` made by `to_record` → the same safetensors bytes."""
    return st_save(to_tensors(record))


def from_tensors(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in record.to_torch_state_dict().items()}
