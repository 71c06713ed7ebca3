"""Targets for the modules a rewrite adds to a graph module: free names, unique against the root's
attributes and each other. Used by ``passes.rewrite`` (BN-only conversion) and ``passes.lower_rewrite``."""

from __future__ import annotations

from torch import nn

from .modules import ModuleIndex
from .records import Match

__all__ = ["NewModules"]


class NewModules:
    """Targets for the modules a rewrite adds, unique against ``root``'s attributes and each other."""

    def __init__(self, root: nn.Module, index: ModuleIndex | None = None) -> None:
        self.index = index or ModuleIndex(root)
        self.modules: dict[str, nn.Module] = {}
        self._next: dict[str, int] = {}

    def _free(self, name: str) -> bool:
        return name not in self.modules and not self.index.has(name)

    def add(self, prefix: str, module: nn.Module) -> str:
        """Under the first free ``prefix<k>``."""
        k = self._next.get(prefix, 0)
        while not self._free(f"{prefix}{k}"):
            k += 1
        self._next[prefix] = k + 1
        self.modules[f"{prefix}{k}"] = module
        return f"{prefix}{k}"

    def named(self, name: str, module: nn.Module, replacing: bool = False) -> str:
        """Under ``name``, or the first free ``name_<k>`` (k = 1, 2, ...); ``replacing``: ``name`` may be a
        module of ``root`` (the one this one replaces), just not one added already."""
        target, k = name, 0
        while target in self.modules or ((k or not replacing) and not self._free(target)):
            k += 1
            target = f"{name}_{k}"
        self.modules[target] = module
        return target

    def replace(self, match: Match, module: nn.Module) -> str:
        """Where the float BN module was (a BN called twice: a fresh name beside it); an
        F.batch_norm's replacement at the root, named after its node."""
        name = match.module if match.bn_module is not None else f"fxqbn_{match.bn_node}"
        return self.named(name, module, replacing=True)
