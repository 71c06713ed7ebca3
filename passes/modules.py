"""Where a graph's targets live in a module tree, each module found once per pass.

``nn.Module.get_submodule`` and ``operator.attrgetter`` walk the tree through ``nn.Module.__getattr__``
at every dotted step; on graphs with thousands of targets that walk cost more than the rest of
``convert``'s bookkeeping. A ``ModuleIndex`` remembers what it resolved: use it while the tree does not change.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

from torch import nn

__all__ = ["ModuleIndex"]


class ModuleIndex:
    """``root``'s modules by qualified name, each resolved once from its parent's and then remembered."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._modules: dict[str, nn.Module] = {"": root}

    def module(self, name: str) -> nn.Module:
        """The submodule ``name`` ("" is the root); AttributeError when there is none, as ``get_submodule``."""
        found = self._modules.get(name)
        if found is None:
            parent, _, leaf = name.rpartition(".")
            owner = self.module(parent)
            found = owner._modules.get(leaf)
            if found is None:  # not registered as a submodule: get_submodule's own lookup and message
                found = owner.get_submodule(leaf)
            self._modules[name] = found
        return found

    def attr(self, target: str) -> Any:
        """The module, parameter, buffer or attribute at ``target`` (what ``getattr`` along the dots gives)."""
        parent, _, leaf = target.rpartition(".")
        try:
            owner = self.module(parent)
        except AttributeError:
            owner = None
        if owner is not None and _tables_answer(type(owner), leaf) and leaf not in owner.__dict__:
            for table in (owner._parameters, owner._buffers, owner._modules):  # nn.Module.__getattr__'s order
                if leaf in table:
                    return table[leaf]
        return operator.attrgetter(target)(self.root)  # plain attributes, properties, or a missing target

    def has(self, target: str) -> bool:
        """Whether ``getattr`` along the dots of ``target`` finds something (``hasattr``, without raising
        through ``nn.Module.__getattr__`` for the usual answer, no)."""
        parent, _, leaf = target.rpartition(".")
        try:
            owner = self.module(parent)
        except AttributeError:  # no module there; maybe an attribute of an attribute
            try:
                operator.attrgetter(target)(self.root)
            except AttributeError:
                return False
            return True
        if not _tables_answer(type(owner), leaf):  # a class attribute, or a module answering on its own
            return hasattr(owner, leaf)
        return any(leaf in table for table in (owner.__dict__, owner._parameters, owner._buffers, owner._modules))


@functools.lru_cache(maxsize=4096)
def _tables_answer(cls: type, leaf: str) -> bool:
    """Whether ``getattr(module, leaf)`` on a ``cls`` instance (``leaf`` not in its ``__dict__``) is
    answered by ``nn.Module.__getattr__`` from the module's tables: no class attribute or own
    ``__getattr__`` comes first."""
    return cls.__getattr__ is nn.Module.__getattr__ and not hasattr(cls, leaf)
