"""Copies fxqbn owns: of the user's model before tracing it, and of the float parts a converted model
keeps, so that nothing fxqbn returns shares state with the model it was given."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .errors import FxqbnError

__all__ = ["owned_copy", "owned_copies", "graph_copy"]


def _non_leaf_tensors(value: Any, found: dict[int, torch.Tensor]) -> None:
    """Collect the non-leaf tensors in ``value`` (tensors, and dicts, lists, tuples of them)."""
    if isinstance(value, torch.Tensor):
        if not value.is_leaf:
            found[id(value)] = value
    elif isinstance(value, dict):
        for item in value.values():
            _non_leaf_tensors(item, found)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            _non_leaf_tensors(item, found)


def owned_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, which fxqbn may trace, run and change: tracing runs forward with
    proxies, which a forward that caches (e.g. timm's LeViT, in a dict) would keep.

    Tensors computed with autograd history that a forward cached (LeViT's attention biases after
    an eval run) cannot be deep-copied: the copy holds them detached."""
    return owned_copies([model])[0]


def owned_copies(values: list[Any]) -> list[Any]:
    """``owned_copy`` of each module and ``copy.deepcopy`` of each tensor in ``values`` (a non-leaf one
    detached), in one deep copy: what they share stays shared in the copies."""
    found: dict[int, torch.Tensor] = {}
    for top in values:
        if not isinstance(top, nn.Module):
            _non_leaf_tensors(top, found)
        for module in top.modules() if isinstance(top, nn.Module) else ():
            for key, value in vars(module).items():
                if key not in ("_parameters", "_modules"):
                    _non_leaf_tensors(value, found)
    memo: dict[int, Any] = {key: t.detach().clone() for key, t in found.items()}
    memo[id(memo)] = list(found.values())  # keep the originals alive while copying, as deepcopy does
    try:
        return copy.deepcopy(values, memo)
    except Exception as exc:  # the user's model decides what deepcopy does
        what = next((type(v).__name__ for v in values if isinstance(v, nn.Module)), "the model")
        raise FxqbnError(
            f"fxqbn works on a copy of the model so that the model itself never changes, and "
            f"{what} cannot be copied: {type(exc).__name__}: {exc}. Make it copy.deepcopy-able"
        ) from exc


def graph_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of a GraphModule, without the deprecation torch raises while copying an exported
    module's pytree specs (its own code, not the user's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
        return copy.deepcopy(gm)
