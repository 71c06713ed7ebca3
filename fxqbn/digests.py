"""SHA-256 digests of what an ``fxqbn.save`` file holds: ``seal`` writes them, ``first_difference`` checks them.

A file (format 3) holds ``"digests": {"fields": {name: hex}, "tensors": {state_dict key: hex}}``:
one digest per top-level field (its name and ``repr``: plain data, so types and exact float values
count) and one per tensor (its key, dtype, shape and bytes in row-major order; a quantized tensor's
integer codes, scheme, scale(s) and zero point(s)), as strings, so ``torch.load(weights_only=True)`` still
reads the file. Each tensor is hashed once, without a copy when it is contiguous.

They catch accidents (bit rot, a truncated copy, records of two files mixed up), not tampering:
whoever edits a tensor can write its digest too.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from . import qops

__all__ = ["seal", "field_digest", "field_digests", "tensor_digest", "tensor_digests", "first_difference", "UNSEALED"]

UNSEALED = ("state_dict", "digests")  # the fields not hashed whole: the tensors are hashed one by one


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 of the state_dict key ``name`` and ``tensor``'s dtype, shape and values (a quantized
    tensor: its codes and qparams). The name counts: pickle writes a key once for the state_dict and
    the digests, so a damaged key renames both."""
    digest = hashlib.sha256(f"{name!r} {tensor.dtype} {tuple(tensor.shape)}".encode())
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.is_quantized:
        digest.update(repr(qops.quantizer(tensor)).encode())
        tensor = qops.codes(tensor)
    flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)  # no copy for a contiguous CPU tensor
    digest.update(memoryview(flat.numpy()))
    return digest.hexdigest()


def field_digest(name: str, value: Any) -> str:
    """SHA-256 of ``repr((name, value))``: plain data, so types and exact float values count."""
    return hashlib.sha256(repr((name, value)).encode()).hexdigest()


def field_digests(payload: dict[str, Any]) -> dict[str, str]:
    return {name: field_digest(name, value) for name, value in payload.items() if name not in UNSEALED}


def tensor_digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {key: tensor_digest(key, tensor) for key, tensor in state.items()}


def seal(payload: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The ``digests`` field of ``payload`` (every other field, and every tensor of its state_dict)."""
    return {"fields": field_digests(payload), "tensors": tensor_digests(payload["state_dict"])}


def _malformed(digests: Any) -> str | None:
    """Why the ``digests`` field is not {"fields": {str: str}, "tensors": {str: str}}, or None."""
    if not isinstance(digests, dict) or set(digests) != {"fields", "tensors"}:
        return "field 'digests' is not {'fields': ..., 'tensors': ...}"
    for part, table in digests.items():
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            return f"field 'digests' has a {part!r} entry that is not a table of names to digests"
    return None


def _differs(name: str, found: dict[str, Any], stored: dict[str, str], digest: Any) -> str | None:
    """The first entry of ``found`` whose digest differs from ``stored``, or one ``stored`` lacks; None if all agree."""
    for key, value in found.items():
        if key not in stored:
            return f"{name} {key!r} has no digest (a record of another file?)"
        if digest(key, value) != stored[key]:
            return f"{name} {key!r} does not match its SHA-256 digest"
    missing = next((key for key in stored if key not in found), None)
    return None if missing is None else f"{name} {missing!r} is missing"


def _tensor_or_none(name: str, value: Any) -> str | None:
    return tensor_digest(name, value) if isinstance(value, torch.Tensor) else None


def first_difference(payload: dict[str, Any]) -> str | None:
    """What first differs from the digests ``payload`` holds (a field, then a tensor), or None when all
    match. A state_dict that is no dict is left to the checks of the file's structure."""
    if "digests" not in payload:
        return "field 'digests' is missing"
    digests = payload["digests"]
    fields = {name: value for name, value in payload.items() if name not in UNSEALED}
    state = payload.get("state_dict")
    return (
        _malformed(digests)
        or _differs("field", fields, digests["fields"], field_digest)
        or (_differs("tensor", state, digests["tensors"], _tensor_or_none) if isinstance(state, dict) else None)
    )
