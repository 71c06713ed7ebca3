"""The optional C kernels (``fxqbn/_ckernels.c``, built by ``pip install``): loaded once.

``EXT`` is the extension module, or None when it was not built (no C compiler at install time), was
built from older sources (it lacks an ``ENTRY_POINTS`` function) or ``FXQBN_NO_EXT=1`` is set; fxqbn
then runs its pure-torch kernels, with the same results. A missing or out-of-date build is reported
once, by ``warn_if_missing``, when a fused kernel first runs.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

__all__ = ["EXT", "WHY_NOT", "warn_if_missing", "threads"]


ENTRY_POINTS = ("bn", "mismatches", "quantize", "dequantize", "isa")  # what fxqbn calls in the extension


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("FXQBN_NO_EXT", "0") not in ("", "0"):
        return None, "FXQBN_NO_EXT is set"
    try:
        ext = importlib.import_module("fxqbn._ckernels")
    except ModuleNotFoundError:
        return None, "the C extension fxqbn._ckernels is not built"
    except ImportError as exc:  # built, but does not load here
        return None, f"the C extension fxqbn._ckernels does not load ({exc})"
    missing = [name for name in ENTRY_POINTS if not hasattr(ext, name)]
    if missing:  # built from older sources (an editable install not rebuilt)
        return None, f"the C extension fxqbn._ckernels is out of date (it has no {', '.join(missing)})"
    return ext, ""


EXT, WHY_NOT = _load()
_warned: list[bool] = []


def warn_if_missing() -> None:
    """Warn once per process that the pure-torch kernels run, unless the user asked for them."""
    if EXT is None and not _warned and WHY_NOT != "FXQBN_NO_EXT is set":
        _warned.append(True)
        warnings.warn(
            f"fxqbn.fused: {WHY_NOT}; running the pure-torch kernels (same results, slower). "
            "Reinstall fxqbn on a machine with a C compiler to build it.", RuntimeWarning, stacklevel=3,
        )


def threads() -> int:
    """How many threads a C kernel may use: torch's own setting."""
    return torch.get_num_threads()
