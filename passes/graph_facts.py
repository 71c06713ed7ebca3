"""Small facts read off a traced graph, shared by the BN-only passes and ``fxqbn.lower``'s matching.

Each function only reads: a node's rank, a node as the report names it, and whether a BN's
statistics are a kind the int8 kernels take.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["rank", "describe", "tensor_problem"]


def rank(node: fx.Node) -> int | None:
    """The rank of ``node``'s value, from the shape propagation (``tensor_meta``) or export (``val``)
    left on it; None when neither did."""
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def describe(node: fx.Node) -> str:
    """``node`` as a report names it: ``conv1 (call_module conv1)``, ``relu (call_function relu)``."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {target})"


def tensor_problem(statistic: torch.Tensor) -> str:
    """Why a BN whose statistics are ``statistic``'s dtype and device cannot be quantized; "" if it can."""
    if statistic.dtype != torch.float32 or statistic.device.type != "cpu":
        return (
            f"holds {statistic.dtype} statistics on {statistic.device.type}; the quantized kernel computes "
            "in float32 on the CPU: convert the model with model.float().cpu()"
        )
    return ""
