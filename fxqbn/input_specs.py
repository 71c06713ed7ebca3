"""The example inputs ``fxqbn.prepare`` was given, as plain data an ``fxqbn.save`` file holds, and back.

``fxqbn.load`` needs example inputs only to trace a model whose BatchNorm kernel depends on its input's
rank (``F.batch_norm``, ``SyncBatchNorm``); from a spec it rebuilds inputs of the same structure,
shapes and dtypes (zeros). A spec is a list, one entry per positional input, each entry one of::

    {"tensor": [2, 3, 32, 32], "dtype": "float32"}        a strided, unquantized tensor
    {"tuple": [entry, ...]}, {"list": [entry, ...]}        a tuple or list of entries
    {"dict": {"name": entry, ...}}                         a dict with string keys
    {"value": v}                                           None, a bool, int, float or str, kept as is
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StoredInputs", "record", "rebuild", "STORABLE"]

STORABLE = ("tensors (their shape and dtype), None, bools, ints, floats and strings, "
            "in tuples, lists and dicts with string keys")
_VALUES = (type(None), bool, int, float, str)
_DTYPES = {  # every dtype a plain tensor can have (no quantized ones), by name: "float32" -> torch.float32
    str(d).removeprefix("torch."): d for d in vars(torch).values()
    if isinstance(d, torch.dtype) and not str(d).startswith(("torch.qint", "torch.quint"))
}


@dataclass(frozen=True)
class StoredInputs:
    """What ``prepare`` recorded of its example inputs, for ``fxqbn.save``."""

    spec: list | None  # None: some input is none of STORABLE (why_not says which)
    why_not: str
    needed_by: tuple[str, ...]  # the BNs that need a traced run on inputs (empty: load needs none)


def _describe(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        if value.is_quantized or value.layout != torch.strided:
            raise ValueError(f"{where} is a {'quantized' if value.is_quantized else str(value.layout)} tensor")
        return {"tensor": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        return {type(value).__name__: [_describe(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if type(value) is dict:
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise ValueError(f"{where} is a dict with key {bad!r}, not a string")
        return {"dict": {k: _describe(v, f"{where}[{k!r}]") for k, v in value.items()}}
    if type(value) in _VALUES:
        return {"value": value}
    raise ValueError(f"{where} is a {type(value).__name__}")


def record(inputs: tuple, needed_by: tuple[str, ...], known: bool = True) -> StoredInputs:
    """``inputs`` as a spec, or why not (naming the input: ``example_inputs[1]['mask']``); ``known``
    False: no inputs were given (``fxqbn.load`` of a file without them, for a model that needs none)."""
    if not known:
        return StoredInputs(None, "no example inputs were given", needed_by)
    try:
        return StoredInputs([_describe(v, f"example_inputs[{i}]") for i, v in enumerate(inputs)], "", needed_by)
    except ValueError as exc:
        return StoredInputs(None, str(exc), needed_by)


def _sizes(sizes: Any) -> bool:
    return isinstance(sizes, list) and all(type(s) is int and s >= 0 for s in sizes)


def _rebuild(entry: Any, where: str, device: torch.device) -> Any:
    kind = next(iter(entry), None) if isinstance(entry, dict) else None
    if kind == "tensor" and set(entry) == {"tensor", "dtype"} and _sizes(entry["tensor"]) and entry["dtype"] in _DTYPES:
        return torch.zeros(entry["tensor"], dtype=_DTYPES[entry["dtype"]], device=device)
    if kind in ("tuple", "list") and len(entry) == 1 and isinstance(entry[kind], list):
        items = [_rebuild(v, f"{where}[{i}]", device) for i, v in enumerate(entry[kind])]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and len(entry) == 1 and isinstance(entry["dict"], dict) and all(isinstance(k, str) for k in entry["dict"]):
        return {k: _rebuild(v, f"{where}[{k!r}]", device) for k, v in entry["dict"].items()}
    if kind == "value" and len(entry) == 1 and type(entry["value"]) in _VALUES:
        return entry["value"]
    raise ValueError(f"{where} is {entry!r}, not an input spec")


def rebuild(spec: Any, device: torch.device | str = "cpu") -> tuple:
    """Inputs of ``spec``'s structure, shapes and dtypes (tensors of zeros on ``device``; "meta" allocates
    nothing, to check a spec). Raises ValueError naming the entry that is no spec."""
    if not isinstance(spec, list):
        raise ValueError(f"example_inputs is a {type(spec).__name__}, not a list")
    return tuple(_rebuild(entry, f"example_inputs[{i}]", torch.device(device)) for i, entry in enumerate(spec))
