"""Copies fxqbn owns: of the user's model before tracing it, and of the float parts a converted model
keeps, so that nothing fxqbn returns shares state with the model it was given."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from .errors import FxqbnError

__all__ = ["owned_copy", "owned_copies"]


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
    return _deep_copies([model])[0]


def _deep_copies(values: list[Any]) -> list[Any]:
    """``owned_copy`` of the modules in ``values`` (and deep copies of the rest), in one deep copy."""
    found: dict[int, torch.Tensor] = {}
    for top in values:
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


def owned_copies(values: list[Any]) -> list[Any]:
    """``owned_copy`` of each module and ``copy.deepcopy`` of each tensor in ``values``, with one memo (what
    they share stays shared in the copies). Plain modules (``_PlainCopier``: the attributes ``nn.Module``
    and the standard layers keep) are copied directly, skipping ``copy.deepcopy``'s generic walk,
    (most of a deep copy's time on small layers); if any module is not plain, all are copied as ``owned_copy`` copies, in one deep copy."""
    copier = _PlainCopier()
    try:
        return [copier.module(v) if isinstance(v, nn.Module) else copier.tensor(v) for v in values]
    except _NotPlain:
        return _deep_copies(values)


_ATOMS = frozenset({type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.memory_format, torch.layout})
_COPY_HOOKS = ("__reduce__", "__reduce_ex__", "__deepcopy__", "__copy__")  # (__getstate__ / __setstate__ are called)
_TABLES = ("_parameters", "_buffers", "_modules")


@functools.lru_cache(maxsize=None)
def _copies_itself(cls: type) -> bool:
    """Whether ``cls`` changes how ``copy`` copies it (beyond ``__getstate__`` / ``__setstate__``)."""
    return any(getattr(cls, name, None) is not getattr(nn.Module, name, None) for name in _COPY_HOOKS)


class _NotPlain(Exception):
    """A module ``_PlainCopier`` cannot copy as ``copy.deepcopy`` would."""


class _PlainCopier:
    """Copies of plain modules and tensors, each original copied once (shared stays shared). Plain:
    ``__setstate__`` of a copy of ``__getstate__``'s dict with fresh tensors is what ``copy.deepcopy``
    does: no copy hooks of the class's own, no hooks registered, plain Parameters and tensors without
    gradients, and otherwise only numbers, strings and tuples, lists or sets of them."""

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.memo:
            if type(t) not in (torch.Tensor, nn.Parameter) or t.grad is not None or (isinstance(t, nn.Parameter) and vars(t)):
                raise _NotPlain
            fresh = t.detach().clone()  # a cached non-leaf tensor's copy is detached, as owned_copy's
            if isinstance(t, nn.Parameter):
                fresh = nn.Parameter(fresh, requires_grad=t.requires_grad)
            elif t.is_leaf and t.requires_grad:
                fresh.requires_grad_(True)
            self.memo[id(t)] = fresh
        return self.memo[id(t)]

    def module(self, module: nn.Module) -> nn.Module:
        if id(module) not in self.memo:
            cls = type(module)
            state = module.__getstate__()
            if _copies_itself(cls) or not (isinstance(state, dict) and all(key in state for key in _TABLES)):
                raise _NotPlain
            for key, value in state.items():
                if type(value) not in _ATOMS:
                    state[key] = self._value(key, value)
            fresh = cls.__new__(cls)
            fresh.__setstate__(state)
            self.memo[id(module)] = fresh
        return self.memo[id(module)]

    def _value(self, key: str, value: Any) -> Any:
        """The copy of one entry of a module's state."""
        if key == "_modules":
            return {name: None if m is None else self.module(m) for name, m in value.items()}
        if key in _TABLES:
            return {name: None if t is None else self.tensor(t) for name, t in value.items()}
        if isinstance(value, dict):  # the hook tables
            if value:
                raise _NotPlain
            return value.copy()
        if isinstance(value, (tuple, list, set, frozenset)):
            if not all(type(item) in _ATOMS for item in value):
                raise _NotPlain
            return value.copy() if isinstance(value, (list, set)) else value
        raise _NotPlain
